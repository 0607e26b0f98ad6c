"""models/heap.py: inside retained_heap a freed block is reused without new page faults; outside it
glibc hands it back to the kernel."""
from __future__ import annotations

import ctypes
import resource

from models.heap import _glibc, retained_heap


def _faults_of_a_fresh_block(libc: ctypes.CDLL, mib: int = 8) -> int:
    """Page faults of filling a malloc'ed block of `mib` MiB, freed after (through the C library
    itself: numpy and torch ask the kernel for huge pages on large arrays, which hides the count)."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = mib * 2**20
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(block)
    return after - before


def test_freed_memory_is_reused_inside_and_returned_after():
    libc = _glibc()
    assert libc is not None, "this test runs where the C library is glibc (Linux)"
    with retained_heap() as took:
        assert took
        _faults_of_a_fresh_block(libc)
        inside = _faults_of_a_fresh_block(libc)
    outside = _faults_of_a_fresh_block(libc)
    # 8 MiB is 2,048 pages: outside, each is faulted in again; inside, the heap still holds them
    assert inside < 100, inside
    assert outside > 1000, outside
