"""Test-session wide hooks."""

from __future__ import annotations

import sys

import pytest

# The private PostgreSQL server fixture, for the integration and end-to-end tests that use it.
pytest_plugins = ["tests.postgres"]


FUZZ_MODULES = {
    "tests.unit.test_openapi_fuzz": "fake engines",
    "tests.e2e.test_openapi_fuzz_engines": "real engines",
}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how many generated cases each schemathesis run sent, when it ran."""
    for module, engines in FUZZ_MODULES.items():
        cases: list[str] = getattr(sys.modules.get(module), "CASES_RUN", [])
        if cases:
            operations = len(set(cases))
            terminalreporter.write_line(
                f"schemathesis ({engines}): {len(cases)} generated requests across "
                f"{operations} operations"
            )
