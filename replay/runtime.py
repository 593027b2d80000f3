"""Process-wide settings for the torch stages."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def thread_environment(environ: dict | None = None) -> None:
    """OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE) unless the
    user chose otherwise. libgomp spins by default; on a small machine where another process is
    busy, spinning threads steal the core the busy one needs and generate fell from 8.0 to 0.7
    tok/s, while on a machine without that load passive was as fast or faster (docs/BENCHMARKS.md,
    bench/threads_bench.py). Read when torch loads libgomp: call before importing torch."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_torch() -> None:
    """REPLAY_TORCH_THREADS=N pins torch's thread count. On a 2-core machine shared with another
    busy process, 1 thread is far faster than 2 (OpenMP threads spin-wait on each other)."""
    threads = os.environ.get("REPLAY_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, held fixed
MODES = ("trim", "mmap", "0")
_trim = None  # libc.malloc_trim once return_freed_memory chose "trim"


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> str | None:
    """Give what a training step frees back to the OS; glibc otherwise keeps the freed heap (its
    mmap threshold rises as large blocks are freed, so later activations come from the heap).
    REPLAY_MALLOC_TUNING picks how (docs/BENCHMARKS.md, "Freed memory"):
      trim (default)  malloc_trim(0) after every micro-batch's backward (`trim_freed_memory`)
      mmap            every allocation above `threshold` bytes is its own mmap, returned when freed:
                      the least memory, but a page-fault storm that costs wall time on long runs
      0               glibc's defaults (and torch's: no huge pages)
    trim and mmap also turn on huge pages for torch's large CPU blocks (THP_MEM_ALLOC_ENABLE=1
    unless exported). Returns the mode that took effect: None on other C libraries, with
    REPLAY_MALLOC_TUNING=0, or when MALLOC_MMAP_THRESHOLD_ is set (the user's choice wins)."""
    global _trim
    mode = os.environ.get("REPLAY_MALLOC_TUNING") or "trim"
    if mode not in MODES:
        raise ValueError(f"REPLAY_MALLOC_TUNING={mode!r}: use one of {', '.join(MODES)}")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or mode == "0":
        return None
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    # torch's CPU allocator aligns blocks of 2 MiB and more to huge pages and madvises them: fewer
    # page faults and TLB misses, and a lower peak (bench shape: 3.3 vs 4.0 GiB with trim, no
    # slower). torch reads the variable at its first tensor allocation: call this before any.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if mode == "mmap":
        m_mmap_threshold = -3  # <malloc.h>; setting it also turns off the dynamic adjustment
        return "mmap" if libc.mallopt(m_mmap_threshold, int(threshold)) else None
    _trim = libc.malloc_trim
    return "trim"


def trim_freed_memory() -> None:
    """After a backward pass: hand the heap's free pages back (a no-op unless mode "trim")."""
    if _trim is not None:
        _trim(0)
