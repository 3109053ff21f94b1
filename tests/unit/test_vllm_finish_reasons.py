"""vLLM's finish reasons as ours: every reason vLLM can report either maps to one of ours or
fails the request; none turns silently into "stop"."""

from __future__ import annotations

import pytest
from vllm.v1.engine import FINISH_REASON_STRINGS, FinishReason

from fictures_ai.engines.vllm_engine import finish_reason_of
from fictures_ai.errors import GenerationError


@pytest.mark.parametrize(
    ("reason", "ours"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), ("repetition", "stop")],
)
def test_vllm_reasons_that_end_an_answer_map_to_ours(reason: str, ours: str) -> None:
    assert finish_reason_of(reason, "r1") == ours


@pytest.mark.parametrize("reason", [str(FinishReason.ERROR), None, "a-reason-from-a-later-vllm"])
def test_an_error_or_unknown_finish_fails_the_request(reason: str | None) -> None:
    with pytest.raises(GenerationError, match="internal error") as raised:
        finish_reason_of(reason, "r1")
    assert repr(reason) in raised.value.message


def test_every_reason_this_vllm_reports_is_decided() -> None:
    """A vLLM upgrade that adds a finish reason fails here until it is mapped (or left to fail
    the request, like ``error``)."""
    assert set(FINISH_REASON_STRINGS) == {"stop", "length", "abort", "repetition", "error"}
