"""CPU seconds a process spent in a phase of a benchmark: what the phase cost, not how long.

Wall-clock figures on a shared 2-core machine move with whatever else runs there; the CPU time
a server process burns for a given amount of work (1000 streamed tokens, one image) moves much
less. So each measured phase reads the user + system time of the process under test, and of
its child processes (vLLM's engine core), before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """User + system CPU seconds of one process (``own``) and of its live descendants."""

    own: float
    children: float

    def __sub__(self, earlier: CpuTimes) -> CpuTimes:
        return CpuTimes(own=self.own - earlier.own, children=self.children - earlier.children)


def cpu_times(pid: int | None = None) -> CpuTimes:
    """The CPU seconds so far of process ``pid`` (this process when None) and its children.

    Descendants are found anew on each call; one that exits between two calls drops out of
    the sum, so compare readings only across phases in which no child starts or ends.
    """
    process = psutil.Process(pid)
    own = process.cpu_times()
    children = 0.0
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        children += times.user + times.system
    return CpuTimes(own=own.user + own.system, children=children)


def per_1k(seconds: float, units: int) -> float:
    """CPU seconds per 1000 units (tokens), rounded for the results; 0.0 for no units."""
    return round(seconds * 1000 / units, 4) if units else 0.0
