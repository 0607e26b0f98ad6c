"""The C heap during the training loop: memory freed by one step is kept for the next (glibc only).

glibc's malloc gives a large block (from 128 KiB, rising as such blocks are freed) its own mmap and
returns it to the kernel when freed, and trims the heap's free top back to the kernel: the next step's
equal-sized block is then new memory, whose first touch is a page fault per page. A training step
allocates the same tensors every time (the item table's dense gradient per lookup, the (B, B) loss
matrices), so on the 700k-row bench stream (20k items) the three zero-filled (20,001 x 64) gradients
alone took ~7.4 of a ~39 ms step in the profile. Inside `retained_heap` blocks below 32 MiB (glibc's
largest mmap threshold) come from the heap and freed memory stays there: the step's 11-58 page faults
fell to 0.2, and a step 43.8 -> 39.2, 39.1 -> 37.2, 37.6 -> 34.6 ms in three alternated process pairs
(docs/TRAINING.md). On leaving, the thresholds stay where glibc's own sliding ones settle once a 32 MiB
block has been freed (blocks below 32 MiB from the heap, its free top beyond 64 MiB back to the kernel):
glibc has no way to turn its sliding threshold back on, and putting back the static 128 KiB made every
later large block an mmap of fresh pages for the rest of the process (a minimal two-tower run after our
fit in one process: 38-43k examples/s, against 64-70k before it and 71-76k now). Elsewhere (musl,
macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX / 2), where its sliding threshold stops
# rising; when it slides, glibc sets the trim threshold to twice it
RETAIN_BELOW = 32 * 2**20
TRIM_AFTER = 2 * RETAIN_BELOW
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
        # no malloc_trim: it also hands back the free pages inside the heap, and the next code's blocks
        # fault them in again (the minimal two-tower after our fit: 52-62k against 71-76k examples/s)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
