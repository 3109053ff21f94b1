"""Test-session wide hooks."""

from __future__ import annotations

import sys

import pytest

# The private PostgreSQL server fixture, for the integration and end-to-end tests that use it.
pytest_plugins = ["tests.postgres"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how many generated cases the schemathesis run sent, when it ran."""
    fuzz = sys.modules.get("tests.unit.test_openapi_fuzz")
    cases: list[str] = getattr(fuzz, "CASES_RUN", [])
    if cases:
        operations = len(set(cases))
        terminalreporter.write_line(
            f"schemathesis: {len(cases)} generated requests across {operations} operations"
        )
