"""Peak memory of one call on CPU, where PyTorch keeps no allocator statistics.

Linux: the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over the
RSS before the call, after returning freed memory to the OS (malloc_trim). Creating a
StepMemory makes every large allocation its own mapping (mallopt), which slows allocation for
the rest of the process: time first, then measure memory. ``peak_bytes`` uses the CUDA
allocator's statistics on CUDA and a StepMemory on CPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class StepMemory:
    """Peak RSS growth of one call, in bytes (None where /proc/self/clear_refs is unavailable)."""

    def __init__(self):
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name else None
        if self._libc is not None and hasattr(self._libc, "mallopt"):
            # every allocation above 64 kB gets its own mapping, returned to the OS when freed, so
            # RSS follows the live tensors (glibc would otherwise raise the threshold and reuse
            # freed heap memory without RSS growth)
            self._libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        self.available = self._reset_peak()

    def _reset_peak(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def measure(self, fn) -> Optional[int]:
        """Peak RSS growth of fn() in bytes, or None where unavailable."""
        if not self.available:
            fn()
            return None
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        self._reset_peak()
        before = self._status_kb("VmRSS")
        fn()
        return (self._status_kb("VmHWM") - before) * 1024


def peak_bytes(fn, device: str, memory: Optional[StepMemory]) -> Optional[int]:
    """Peak memory of fn(): the CUDA allocator's peak over what was allocated before, or on CPU
    ``memory.measure`` (create the StepMemory after all timing)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return memory.measure(fn)
