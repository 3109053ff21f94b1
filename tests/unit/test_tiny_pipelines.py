"""The offline tiny image assets: the SD 1.5 pipeline and the SDXL LoRA rebuild byte for byte,
load with the classes diffusers picks for them, and are named without being built."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fictures_ai.engines.diffusers_engine import describe_source
from fictures_ai.engines.tiny_image_lora import TINY_LORA_WEIGHT_NAME, build_tiny_sdxl_lora
from fictures_ai.engines.tiny_pipeline import (
    TINY_IMAGE_MODEL,
    TINY_PIPELINE_MARKER,
    TINY_SD15_IMAGE_MODEL,
    build_tiny_sd15_pipeline,
    build_tiny_sdxl_pipeline,
    is_tiny_pipeline,
    tiny_pipeline_name,
)
from fictures_ai.shared import BUNDLED_TINY_SD15, BUNDLED_TINY_SDXL


def file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def test_the_sd15_pipeline_rebuilds_byte_identical(cache_dir: Path, tmp_path: Path) -> None:
    first = build_tiny_sd15_pipeline(cache_dir)
    second = build_tiny_sd15_pipeline(tmp_path)

    assert first.name == second.name
    assert file_digests(first) == file_digests(second)
    assert "unet/diffusion_pytorch_model.safetensors" in file_digests(first)
    assert "text_encoder_2" not in {path.split("/")[0] for path in file_digests(first)}


def test_the_sdxl_lora_rebuilds_byte_identical(cache_dir: Path, tmp_path: Path) -> None:
    first = build_tiny_sdxl_lora(cache_dir)
    second = build_tiny_sdxl_lora(tmp_path)

    assert first.name == TINY_LORA_WEIGHT_NAME
    assert first.parent.name == second.parent.name
    assert file_digests(first.parent) == file_digests(second.parent)
    # Built beside the pipeline it belongs to.
    assert (cache_dir / build_tiny_sdxl_pipeline(cache_dir).name).is_dir()


def test_the_sd15_pipeline_loads_as_stable_diffusion(cache_dir: Path) -> None:
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(
        str(build_tiny_sd15_pipeline(cache_dir)), use_safetensors=True
    )

    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae_scale_factor == 8


def test_the_sdxl_lora_loads_into_every_attention_projection(cache_dir: Path) -> None:
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(
        str(build_tiny_sdxl_pipeline(cache_dir)), use_safetensors=True
    )
    pipeline.load_lora_weights(str(build_tiny_sdxl_lora(cache_dir)), adapter_name="style")

    assert pipeline.get_list_adapters() == {"unet": ["style"]}
    projections = [
        name
        for name, _ in pipeline.unet.named_modules()
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    assert projections
    assert all(hasattr(pipeline.unet.get_submodule(name), "lora_A") for name in projections)


def test_the_tiny_pipelines_are_named_by_their_marker(cache_dir: Path, tmp_path: Path) -> None:
    assert tiny_pipeline_name(build_tiny_sdxl_pipeline(cache_dir)) == TINY_IMAGE_MODEL
    assert tiny_pipeline_name(build_tiny_sd15_pipeline(cache_dir)) == TINY_SD15_IMAGE_MODEL
    assert tiny_pipeline_name(tmp_path) is None
    assert tiny_pipeline_name("stabilityai/stable-diffusion-xl-base-1.0") is None
    assert not is_tiny_pipeline(tmp_path)
    # A folder built before the SD 1.5 pipeline existed has an empty or SDXL-named marker.
    (tmp_path / TINY_PIPELINE_MARKER).write_text("")
    assert tiny_pipeline_name(tmp_path) == TINY_IMAGE_MODEL


def test_sources_are_described_without_building_anything(tmp_path: Path) -> None:
    for source, name in (
        (BUNDLED_TINY_SDXL, TINY_IMAGE_MODEL),
        (BUNDLED_TINY_SD15, TINY_SD15_IMAGE_MODEL),
    ):
        described = describe_source(source)
        assert (described.source, described.name, described.is_tiny) == (source, name, True)
    hub = describe_source("stabilityai/stable-diffusion-xl-base-1.0")
    assert (hub.name, hub.is_tiny) == ("stabilityai/stable-diffusion-xl-base-1.0", False)
    folder = describe_source(str(tmp_path) + "/")
    assert (folder.name, folder.is_tiny) == (tmp_path.name, False)
    assert list(tmp_path.iterdir()) == []
