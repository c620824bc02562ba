"""glibc malloc settings for a training worker: keep freed memory for the next step.

A training step allocates and frees the same large activation and gradient
buffers every step. With glibc's defaults a freed buffer above the (dynamic)
mmap threshold goes back to the kernel, and a thread arena's heap is trimmed
whenever its free top exceeds the trim threshold, so the next step faults the
same pages in again, each one zeroed by the kernel. Measured in a Ray Train
worker (gpt2-tiny, 8 x 128 tokens, 1 thread, 150 steps): 1.1 M minor page
faults and 4.0 s of system time in the training thread (7% of its CPU time);
with these settings 81 k faults and 0.9 s.

Ray Train runs the training function in a thread of the worker process, so
the thread arena's trimming is what matters; ``mallopt`` changes the process
wide parameters, which every arena reads. The cost is that memory freed by
training stays with the process (up to ``trim_threshold`` per arena) instead
of going back to the OS: right for a worker whose working set repeats every
step. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc ignores larger mmap thresholds on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, half a thread heap).
MMAP_THRESHOLD_MAX = 32 << 20
DEFAULT_TRIM_THRESHOLD = 1 << 30


def glibc_library():
    """The C library as a ctypes handle when it is glibc (Linux), else None: only glibc has mallopt."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Serve allocations up to 32 MB from the heap and stop trimming it below ``trim_threshold``.

    Returns whether the settings were applied (glibc only).
    """
    libc = glibc_library()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    applied &= libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))
    return bool(applied)
