"""Process-wide settings for the torch stages."""

from __future__ import annotations

import os


def configure_torch() -> None:
    """REPLAY_TORCH_THREADS=N pins torch's thread count. On a 2-core machine shared with another
    busy process, 1 thread is far faster than 2 (OpenMP threads spin-wait on each other)."""
    threads = os.environ.get("REPLAY_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
