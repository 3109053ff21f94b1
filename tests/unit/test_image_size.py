"""Any size in 256..2048: render at a size the pipeline takes, crop evenly to the request."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from fictures_ai.engines.base import centre_crop_box, covering_size
from fictures_ai.engines.diffusers_engine import DiffusersImageEngine, ResolvedImageModel
from tests.support import WEB_APP_SIZES

SIDES = range(256, 2049)


@pytest.mark.parametrize("multiple", [8, 16])
def test_every_side_in_range_is_covered_and_cropped_to_exactly_its_size(multiple: int) -> None:
    for side in SIDES:
        width, height = side, 2304 - side  # every width, with heights across the range too
        rendered = covering_size(width, height, multiple=multiple)
        assert rendered[0] % multiple == 0
        assert rendered[1] % multiple == 0
        assert width <= rendered[0] < width + multiple
        assert height <= rendered[1] < height + multiple
        assert rendered[0] <= 2048  # 2048 is a multiple of both: never beyond the range
        left, top, right, bottom = centre_crop_box(rendered, (width, height))
        assert (right - left, bottom - top) == (width, height)
        assert left >= 0
        assert top >= 0
        assert right <= rendered[0]
        assert bottom <= rendered[1]
        # Even: the two sides lose the same number of pixels, or one more on the far side.
        assert rendered[0] - right - left in (0, 1)
        assert rendered[1] - bottom - top in (0, 1)


@pytest.mark.parametrize(("width", "height"), WEB_APP_SIZES)
def test_the_web_apps_sizes_come_out_exact_after_the_crop(width: int, height: int) -> None:
    rendered = covering_size(width, height, multiple=8)
    image = Image.new("RGB", rendered)
    assert image.crop(centre_crop_box(rendered, (width, height))).size == (width, height)


def _engine(pipeline: object) -> DiffusersImageEngine:
    model = ResolvedImageModel(source="fake", name="fake", is_tiny=False)
    return DiffusersImageEngine(pipeline, model=model, device="cpu", dtype=None)  # type: ignore[arg-type]


def test_render_size_follows_the_pipelines_multiple() -> None:
    unet_pipeline = SimpleNamespace(vae_scale_factor=8, transformer=None)
    transformer_pipeline = SimpleNamespace(vae_scale_factor=8, transformer=object())
    assert _engine(unet_pipeline).render_size(1344, 756) == (1344, 760)
    assert _engine(unet_pipeline).render_size(768, 1365) == (768, 1368)
    assert _engine(transformer_pipeline).render_size(1344, 756) == (1344, 768)
    assert _engine(transformer_pipeline).render_size(1001, 1000) == (1008, 1008)
