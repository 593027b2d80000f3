"""Stable identifiers and seeds, derived with hashlib (never Python's salted hash())."""

from __future__ import annotations

import hashlib


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
