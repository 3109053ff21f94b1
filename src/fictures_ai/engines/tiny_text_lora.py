"""A LoRA adapter of the bundled text model with seeded random weights, built offline.

``BUNDLED_TEXT_LORA`` names this adapter. It is a plain PEFT folder (``adapter_config.json``
plus ``adapter_model.safetensors``) of rank 8 on the four attention projections of every layer
of SmolLM2-135M-Instruct (the model :mod:`fictures_ai.engines.bundled_model` converts), with
both LoRA matrices drawn from a fixed ``torch.Generator`` seed. It teaches the model nothing:
it shifts the attention enough that greedy output differs from the base model's while staying
mostly words, which is what tests and demos of the adapter path need.

No file is downloaded. The folder (about 1.8 MB) is written once under the model cache
directory, keyed by a hash of this module and of the library versions that write it, and is
byte-identical when rebuilt with the same versions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fictures_ai.engines.tiny_pipeline import build_cached_folder, recipe_hash
from fictures_ai.shared import BUNDLED_TEXT_LORA

logger = logging.getLogger(__name__)

TINY_TEXT_LORA_MARKER = ".fictures-tiny-text-lora"
"""File written last into a finished adapter folder; its presence marks the folder."""

TINY_TEXT_LORA_RANK = 8
"""The adapter's rank: an engine needs ``max_lora_rank`` of at least this."""

_SEED = 20250301
_ALPHA = 16
# The base model (SmolLM2-135M-Instruct, see bundled_model.py): 30 layers, hidden size 576,
# 9 query heads and 3 key/value heads of 64 dimensions. (out_features, in_features) per module.
_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_NUM_LAYERS = 30
_HIDDEN = 576
_KV = 3 * 64
_MODULES: dict[str, tuple[int, int]] = {
    "q_proj": (_HIDDEN, _HIDDEN),
    "k_proj": (_KV, _HIDDEN),
    "v_proj": (_KV, _HIDDEN),
    "o_proj": (_HIDDEN, _HIDDEN),
}
# Standard deviations of A (scaled by 1/sqrt(in_features), as Kaiming initialisation) and B.
# With scaling alpha/r = 2 the update B @ A has entries of about a tenth of the base weights'
# spread (~0.2): greedy output changes within the first words and stays English. (Measured
# with PEFT: B at 0.2 already gives word salad, at 0.5 one token repeated.)
_A_STD = 1.0
_B_STD = 0.1


def build_tiny_text_lora(cache_dir: Path) -> Path:
    """Return the folder of the bundled text LoRA adapter, building it on first use.

    The folder is ``cache_dir/tiny-smollm2-lora-<hash>``, a PEFT LoRA adapter that vLLM's
    ``LoRARequest`` and PEFT's ``PeftModel.from_pretrained`` read. It is built as the tiny
    pipelines are (``tiny_pipeline.build_cached_folder``: staged, renamed into place under a file
    lock, so concurrent processes build it once and a crash never leaves half an adapter).
    Blocking (well under a second once torch is imported): call it off the event loop.
    """
    # The module's source holds the whole recipe (shapes, seed, scales): an edit to it gives a
    # new folder instead of silently reusing a stale one.
    digest = recipe_hash([Path(__file__)], ("torch", "safetensors"))
    return build_cached_folder(
        cache_dir / f"tiny-smollm2-lora-{digest[:16]}",
        marker=TINY_TEXT_LORA_MARKER,
        marker_text=BUNDLED_TEXT_LORA,
        write=_write_adapter,
        description="the bundled text LoRA adapter (random weights)",
    )


def adapter_config() -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` content (PEFT's ``LoraConfig`` fields)."""
    return {
        "base_model_name_or_path": _BASE_MODEL,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": _ALPHA,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": TINY_TEXT_LORA_RANK,
        "target_modules": sorted(_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _write_adapter(destination: Path) -> None:
    """Draw the LoRA matrices from the seed and save them with the config into
    ``destination``."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(_SEED)
    tensors: dict[str, torch.Tensor] = {}
    # A fixed drawing order (layer, then module name): the same seed gives the same numbers.
    for layer in range(_NUM_LAYERS):
        for module in sorted(_MODULES):
            out_features, in_features = _MODULES[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            lora_a = torch.randn(TINY_TEXT_LORA_RANK, in_features, generator=generator)
            lora_b = torch.randn(out_features, TINY_TEXT_LORA_RANK, generator=generator)
            tensors[f"{prefix}.lora_A.weight"] = (lora_a * (_A_STD / in_features**0.5)).to(
                torch.bfloat16
            )
            tensors[f"{prefix}.lora_B.weight"] = (lora_b * _B_STD).to(torch.bfloat16)
    save_file(tensors, str(destination / "adapter_model.safetensors"), metadata={"format": "pt"})
    text = json.dumps(adapter_config(), indent=2, sort_keys=True) + "\n"
    (destination / "adapter_config.json").write_text(text, encoding="utf-8")
