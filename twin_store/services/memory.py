"""The process's own memory: returning freed heap pages to the system after a large one-off job."""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> bool:
    """Collect garbage, then ask glibc to hand the free pages of its heaps back (``malloc_trim(0)``). A freed
    block below the mmap threshold stays in the process's heap, counted in its RSS, until this is asked or
    the heap's top is free; after the bootstrap's V-twinning that was most of ``nettwin htwin``'s resident
    memory. False where the C library has no ``malloc_trim`` (not glibc) or nothing was returned."""
    gc.collect()
    return trim_heap()


def trim_heap() -> bool:
    """``malloc_trim(0)`` alone, without a garbage collection (which would hold the GIL for the whole heap's
    walk): for a long-running process that frees much of what it allocates, e.g. the worker after a training.
    False where the C library has no ``malloc_trim`` or nothing was returned."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
