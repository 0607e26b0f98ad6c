"""The C heap during the training loop: memory freed by one step is kept for the next (glibc only).

glibc's malloc gives a large block (from 128 KiB, rising as such blocks are freed) its own mmap and
returns it to the kernel when freed, and trims the heap's free top back to the kernel: the next step's
equal-sized block is then new memory, whose first touch is a page fault per page. A training step
allocates the same tensors every time (the item table's dense gradient per lookup, the (B, B) loss
matrices), so on the 700k-row bench stream (20k items) the three zero-filled (20,001 x 64) gradients
alone took ~7.4 of a ~39 ms step in the profile. Inside `retained_heap` blocks below 32 MiB (glibc's
largest mmap threshold) come from the heap and freed memory stays there: the step's 11-58 page faults
fell to 0.2, and a step 43.8 -> 39.2, 39.1 -> 37.2, 37.6 -> 34.6 ms in three alternated process pairs
(docs/TRAINING.md). On leaving, glibc's default values come back (its mmap threshold as the static
128 KiB: glibc offers no way to turn its sliding threshold back on) and the kept memory is trimmed.
Elsewhere (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's defaults (a static mmap threshold: setting one turns the sliding one off) and the largest
# mmap threshold it accepts on 64-bit (HEAP_MAX / 2)
DEFAULT_THRESHOLD = 128 * 1024
RETAIN_BELOW = 32 * 2**20
KEEP_UP_TO = 2**30


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it has glibc's mallopt and malloc_trim, else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Within: freed blocks below RETAIN_BELOW stay in the heap for the next allocation. Yields whether
    the setting took (False where the C library is not glibc)."""
    libc = _glibc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, RETAIN_BELOW):
        yield False
        return
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO)
    try:
        yield True
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
