"""models/heap.py: inside retained_heap freed memory is reused without new page faults; after it, as
glibc's own sliding thresholds would have it: a freed block below 32 MiB is reused, a free heap top
beyond 64 MiB goes back to the kernel."""
from __future__ import annotations

import ctypes
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _faults_of_fresh_blocks(libc: ctypes.CDLL, mib: int = 8, blocks: int = 1) -> int:
    """Page faults of filling `blocks` malloc'ed blocks of `mib` MiB, all freed after (through the C
    library itself: numpy and torch ask the kernel for huge pages on large arrays, which hides the count)."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = mib * 2**20
    held = [libc.malloc(size) for _ in range(blocks)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for block in held:
        ctypes.memset(block, 1, size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for block in reversed(held):
        libc.free(block)
    return after - before


# The sequence runs in a fresh interpreter: where the heap's top lies depends on everything the process
# allocated before, and a test process has run other tests (in one a long-lived block above the freed
# 96 MiB kept it from being handed back: a false failure)
SEQUENCE = """
import json
from models.heap import _glibc, retained_heap
from tests.models.test_heap import _faults_of_fresh_blocks
libc = _glibc()
assert libc is not None, "this test runs where the C library is glibc (Linux)"
with retained_heap() as took:
    assert took
    _faults_of_fresh_blocks(libc, blocks=12)
    inside_top = _faults_of_fresh_blocks(libc, blocks=12)          # 96 MiB freed: kept
_faults_of_fresh_blocks(libc)               # from the kept top; its free hands the top back
returned = _faults_of_fresh_blocks(libc)
after_block = _faults_of_fresh_blocks(libc)                          # 8 MiB freed: reused
_faults_of_fresh_blocks(libc, blocks=12)
after_top = _faults_of_fresh_blocks(libc, blocks=12)                 # 96 MiB freed: given back
print(json.dumps([inside_top, returned, after_block, after_top]))
"""


def test_freed_memory_is_reused_inside_and_after_and_a_large_free_top_returned_after():
    out = subprocess.run([sys.executable, "-c", SEQUENCE], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    inside_top, returned, after_block, after_top = json.loads(out.stdout.strip().splitlines()[-1])
    # 8 MiB is 2,048 pages; a static 128 KiB threshold after the loop (glibc's default, set by hand)
    # would fault every one in again, and so slowed whatever ran after training in the same process
    assert inside_top < 1000, inside_top
    assert returned > 1000, returned            # the loop's 96 MiB went back at the first free after it
    assert after_block < 100, after_block
    assert after_top > 12_000, after_top
