"""A LoRA adapter of the tiny SDXL pipeline with seeded random weights, built offline.

The adapter (``BUNDLED_TINY_SDXL_LORA``) adds rank-4 LoRA layers to the attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of the tiny SDXL pipeline's UNet
(:mod:`fictures_ai.engines.tiny_pipeline`), with both LoRA matrices drawn at random from a fixed
seed (peft's ``init_lora_weights=False``, the up matrices scaled by 8). At weight 1.0 it changes
the image a seed renders by about 19 of 255 per pixel and channel on average (256x256, 4
steps); the random VAE's group norms keep the overall colours, so what changes is the texture
of the noise, not a style a person would name. It is written the way diffusers' training
scripts write LoRAs (peft's state dict, converted to diffusers' names, saved with
``StableDiffusionXLPipeline.save_lora_weights``), so ``pipeline.load_lora_weights`` reads it as
it reads any SDXL LoRA. It fits only the tiny SDXL pipeline: others refuse it (the tiny SD 1.5
UNet attends to 32 channels, not 64), which is what tests of adapter validation need.

Like the tiny pipelines it is built once under the model cache directory (about 0.2 MB, well
under a second once diffusers and peft are imported), keyed by a hash of this module, of the
pipeline's recipe and of the library versions, and is byte-identical when rebuilt.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fictures_ai.engines import tiny_pipeline
from fictures_ai.engines.tiny_pipeline import (
    LIBRARIES_WRITING_PIPELINES,
    build_cached_folder,
    build_tiny_sdxl_pipeline,
    recipe_hash,
)

logger = logging.getLogger(__name__)

TINY_SDXL_LORA_NAME = "tiny-sdxl-lora"
"""The adapter's own name (what its folder's marker holds)."""

TINY_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The weights file in the adapter's folder (diffusers' default LoRA file name)."""

TINY_LORA_MARKER = ".fictures-tiny-lora"
"""File written last into a finished adapter folder; its presence marks the folder."""

_SEED = 20240301
_RANK = 4
_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
_B_SCALE = 8.0


def build_tiny_sdxl_lora(cache_dir: Path) -> Path:
    """Return the path of the tiny SDXL LoRA's weights file, building it (and the tiny SDXL
    pipeline it belongs to) on first use.

    The file is ``cache_dir/tiny-sdxl-lora-<hash>/pytorch_lora_weights.safetensors``, a
    diffusers LoRA that ``StableDiffusionXLPipeline.load_lora_weights`` loads (the folder loads
    too). Built as :func:`~fictures_ai.engines.tiny_pipeline.build_cached_folder` builds: once,
    atomically, under a file lock. Blocking (a second or two when the pipeline is built too):
    call it off the event loop.
    """
    pipeline = build_tiny_sdxl_pipeline(cache_dir)
    digest = recipe_hash(
        [Path(__file__), Path(tiny_pipeline.__file__)], (*LIBRARIES_WRITING_PIPELINES, "peft")
    )
    folder = build_cached_folder(
        cache_dir / f"{TINY_SDXL_LORA_NAME}-{digest[:16]}",
        marker=TINY_LORA_MARKER,
        marker_text=TINY_SDXL_LORA_NAME,
        write=functools.partial(_write_lora, pipeline=pipeline),
        description="the tiny SDXL LoRA (random weights)",
    )
    return folder / TINY_LORA_WEIGHT_NAME


def _write_lora(destination: Path, *, pipeline: Path) -> None:
    """Draw the seeded LoRA for the UNet of the tiny SDXL ``pipeline`` folder and save it into
    ``destination``."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(pipeline / "unet"))  # type: ignore[no-untyped-call]
    config = LoraConfig(
        r=_RANK,
        # lora_alpha = r: scale 1, which is also what diffusers assumes for a file that does
        # not record its alpha.
        lora_alpha=_RANK,
        target_modules=list(_TARGET_MODULES),
        # Random A and B (peft's default makes B zero, an adapter that changes nothing).
        init_lora_weights=False,
    )
    # peft creates the LoRA layers module by module in a fixed order, drawing from torch's
    # global generator: one seed gives the same weights every time; fork_rng keeps the
    # caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet.add_adapter(config)
    # Scaled up: at peft's initial size the change hides in the noise the random VAE draws.
    peft_state = {
        key: tensor * _B_SCALE if ".lora_B." in key else tensor
        for key, tensor in get_peft_model_state_dict(unet).items()
    }
    layers = convert_state_dict_to_diffusers(peft_state)  # type: ignore[no-untyped-call]
    StableDiffusionXLPipeline.save_lora_weights(
        str(destination),
        unet_lora_layers=layers,
        weight_name=TINY_LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
