"""Process-wide settings for the torch stages."""

from __future__ import annotations

import os


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


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations above `threshold` bytes with mmap, so what a training step frees goes back
    to the OS. glibc otherwise raises the threshold as large blocks are freed, serves the next
    activations from the heap and keeps the freed heap: without this the learner's step memory on
    SmolLM2-135M was 4.0 GiB, with it 1.6 GiB at the same speed (docs/BENCHMARKS.md §5).
    Returns whether it took effect: not on other C libraries, nor when MALLOC_MMAP_THRESHOLD_ is
    set (the user's choice wins) or REPLAY_MALLOC_TUNING=0."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("REPLAY_MALLOC_TUNING") == "0":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns off the dynamic adjustment
    return bool(mallopt(m_mmap_threshold, int(threshold)))
