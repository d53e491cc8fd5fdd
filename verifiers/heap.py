"""Keep freed tensor memory in a worker process for the next pass to reuse.

glibc's malloc hands most blocks of more than a few megabytes straight back to the kernel when
they are freed (an ``munmap``, or trimming the top of the heap). A prefill chunk allocates and
frees such temporaries in every layer (1,024 positions x 1,536 features in fp32 is 6 MB), so the
next layer touches fresh pages again: about 350 K page faults and a tenth of a 6,900-token bf16
prefill on a 2-core Xeon (bench/RESULTS.md). Raising the two thresholds keeps those blocks in the
heap, where the next layer's identical request finds them.

The cost is memory the process keeps after a peak: up to ``keep_mb`` free at the top of the heap,
and freed blocks below it (a worker's peak is bounded by its model, its KV budget and one chunk's
temporaries, so this is memory it will use again). Blocks over 32 MB (glibc's largest mmap
threshold on 64-bit) are still returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MB on 64-bit.
MMAP_THRESHOLD = 32 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): no mallopt to call
        return None


def keep_freed_memory(keep_mb: int = 1024) -> bool:
    """Raise malloc's mmap threshold to its largest and its trim threshold to ``keep_mb`` (at most
    2,047), so freed tensors of up to 32 MB stay in the process. False where the C library has no
    mallopt or refuses a value: the process then keeps the library's defaults, or (a refused trim
    threshold after an accepted mmap threshold) the larger mmap threshold alone. Either is logged
    here, once, so callers need not say it again."""
    if keep_mb <= 0:
        raise ValueError(f"keep_mb must be positive, not {keep_mb}")
    libc = _libc()
    if libc is None:
        log.info("this C library has no mallopt: freed tensor memory goes back to the kernel as usual")
        return False
    # The mmap threshold first: setting either disables glibc's sliding thresholds, and a trim
    # threshold beside the default 128 KB mmap threshold would send every large block to mmap.
    if (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, min(keep_mb, 2047) << 20) == 1):
        return True
    log.warning("the C library refused the heap settings (heap_keep_mb): freed memory goes back to the kernel")
    return False
