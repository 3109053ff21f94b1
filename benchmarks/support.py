"""What the benchmark scripts share: what they ran on (recorded with every results file) and
how they stop the servers they start."""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import os
import platform
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def describe_machine(packages: Iterable[str]) -> dict[str, Any]:
    """CPU model and count, memory (GiB), platform, Python, and each of ``packages``'
    installed version (None when it is not installed)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def stop(process: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; waits for the process."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
