"""vLLM's scheduler figures: what the engine's stat logger keeps of each step, and the engine
arguments that turn prefix caching and speculative decoding on (vLLM's own classes, no model)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager
from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats
from vllm.v1.spec_decode.metrics import SpecDecodingProm, SpecDecodingStats

from fictures_ai.config import Settings
from fictures_ai.engines.vllm_engine import SchedulerTally, build_engine_args, stat_logger_for
from fictures_ai.observability.metrics import VLLM_FAMILIES
from fictures_ai.services.engine_factory import text_engine_options
from fictures_ai.shared import EngineStats


def step(
    *,
    running: int = 0,
    waiting: int = 0,
    deferred: int = 0,
    kv_cache_usage: float = 0.0,
    prefix: PrefixCacheStats | None = None,
    spec: SpecDecodingStats | None = None,
) -> SchedulerStats:
    """One engine step's figures, as vLLM's scheduler makes them."""
    return SchedulerStats(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_skipped_waiting_reqs=deferred,
        kv_cache_usage=kv_cache_usage,
        prefix_cache_stats=prefix or PrefixCacheStats(),
        spec_decoding_stats=spec,
    )


def test_the_tally_keeps_the_last_steps_gauges_and_sums_the_prefix_cache() -> None:
    tally = SchedulerTally()
    assert tally.snapshot() == EngineStats(
        running=0, waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0
    )
    # Two new requests: 300 prompt tokens looked up, 128 found.
    tally.record(
        step(
            running=2,
            waiting=1,
            kv_cache_usage=0.1,
            prefix=PrefixCacheStats(requests=2, queries=300, hits=128),
        )
    )
    # Decode steps schedule no new request: nothing looked up.
    tally.record(step(running=2, waiting=1, kv_cache_usage=0.2))
    # A third request, and a preempted one coming back, which vLLM's own counters leave out.
    prefix = PrefixCacheStats(requests=1, queries=300, hits=256)
    prefix.record(num_tokens=100, num_hits=100, preempted=True)
    tally.record(step(running=3, waiting=1, deferred=2, kv_cache_usage=0.4, prefix=prefix))
    assert tally.snapshot() == EngineStats(
        running=3, waiting=3, kv_cache_usage=0.4, prefix_cache_queries=600, prefix_cache_hits=384
    )


def test_the_stat_logger_is_the_only_one_vllm_keeps_and_feeds_the_tally() -> None:
    tally = SchedulerTally()
    # As AsyncLLM builds it with disable_log_stats=True and our stat_loggers.
    manager = StatLoggerManager(
        vllm_config=cast(Any, None),
        engine_idxs=[0],
        custom_stat_loggers=[stat_logger_for(tally)],
        enable_default_loggers=False,
    )
    # No PrometheusStatLogger of vLLM's own recording every step into the global registry.
    assert len(manager.stat_loggers) == 1
    manager.log_engine_initialized()
    manager.record(
        scheduler_stats=step(
            running=1, kv_cache_usage=0.5, prefix=PrefixCacheStats(requests=1, queries=64, hits=32)
        ),
        iteration_stats=None,
        engine_idx=0,
    )
    manager.record(scheduler_stats=None, iteration_stats=None, engine_idx=0)
    manager.record_sleep_state(1, 0)
    manager.record_admission_rejection("max_num_queued_reqs")
    manager.log()
    assert tally.snapshot() == EngineStats(
        running=1, waiting=0, kv_cache_usage=0.5, prefix_cache_queries=64, prefix_cache_hits=32
    )


def test_the_tally_sums_speculative_drafts_and_accepted_tokens() -> None:
    tally = SchedulerTally()
    first = SpecDecodingStats.new(num_spec_tokens=4)
    first.observe_draft(num_draft_tokens=4, num_accepted_tokens=3)
    first.observe_draft(num_draft_tokens=2, num_accepted_tokens=0)
    tally.record(step(running=2, spec=first))
    tally.record(step(running=2))  # a step that verified nothing (e.g. only a prefill)
    second = SpecDecodingStats.new(num_spec_tokens=4)
    second.observe_draft(num_draft_tokens=4, num_accepted_tokens=4)
    tally.record(step(running=1, spec=second))
    figures = tally.snapshot()
    assert (figures.spec_decode_num_drafts, figures.spec_decode_num_draft_tokens) == (3, 10)
    assert figures.spec_decode_num_accepted_tokens == 7


def test_vllms_own_prometheus_logger_names_what_we_export() -> None:
    # Our names are vLLM's with our prefix: vLLM must still use those names.
    source = inspect.getsource(PrometheusStatLogger) + inspect.getsource(SpecDecodingProm)
    for theirs in VLLM_FAMILIES.values():
        assert f'"{theirs}"' in source, theirs


def test_speculative_decoding_is_off_by_default_and_ngram_reaches_vllm(tmp_path: Path) -> None:
    # Off: at the Fictures temperature (0.7) it lost to no speculation (docs/benchmarks.md).
    default = Settings(_env_file=None, model_cache_dir=tmp_path)  # type: ignore[call-arg]
    assert build_engine_args(text_engine_options(default), str(tmp_path)).speculative_config is None
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, model_cache_dir=tmp_path, text_speculative_method="ngram"
    )
    args = build_engine_args(text_engine_options(settings), str(tmp_path))
    assert args.speculative_config == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    }


def test_speculative_decoding_settings_reach_vllm(tmp_path: Path) -> None:
    draft = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model_cache_dir=tmp_path,
        text_speculative_method="draft_model",
        text_speculative_model="/models/draft",
        text_num_speculative_tokens=3,
    )
    args = build_engine_args(text_engine_options(draft), str(tmp_path))
    assert args.speculative_config == {
        "method": "draft_model",
        "num_speculative_tokens": 3,
        "model": "/models/draft",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"text_speculative_method": "draft_model"},
            "TEXT_SPECULATIVE_METHOD=draft_model needs TEXT_SPECULATIVE_MODEL",
        ),
        (
            {"text_speculative_model": "/models/draft"},
            "TEXT_SPECULATIVE_MODEL is used only with TEXT_SPECULATIVE_METHOD=draft_model (it is "
            "none)",
        ),
        (
            {"text_prompt_lookup_min": 5},
            "TEXT_PROMPT_LOOKUP_MIN (5) must be at least 1 and at most TEXT_PROMPT_LOOKUP_MAX (4)",
        ),
    ],
)
def test_speculative_settings_that_cannot_work_are_refused_naming_them(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize("enabled", [True, False])
def test_prefix_caching_is_asked_for_explicitly(enabled: bool, tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, model_cache_dir=tmp_path, text_enable_prefix_caching=enabled
    )
    args = build_engine_args(text_engine_options(settings), str(tmp_path))
    assert args.enable_prefix_caching is enabled
    assert args.disable_log_stats is True


def test_prefix_caching_is_on_by_default() -> None:
    assert Settings(_env_file=None).text_enable_prefix_caching is True  # type: ignore[call-arg]
