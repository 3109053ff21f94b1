"""Tiny Stable Diffusion pipelines with random weights, built offline for CPU machines.

Two architectures, both running the real diffusers code path end to end, fast enough for tests
and for a laptop without a GPU, and both drawing noise, not pictures:

- SDXL (``tiny-sdxl-random``): two CLIP text encoders, a UNet with SDXL's ``text_time``
  conditioning, a VAE with scale factor 8, an Euler scheduler;
- SD 1.5 (``tiny-sd15-random``): one CLIP text encoder whose hidden states the UNet attends to
  (cross-attention width 32), the same kind of VAE, a PNDM scheduler.

Their weights are random numbers drawn from a fixed seed. For real images set
``IMAGE_MODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0`` on a machine with a GPU.

No file is downloaded: the tokenizer is a small byte-level BPE trained here on the short
English text below, and the weights come from ``torch.manual_seed``. Each folder is built once
under the model cache directory (about 22 MB for SDXL, 13 MB for SD 1.5; 1-2 s once torch and
diffusers are imported), keyed by a hash of this module and of the library versions that write
it, and is byte-identical when rebuilt with the same versions. :func:`build_cached_folder` is
the build-once machinery, shared with the tiny LoRA of :mod:`fictures_ai.engines.tiny_image_lora`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from filelock import FileLock

logger = logging.getLogger(__name__)

TINY_IMAGE_MODEL = "tiny-sdxl-random"
"""The name the API reports for the tiny SDXL pipeline."""

TINY_SD15_IMAGE_MODEL = "tiny-sd15-random"
"""The name the API reports for the tiny SD 1.5 pipeline."""

TINY_PIPELINE_MARKER = ".fictures-tiny-pipeline"
"""File written last into a finished tiny pipeline folder; its presence marks the folder and
its text is the pipeline's name (``TINY_IMAGE_MODEL`` or ``TINY_SD15_IMAGE_MODEL``)."""

LIBRARIES_WRITING_PIPELINES = ("torch", "diffusers", "transformers", "tokenizers", "safetensors")
"""The packages whose versions decide a tiny pipeline's bytes (part of its folder's key)."""

_SEED = 20240229
_MODEL_MAX_LENGTH = 77
_MAX_BPE_MERGES = 1024
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"

# The text the tokenizer learns its merges from. Any fixed English text works: the merges only
# have to make ordinary prompts tokenize into word-like pieces instead of single bytes.
_TOKENIZER_CORPUS = """
The old lighthouse stood at the edge of the cliff, its white paint worn grey by the salt wind.
Every evening the keeper climbed the spiral stairs with a lantern in one hand and a book in the
other. From the top she could see the whole harbour: fishing boats with red sails, the market
square, the church tower, and the narrow streets that wound up the hill like ribbons.
A young painter arrived in the town one autumn morning. He carried a wooden easel, a box of
brushes and a sketchbook full of castles, forests, dragons and faces of people he had met on
the road. He rented a small room above the bakery, where the smell of fresh bread woke him
before sunrise. In the afternoons he sat by the water and painted the light on the waves,
the gulls over the pier, the children running along the beach with their dogs.
The keeper noticed him from her tower. One stormy night, when thunder rolled across the sea and
rain beat against the glass, a ship lost its way in the dark. The painter saw the danger first
and ran up the hill to warn her. Together they turned the great lamp toward the rocks, and the
beam cut through the storm like a golden sword. The ship found the channel and sailed safely
into the harbour while the whole town cheered from the windows.
After that night the two became friends. She told him stories of sailors, mermaids, ghosts and
hidden treasure; he painted them in bright colours: a blue whale beneath a silver moon, a
knight in shining armour riding through a snowy valley, a city of glass floating above the
clouds, a cat asleep on a pile of ancient maps, a girl with a red umbrella in the rain.
Portrait, landscape, watercolour, oil painting, digital art, photograph, cinematic lighting,
sharp focus, soft shadows, warm sunset, cold morning, detailed illustration, high quality,
beautiful scene, dramatic sky, mountains, rivers, flowers, trees, a garden in spring, a quiet
library, a busy train station, a robot in a field of sunflowers, an astronaut on a horse.
Years later the painter opened a gallery in the square. On the first wall hung a picture of
the lighthouse in the storm, and beside it a small card that said: for the keeper, who kept
the light burning when the night was darkest. People came from far away to see it, and many
of them left with a story of their own.
"""


def build_tiny_sdxl_pipeline(cache_dir: Path) -> Path:
    """Return the folder of the tiny SDXL pipeline, building it on first use.

    The folder is ``cache_dir/tiny-sdxl-<hash>`` and loads with
    ``StableDiffusionXLPipeline.from_pretrained`` or ``AutoPipelineForText2Image.from_pretrained``.
    Built as :func:`build_cached_folder` builds: once, atomically, under a file lock. Blocking
    (1-2 s): call it off the event loop.
    """
    return build_cached_folder(
        cache_dir / f"tiny-sdxl-{_recipe_hash()[:16]}",
        marker=TINY_PIPELINE_MARKER,
        marker_text=TINY_IMAGE_MODEL,
        write=_write_sdxl_pipeline,
        description="the tiny SDXL pipeline (random weights)",
    )


def build_tiny_sd15_pipeline(cache_dir: Path) -> Path:
    """Return the folder of the tiny SD 1.5 pipeline, building it on first use.

    The folder is ``cache_dir/tiny-sd15-<hash>`` and loads with
    ``StableDiffusionPipeline.from_pretrained`` or ``AutoPipelineForText2Image.from_pretrained``.
    Built as :func:`build_cached_folder` builds. Blocking (about 1 s): call it off the event
    loop.
    """
    return build_cached_folder(
        cache_dir / f"tiny-sd15-{_recipe_hash()[:16]}",
        marker=TINY_PIPELINE_MARKER,
        marker_text=TINY_SD15_IMAGE_MODEL,
        write=_write_sd15_pipeline,
        description="the tiny SD 1.5 pipeline (random weights)",
    )


def is_tiny_pipeline(source: str | Path) -> bool:
    """Whether ``source`` is a folder built by :func:`build_tiny_sdxl_pipeline` or
    :func:`build_tiny_sd15_pipeline`."""
    return tiny_pipeline_name(source) is not None


def tiny_pipeline_name(source: str | Path) -> str | None:
    """The name of the tiny pipeline in folder ``source`` (``TINY_IMAGE_MODEL`` or
    ``TINY_SD15_IMAGE_MODEL``), or None when ``source`` is not a tiny pipeline folder."""
    try:
        name = (Path(source) / TINY_PIPELINE_MARKER).read_text().strip()
    except OSError:  # no marker (not a tiny pipeline), or not a folder at all (a hub id)
        return None
    # Folders written before the SD 1.5 pipeline existed hold the SDXL name too.
    return name or TINY_IMAGE_MODEL


def build_cached_folder(
    target: Path,
    *,
    marker: str,
    marker_text: str,
    write: Callable[[Path], None],
    description: str,
) -> Path:
    """Return ``target``, first calling ``write(staging)`` to build it when it is not there.

    ``write`` fills an empty staging folder beside ``target``; then the file ``marker`` (holding
    ``marker_text``) is written last and the folder renamed into place, all under a file lock
    (``target`` + ``.lock``). So concurrent processes build it once, a crash never leaves a
    half-written folder behind, and a folder with the marker is complete. ``target``'s name
    should carry a hash of what decides its bytes (:func:`recipe_hash`), so a changed recipe
    builds a new folder instead of reusing a stale one. ``description`` names the build in the
    log.
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).is_file():
            return target
        logger.info("Building %s into %s", description, target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            staging = Path(tmp) / "build"
            staging.mkdir()
            write(staging)
            (staging / marker).write_text(f"{marker_text}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    return target


def recipe_hash(sources: Iterable[Path], packages: Iterable[str]) -> str:
    """A hex SHA-256 of what decides a built folder's bytes: the source files holding the
    recipe (dimensions, seeds, corpus) and the installed versions of ``packages``."""
    recipe = {
        "recipe": [hashlib.sha256(path.read_bytes()).hexdigest() for path in sources],
        "versions": {name: version(name) for name in packages},
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _recipe_hash() -> str:
    # The module's own source holds the whole recipe of both pipelines, so any edit to it gives
    # new folders instead of silently reusing stale ones.
    return recipe_hash([Path(__file__)], LIBRARIES_WRITING_PIPELINES)


def _train_merges() -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from the corpus with CLIP's normalisation and splitting.

    A plain Python trainer rather than ``tokenizers.trainers.BpeTrainer``: that one breaks ties
    between equally frequent pairs in hash-map order, so its merges differ from run to run.
    Here ties go to the alphabetically first pair, and the result is the same every time.
    """
    from transformers import CLIPTokenizer

    # Reuse the normaliser and pre-tokeniser of transformers' CLIP tokenizer so the merges are
    # learnt on exactly the pieces that tokenizer will later see.
    backend = CLIPTokenizer().backend_tokenizer
    word_counts: Counter[tuple[str, ...]] = Counter()
    for line in _TOKENIZER_CORPUS.splitlines():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(
            backend.normalizer.normalize_str(line)
        ):
            word_counts[(*piece[:-1], piece[-1] + "</w>")] += 1

    merges: list[tuple[str, str]] = []
    words = dict(word_counts)
    while len(merges) < _MAX_BPE_MERGES:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break  # merging pairs seen once would only memorise the corpus
        merges.append(best)
        words = {_merge_pair(word, best): count for word, count in words.items()}
    return merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace each occurrence of ``pair`` in ``word`` by the joined symbol."""
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE maps bytes onto, in byte order (as GPT-2)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, str] = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def _build_tokenizer() -> Any:
    """A ``CLIPTokenizer`` over the trained merges, with CLIP's vocabulary layout.

    As in CLIP, the vocabulary is the 256 byte symbols, the same with the end-of-word suffix,
    one entry per merge, then the start and end tokens; padding uses the end token.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = _train_merges()
    tokens = [*alphabet, *(char + "</w>" for char in alphabet)]
    tokens += [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, _BOS_TOKEN, _EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        # tokenizers wants (left, right) pairs; transformers annotates the parameter as strings.
        merges=merges,  # type: ignore[arg-type]
        bos_token=_BOS_TOKEN,
        eos_token=_EOS_TOKEN,
        pad_token=_EOS_TOKEN,
        unk_token=_EOS_TOKEN,
        model_max_length=_MODEL_MAX_LENGTH,
    )


def _text_config(tokenizer: Any) -> Any:
    """The tiny CLIP text encoder's configuration (hidden size 32, 5 layers, 4 heads)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=_MODEL_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(*, sample_size: int, scaling_factor: float) -> Any:
    """A four-level VAE (scale factor 2**3 = 8, as SDXL's and SD 1.5's) with few channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # type: ignore[no-untyped-call]
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _write_sdxl_pipeline(destination: Path) -> None:
    """Create the seeded random SDXL pipeline and save it as safetensors into ``destination``."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _build_tokenizer()
    text_config = _text_config(tokenizer)
    # One seed for the whole build, and the modules created in a fixed order, so every rebuild
    # draws the same weights; fork_rng keeps the caller's global random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=128,  # 1024 px / 8, SDXL's default resolution
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            # SDXL conditioning: the pooled text embedding (32) plus six size/crop numbers
            # embedded with 8 channels each.
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,  # both text encoders' hidden states concatenated
        )
        vae = _tiny_vae(sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )
    pipeline: Any = StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(str(destination), safe_serialization=True)


def _write_sd15_pipeline(destination: Path) -> None:
    """Create the seeded random SD 1.5 pipeline and save it as safetensors into
    ``destination``: SD 1.5's layout (one text encoder whose hidden states the UNet attends to,
    no added conditioning, no safety checker) at the tiny pipeline's sizes."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + 15)  # not the SDXL draws: a different model
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=64,  # 512 px / 8, SD 1.5's default resolution
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            cross_attention_dim=32,  # the one text encoder's hidden size
        )
        vae = _tiny_vae(sample_size=512, scaling_factor=0.18215)
    scheduler = PNDMScheduler(  # type: ignore[no-untyped-call]
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(destination), safe_serialization=True)
