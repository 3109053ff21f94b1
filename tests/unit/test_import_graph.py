"""The import graph keeps the layers docs/architecture.md draws (contracts in pyproject.toml's
``[tool.importlinter]``): cli > api > services > config | engines > observability | database >
errors | redaction | shared, no HTTP below the API layer, no cycles at any depth.

import-linter reads every import, including those inside functions and under
``TYPE_CHECKING``, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on ``project`` (a folder with pyproject.toml and src/fictures_ai)."""
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())",
            "pyproject.toml",
            "--no-cache",
            "--no-logo",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_graph_keeps_the_layers_and_has_no_cycles() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_a_breach_is_caught(tmp_path: Path) -> None:
    # An engine that imports the settings, hidden in a function: the cycle the layers forbid.
    shutil.copytree(ROOT / "src" / "fictures_ai", tmp_path / "src" / "fictures_ai")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "src" / "fictures_ai" / "engines" / "base.py"
    base.write_text(
        base.read_text() + "\n\ndef _settings() -> object:\n"
        "    from fictures_ai.api.app import create_app\n\n    return create_app\n"
    )

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    assert "fictures_ai.engines.base -> fictures_ai.api.app" in result.stdout
