"""Settings: legacy variable names, validation messages, .env.example and the CLI flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fictures_ai.cli import build_parser
from fictures_ai.cli.serve import add_settings_flags, settings_from
from fictures_ai.config import Settings, describe_settings_error, setting_name_warnings

ROOT = Path(__file__).resolve().parents[2]


def test_the_original_deployment_variable_names_still_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "TEXT_MODEL_NAME": "google/gemma-2b-it",
        "TEXT_MAX_MODEL_LEN": "4096",
        "TEXT_GPU_MEMORY_UTILIZATION": "0.8",
        "VLLM_TENSOR_PARALLEL_SIZE": "1",
        "VLLM_MAX_NUM_SEQS": "64",
        "VLLM_QUANTIZATION": "awq",
        "CORS_ORIGINS": "https://a.example,https://b.example",
        "API_HOST": "127.0.0.1",
        "API_PORT": "9000",
        "LOG_LEVEL": "DEBUG",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.text_model_name == "google/gemma-2b-it"
    assert settings.text_max_model_len == 4096
    assert settings.text_gpu_memory_utilization == 0.8
    assert settings.text_max_num_seqs == 64
    assert settings.text_quantization == "awq"
    assert settings.cors_origins_list == ["https://a.example", "https://b.example"]
    assert (settings.api_host, settings.api_port, settings.log_level) == (
        "127.0.0.1",
        9000,
        "DEBUG",
    )


def test_the_new_names_win_over_the_original_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "64")
    monkeypatch.setenv("TEXT_MAX_NUM_SEQS", "32")
    assert Settings(_env_file=None).text_max_num_seqs == 32  # type: ignore[call-arg]


def test_no_setting_of_ours_is_read_from_vllms_namespace() -> None:
    # vLLM reads VLLM_* itself and warns about names it does not know; ours are TEXT_*, with
    # the original deployment's three names accepted as aliases only.
    names = {name.upper() for name in Settings.model_fields}
    assert not [name for name in names if name.startswith("VLLM_")]
    example = (ROOT / ".env.example").read_text()
    assert not re.findall(r"^#?\s*VLLM_[A-Z_]+=", example, flags=re.MULTILINE)


def test_the_original_ai_servers_generation_mode_variable_still_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AI_SERVER_GENERATION_MODE", "both")
    assert Settings(_env_file=None).generation_mode == "all"  # type: ignore[call-arg]
    monkeypatch.setenv("AI_SERVER_GENERATION_MODE", "IMAGE")
    assert Settings(_env_file=None).generation_mode == "image"  # type: ignore[call-arg]
    monkeypatch.setenv("GENERATION_MODE", "text")
    assert Settings(_env_file=None).generation_mode == "text"  # type: ignore[call-arg]


def test_tensor_parallel_needs_that_many_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("TEXT_TENSOR_PARALLEL_SIZE", "4")
    with pytest.raises(ValidationError, match="CUDA_VISIBLE_DEVICES=0,1 lists 2"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("API_PORT", "70000", "less than or equal to 65535"),
        ("TEXT_GPU_MEMORY_UTILIZATION", "1.5", "less than or equal to 1"),
        ("CORS_ORIGINS", "fictures.example", "must start with http"),
        ("TEXT_PROMPT_FORMAT", "xml", "'chat' or 'raw'"),
        ("API_KEY_STORE", "fictures", "API_KEY_STORE=fictures needs FICTURES_DATABASE_URL"),
        ("API_KEY_PEPPER", "too-short", "at least 32 characters"),
        ("GENERATION_MODE", "audio", "'all', 'text' or 'image'"),
        ("TEXT_STRUCTURED_OUTPUTS_BACKEND", "auto", "cannot keep JSON compact"),
    ],
)
def test_bad_values_fail_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_passwords_in_urls_are_masked_in_the_start_up_log() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url="postgresql://server:s3cret@db:5432/fictures_ai",
        api_key_store="fictures",
        fictures_database_url="postgresql://web:hunter2@db/fictures",
        redis_url="redis://:r3dis@cache:6379/0",
        rate_limit_tokens_per_minute=1000,
    )
    changed = settings.non_default_items()
    assert changed["database_url"] == "postgresql://server:***@db:5432/fictures_ai"
    assert changed["fictures_database_url"] == "postgresql://web:***@db/fictures"
    assert changed["redis_url"] == "redis://:***@cache:6379/0"
    assert changed["api_key_store"] == "fictures"  # not a secret, shown as it is
    assert changed["rate_limit_tokens_per_minute"] == 1000
    assert "s3cret" not in str(changed)


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    entries = dict(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE),
    )
    fields = Settings.model_fields
    assert set(entries) == {name.upper() for name in fields}
    for name, info in fields.items():
        default = info.get_default(call_default_factory=True)
        if name in ("model_cache_dir", "jobs_dir"):
            continue  # depends on the user's home directory
        expected = "" if default is None else str(getattr(default, "value", default))
        if isinstance(default, bool):
            expected = str(default).lower()
        assert entries[name.upper()] == expected, name


def test_serve_flags_mirror_the_settings() -> None:
    args = build_parser().parse_args(
        ["serve", "--api-port", "9100", "--no-text-enforce-eager", "--text-prompt-format", "raw"]
    )
    settings = settings_from(args)
    assert settings.api_port == 9100
    assert settings.text_enforce_eager is False
    assert settings.text_prompt_format == "raw"
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in parser._option_string_actions
    # Every description shows as written, a '%' in it too.
    shown = " ".join(parser.format_help().split())
    for info in Settings.model_fields.values():
        assert " ".join(str(info.description).split()) in shown
    assert "option_strings" not in shown  # what argparse printed for "10% slower"
    # Each flag names the variables it stands for, original names included.
    assert "[env TEXT_MAX_NUM_SEQS or VLLM_MAX_NUM_SEQS]" in shown
    assert "[env GENERATION_MODE or AI_SERVER_GENERATION_MODE]" in shown


def test_non_default_settings_mask_secrets() -> None:
    settings = Settings(_env_file=None, api_port=9001)  # type: ignore[call-arg]
    assert settings.non_default_items() == {"api_port": 9001}


def test_errors_name_the_variables_a_user_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_SERVER_GENERATION_MODE", "bogus")
    monkeypatch.setenv("FICTURES_DATABASE_URL", "mysql://web:hunter2@db/fictures")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    described = describe_settings_error(caught.value)
    assert "GENERATION_MODE or AI_SERVER_GENERATION_MODE='bogus': Input should be" in described
    assert "FICTURES_DATABASE_URL='mysql://web:***@db/fictures': must be a PostgreSQL URL" in (
        described
    )
    assert "hunter2" not in described


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker compose passes ${GENERATION_MODE} through as an empty string when it is unset.
    monkeypatch.setenv("GENERATION_MODE", "")
    monkeypatch.setenv("AI_SERVER_GENERATION_MODE", "image")
    monkeypatch.setenv("DATABASE_URL", "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.generation_mode == "image"
    assert settings.database_url is None


def test_names_this_server_no_longer_reads_are_reported(tmp_path: Path) -> None:
    # 0.1 read VLLM_DTYPE, VLLM_ENFORCE_EAGER...: an upgraded .env must not lose them silently.
    env_file = tmp_path / ".env"
    env_file.write_text("VLLM_ENFORCE_EAGER=false\n")
    warnings = setting_name_warnings({"VLLM_DTYPE": "float32"}, env_file)
    assert warnings == [
        "VLLM_DTYPE is no longer read by this server (set TEXT_DTYPE instead); it is left to "
        "vLLM, which does not know it",
        "VLLM_ENFORCE_EAGER is no longer read by this server (set TEXT_ENFORCE_EAGER instead); "
        "it is left to vLLM, which does not know it",
    ]
    assert setting_name_warnings({"VLLM_DTYPE": "float32", "TEXT_DTYPE": "auto"}, None) == []


def test_an_original_name_beside_its_new_one_is_reported() -> None:
    warnings = setting_name_warnings({"VLLM_MAX_NUM_SEQS": "abc", "TEXT_MAX_NUM_SEQS": "8"}, None)
    assert warnings == [
        "TEXT_MAX_NUM_SEQS and VLLM_MAX_NUM_SEQS are both set: TEXT_MAX_NUM_SEQS is used"
    ]
    assert setting_name_warnings({"VLLM_MAX_NUM_SEQS": "4"}, None) == []
