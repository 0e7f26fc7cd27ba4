"""glibc's allocator set so that a long run's peak memory stays flat.

Two of glibc's ``malloc`` defaults let a compiled program's resident memory
grow with how long it runs, although XLA's buffer assignment (what
``compiled.memory_analysis()`` reports) does not change:

* **The mmap threshold.** A block above it is served by its own ``mmap``
  and returned to the system when freed. The threshold is dynamic: each
  freed mmapped block raises it to that block's size (up to 32 MiB on
  64-bit). After the first calls of a program its temporary buffers (tens
  of MiB for a model of a million parameters) therefore come from the heap
  arenas of the threads that run it, and stay resident once freed:
  ``benchmarks/bench_memory.py`` saw a recovery's peak RSS climb over its
  first few calls and settle 12 % higher at 1,000 points than at 10.
  A fixed threshold keeps such buffers mmapped.
* **The number of arenas.** glibc gives threads that contend for the heap
  arenas of their own, up to eight per core. XLA:CPU's kernels allocate
  and free their small scratch blocks on many threads, blocks freed into
  one arena are not reused by a thread of another, and each arena keeps
  its high-water mark. Within one long execution the resident memory then
  climbs steadily: a recovery of 60 ResNet-18s (10 steps each) in one call
  rose about 1 MiB a second, to 9 % above 10 models, while with one arena
  per core it stayed within 1 % (``benchmarks/bench_resnet.py`` has the
  figures at 100 models). One arena per core keeps the contention of the
  cores' threads and bounds the high-water marks.

The CLI calls :func:`tune_malloc` at start; a Python user may too, best
before JAX starts its threads (arenas that exist keep serving theirs).
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold."""

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter number for the most arenas."""

DEFAULT_THRESHOLD = 1 << 20
"""Blocks of at least 1 MiB are mmapped: every sizeable buffer, while the
many small allocations stay in the arenas."""


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def tune_malloc(mmap_threshold: int = DEFAULT_THRESHOLD,
                arenas: int | None = None) -> bool:
    """Fix glibc's mmap threshold and cap its arenas (see the module).

    Args:
        mmap_threshold: bytes from which a block is mmapped (fixed: no
            dynamic raising).
        arenas: most heap arenas; default one per core this process may
            run on (:func:`recovjax.cores.available_cores`).

    Returns:
        Whether both settings took effect (``False`` without glibc).

    Raises:
        ValueError: for a threshold or an arena count that is not a
            positive int.
    """
    from recovjax.cores import available_cores
    _positive("mmap_threshold", mmap_threshold)
    arenas = available_cores() if arenas is None else _positive(
        "arenas", arenas)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_ARENA_MAX, arenas))
