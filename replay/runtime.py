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
MODES = ("0", "trim", "mmap")
_trim = None  # libc.malloc_trim once return_freed_memory chose "trim"


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> str | None:
    """Memory settings of a training process, picked by REPLAY_MALLOC_TUNING. glibc keeps a step's
    freed heap (its mmap threshold rises as large blocks are freed, so later activations come from
    the heap); giving it back costs page faults, so it is a choice (docs/BENCHMARKS.md §7, a
    512-sample learn: wall time / peak RSS):
      0 (default)  glibc's and torch's defaults                                  609 s, 3.51 GiB
      trim         malloc_trim(0) after every micro-batch's backward              676 s, 3.17 GiB
      mmap         every allocation above `threshold` bytes is its own mmap,      895 s, 2.49 GiB
                   returned when freed (a page-fault storm)
    trim and mmap also put torch's blocks of 2 MiB and more on transparent huge pages
    (THP_MEM_ALLOC_ENABLE=1 unless exported: a third of trim's page faults, a lower peak, no
    slower); torch reads that variable at its first tensor allocation, so call this before any.
    Returns the mode that took effect: None for 0, when MALLOC_MMAP_THRESHOLD_ is set (the user's
    choice wins), or on other C libraries."""
    global _trim
    mode = os.environ.get("REPLAY_MALLOC_TUNING") or "0"
    if mode not in MODES:
        raise ValueError(f"REPLAY_MALLOC_TUNING={mode!r}: use one of {', '.join(MODES)}")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or mode == "0":
        return None
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
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
