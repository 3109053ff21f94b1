"""The bundled text LoRA adapter: a PEFT folder built offline, the same bytes every time."""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig
from safetensors import safe_open

from fictures_ai.engines.tiny_text_lora import (
    TINY_TEXT_LORA_MARKER,
    TINY_TEXT_LORA_RANK,
    build_tiny_text_lora,
)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_rebuilding_gives_the_same_bytes(tmp_path: Path) -> None:
    first = build_tiny_text_lora(tmp_path / "one")
    second = build_tiny_text_lora(tmp_path / "two")
    assert first.name == second.name  # keyed by the recipe, not by where it is built
    first_files, second_files = _files(first), _files(second)
    assert set(first_files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        TINY_TEXT_LORA_MARKER,
    }
    assert first_files == second_files


def test_a_built_adapter_is_reused_and_no_staging_folder_is_left(tmp_path: Path) -> None:
    folder = build_tiny_text_lora(tmp_path)
    weights = folder / "adapter_model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert build_tiny_text_lora(tmp_path) == folder
    assert weights.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder.name, folder.name + ".lock"]


def test_it_is_a_rank_8_lora_of_every_attention_projection_that_peft_reads(
    tmp_path: Path,
) -> None:
    folder = build_tiny_text_lora(tmp_path)
    config = LoraConfig.from_pretrained(str(folder))
    assert config.r == TINY_TEXT_LORA_RANK == 8
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # SmolLM2-135M: 30 layers, hidden 576, 3 key/value heads of 64.
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert len(names) == 30 * 4 * 2
        prefix = "base_model.model.model.layers.29.self_attn"
        assert handle.get_slice(f"{prefix}.k_proj.lora_A.weight").get_shape() == [8, 576]
        assert handle.get_slice(f"{prefix}.k_proj.lora_B.weight").get_shape() == [192, 8]
        # Both matrices are drawn, unlike a fresh PEFT adapter whose B is zero (no effect).
        assert handle.get_tensor(f"{prefix}.q_proj.lora_B.weight").abs().sum() > 0
        assert handle.get_tensor(f"{prefix}.q_proj.lora_A.weight").abs().sum() > 0
