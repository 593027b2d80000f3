"""Stable identifiers and seeds, derived with hashlib (never Python's salted hash())."""

from __future__ import annotations

import hashlib

from .errors import ReplayError


def _digest(*parts: object) -> bytes:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).digest()


def prompt_id(source: str, problem: str) -> str:
    """16 hex chars: stable across runs, machines and Python versions."""
    return _digest("prompt", source, problem).hex()[:16]


def rollout_id(round: int, prompt_id: str, sample_idx: int) -> str:
    return _digest("rollout", int(round), prompt_id, int(sample_idx)).hex()[:24]


def sample_seed(base_seed: int, round: int, prompt_id: str, sample_idx: int) -> int:
    """A 63-bit sampling seed per (seed, round, prompt, sample): reruns draw the same tokens."""
    return int.from_bytes(_digest("seed", int(base_seed), int(round), prompt_id, int(sample_idx))[:8], "big") >> 1


def shard_of(prompt_id: str, num_shards: int) -> int:
    """Deterministic shard of a prompt, so n workers write disjoint rows."""
    return int.from_bytes(_digest("shard", prompt_id)[:8], "big") % num_shards


def in_shard(prompt_id: str, index: int, count: int) -> bool:
    return shard_of(prompt_id, count) == index


def parse_shard(shard: str) -> tuple[int, int]:
    """`--shard i/n` -> (i, n): this worker takes the prompts with shard_of(prompt_id, n) == i."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ReplayError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ReplayError(f"--shard {shard}: need 0 <= i < n")
    return index, count


def shard_stage(stage: str, index: int, count: int) -> str:
    """Manifest name of one shard worker, so n workers never overwrite each other's record."""
    return stage if count == 1 else f"{stage}.shard-{index}-of-{count}"
