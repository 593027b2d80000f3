"""Builders of valid rows for hand-built stores in tests."""

import datetime as dt
import math

from replay import keys

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def prompt_row(problem, answer="1", source="test", level=None):
    return dict(prompt_id=keys.prompt_id(source, problem), source=source, split="train", problem=problem,
                answer=answer, level=level, subject=None, unique_id=None, created_at=NOW)


def rollout_row(round, prompt_id, sample_idx, logprobs=(-0.5, -0.5), text="\\boxed{1}", policy_round=None):
    return dict(round=round, prompt_id=prompt_id, sample_idx=sample_idx,
                rollout_id=keys.rollout_id(round, prompt_id, sample_idx),
                prompt_token_ids=[1, 2, 3], completion_token_ids=list(range(len(logprobs))),
                completion_logprobs=list(logprobs), sum_logprob=float(sum(logprobs)),
                num_completion_tokens=len(logprobs), completion_text=text, finish_reason="stop",
                policy_round=policy_round, policy_adapter=None, base_model="test-model", engine="test",
                engine_version="0", logprobs_mode="processed", temperature=1.0, top_p=1.0, top_k=0,
                max_tokens=16, seed=keys.sample_seed(0, round, prompt_id, sample_idx), created_at=NOW)


def verdict_row(round, prompt_id, sample_idx, correct, status="ok", scored_at=NOW, version="1"):
    return dict(round=round, prompt_id=prompt_id, sample_idx=sample_idx,
                rollout_id=keys.rollout_id(round, prompt_id, sample_idx), correct=correct,
                reward=1.0 if correct else 0.0, status=status, extracted_answer="1", error=None,
                verifier="test", verifier_version=version, latency_ms=1.0, scored_at=scored_at)


def confidence(logprobs):
    return math.exp(sum(logprobs) / max(len(logprobs), 1))


def import_row(problem, answer, text, i):
    """A JSONL row for `replay import` with token ids of the tiny model's vocabulary and logprobs."""
    return {"problem": problem, "answer": answer, "completion": text, "completion_token_ids": [10 + i, 11, 3],
            "completion_logprobs": [-0.5, -1.0 - 0.1 * i, -0.2]}
