"""What loaded models cost: measured, never guessed.

On a CPU the figure is the resident memory (RSS) of this process and all its children: vLLM's
engine core runs in a child process and holds the text model's weights and KV cache there. On
CUDA it is the device-wide memory in use on every GPU, read through NVML (``nvidia-ml-py``,
installed with vLLM's GPU build), which sees the engine processes too and never creates a CUDA
context in this one.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

import psutil

logger = logging.getLogger(__name__)

MemoryKind = Literal["ram", "gpu"]

GIB = 1 << 30


class MemoryProbe:
    """Reads the memory the budget counts: ``ram`` (process tree RSS) or ``gpu`` (NVML)."""

    def __init__(self, kind: MemoryKind) -> None:
        self.kind = kind
        self._process = psutil.Process()

    @classmethod
    def for_this_machine(cls) -> MemoryProbe:
        """``gpu`` where NVML sees a GPU, else ``ram``."""
        return cls("gpu" if _nvml() is not None else "ram")

    def used_bytes(self) -> int:
        """Bytes in use now (see the module docstring for what counts)."""
        if self.kind == "gpu":
            return _gpu_used_bytes()
        return process_tree_rss(self._process)


def process_tree_rss(process: psutil.Process) -> int:
    """RSS of ``process`` and all its descendants (bytes); processes that end meanwhile are
    skipped."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return int(total)


def _nvml() -> Any:
    try:
        pynvml = importlib.import_module("pynvml")  # nvidia-ml-py: only in GPU installs
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
    except pynvml.NVMLError:
        return None
    return pynvml


def _gpu_used_bytes() -> int:
    pynvml = _nvml()
    if pynvml is None:
        return 0
    return sum(
        int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        for index in range(pynvml.nvmlDeviceGetCount())
    )
