"""GPU memory readings for ``/health`` and ``/metrics``, without ever initialising CUDA.

Reading memory through torch creates a CUDA context on each device it touches (hundreds of
MiB, and seconds on a cold start), so this module only reads when this process already uses
CUDA: torch is imported and its CUDA runtime is initialised (the image pipeline runs on the
GPU). Otherwise it reports None. vLLM's engine runs in its own process, but ``used_bytes``
is the device-wide figure and so includes it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """Memory of one CUDA device: device-wide use and total, and what this process allocated."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int
    allocated_bytes: int


def gpu_memory() -> list[GpuMemory] | None:
    """Memory of each CUDA device this process uses, or None when it does not use CUDA."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        # Only devices this process already has a context on: asking any other device would
        # create one there. Without torch's check, only the current device is known to be safe.
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        if has_context is not None:
            indices = [i for i in range(cuda.device_count()) if has_context(i)]
        else:
            indices = [cuda.current_device()]
        devices = []
        for index in indices:
            free, total = cuda.mem_get_info(index)
            devices.append(
                GpuMemory(
                    index=index,
                    name=str(cuda.get_device_name(index)),
                    used_bytes=int(total - free),
                    total_bytes=int(total),
                    allocated_bytes=int(cuda.memory_allocated(index)),
                )
            )
    except Exception:
        # A health probe must answer even when the driver misbehaves.
        logger.warning("Reading GPU memory failed", exc_info=True)
        return None
    return devices
