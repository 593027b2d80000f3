"""The learner's step plan: every sample once per epoch, steps of micro x accum, short with short;
with --steps S exactly S balanced steps, each step's loss the mean over its samples."""

import pytest
import torch

from replay.errors import ReplayError
from replay.learn.config import LearnConfig
from replay.learn.loop import plan_steps, train
from tests._tiny_model import tiny_model
from tests.test_learn_ratio import _advantages, _policy, engine_samples


def test_each_epoch_takes_every_sample_once_in_steps_of_micro_times_accum():
    indices = list(range(3, 40))
    lengths = {i: (i * 37) % 101 for i in indices}
    steps = plan_steps(indices, lengths, micro=4, accum=2, seed=5, epochs=2)
    for epoch in (0, 1):
        mine = [mbs for e, mbs in steps if e == epoch]
        assert sorted(i for mbs in mine for mb in mbs for i in mb) == indices
        assert [sum(map(len, mbs)) for mbs in mine] == [8, 8, 8, 8, 5]  # 37 samples
        assert all(len(mb) == 4 for mbs in mine for mb in mbs[:-1])


def test_micro_batches_of_a_step_are_sorted_by_length_and_the_plan_is_seeded():
    indices = list(range(64))
    lengths = [(i * 53) % 97 for i in indices]
    steps = plan_steps(indices, lengths, micro=4, accum=4, seed=0, epochs=1)
    for _, micro_batches in steps:
        flat = [lengths[i] for mb in micro_batches for i in mb]
        assert flat == sorted(flat)
    assert steps == plan_steps(indices, lengths, micro=4, accum=4, seed=0, epochs=1)
    assert steps != plan_steps(indices, lengths, micro=4, accum=4, seed=1, epochs=1)
    # the sort stays inside a step: which samples share a step is the shuffle's choice alone
    other = plan_steps(indices, [0] * 64, micro=4, accum=4, seed=0, epochs=1)
    assert [sorted(i for mb in s for i in mb) for _, s in steps] == \
           [sorted(i for mb in s for i in mb) for _, s in other]


# -- learn --steps S: exactly S optimizer steps per epoch ----------------------------------------------
def _sizes(plan, epoch=0):
    return [sum(map(len, mbs)) for e, mbs in plan if e == epoch]


def test_steps_cut_each_epoch_into_exactly_s_balanced_steps():
    # 10 rows, S = 3: 10 = 3·3 + 1, so one step of ⌈10/3⌉ = 4 and two of ⌊10/3⌋ = 3 (not 4, 4, 2:
    # ⌈n/S⌉-sized steps would give 20 rows and S = 8 only 7 steps of 3, 3, 3, 3, 3, 3, 2)
    ten = list(range(10))
    plan = plan_steps(ten, [1] * 10, micro=4, accum=4, seed=0, epochs=2, steps=3)
    assert _sizes(plan, 0) == _sizes(plan, 1) == [4, 3, 3]
    for epoch in (0, 1):
        assert sorted(i for e, mbs in plan if e == epoch for mb in mbs for i in mb) == ten
    # 20 rows, S = 8: 20 = 8·2 + 4 -> four steps of 3, four of 2
    twenty = list(range(20))
    assert _sizes(plan_steps(twenty, [1] * 20, micro=4, accum=4, seed=0, epochs=1, steps=8)) == [3] * 4 + [2] * 4
    # 256 rows (the tournament's round) or 320 (with replayed rows): 8 steps either way, larger ones
    assert _sizes(plan_steps(list(range(256)), [1] * 256, 4, 4, 0, 1, steps=8)) == [32] * 8
    assert _sizes(plan_steps(list(range(320)), [1] * 320, 4, 4, 0, 1, steps=8)) == [40] * 8


def test_steps_keep_micro_batches_and_the_seeded_shuffle_and_ignore_accum():
    indices = list(range(3, 40))  # 37 rows
    lengths = {i: (i * 37) % 101 for i in indices}
    plan = plan_steps(indices, lengths, micro=4, accum=2, seed=5, epochs=1, steps=5)
    assert _sizes(plan) == [8, 8, 7, 7, 7]
    for _, mbs in plan:  # micro-batches of --micro-batch-size inside a step, sorted by length as without S
        assert [len(mb) for mb in mbs] in ([4, 4], [4, 3])
        flat = [lengths[i] for mb in mbs for i in mb]
        assert flat == sorted(flat)
    assert plan == plan_steps(indices, lengths, micro=4, accum=99, seed=5, epochs=1, steps=5)  # accum unused
    # the same shuffle as without S: when S steps of micro x accum fit exactly, the two plans are one
    rows = list(range(32))
    assert plan_steps(rows, [0] * 32, 4, 2, 7, 2, steps=4) == plan_steps(rows, [0] * 32, 4, 2, 7, 2)


def test_steps_refuses_fewer_rows_than_steps():
    assert _sizes(plan_steps(list(range(8)), [1] * 8, 4, 4, 0, 1, steps=8)) == [1] * 8  # n = S: steps of one
    with pytest.raises(ReplayError, match="--steps 8 .* plans 7 row"):
        plan_steps(list(range(7)), [1] * 7, 4, 4, 0, 1, steps=8)
    assert plan_steps([], [], 4, 4, 0, 1, steps=8) == []  # nothing planned: nothing, as without S


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_each_steps_loss_is_the_mean_over_its_samples_however_it_is_cut(aggregation):
    """10 samples, S = 3 (steps of 4, 3, 3): the same updates whether a step is one pass, passes of
    one, or passes of 3 + 1 (a per-pass or per-accumulation normaliser would differ), and the first
    step (the shuffle's first 4 samples) has the gradient of the default plan's first step of micro 4 x
    accum 1 — the mean over its 4 samples (over their tokens for token-mean)."""
    def run(**kw):
        torch.manual_seed(0)
        policy = _policy(tiny_model(), init_lora_weights=False)
        samples = engine_samples(policy, 1.0, 0, 1.0, n=10)
        rows, _ = train(policy, samples, _advantages(10), LearnConfig(lr=1e-3, max_grad_norm=1e9,
                                                                                aggregation=aggregation, **kw))
        return rows, {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k}

    ref_rows, ref_lora = run(micro_batch_size=4, steps=3)
    assert len(ref_rows) == 3
    for kw in ({"micro_batch_size": 1, "steps": 3, "grad_accum": 7}, {"micro_batch_size": 3, "steps": 3},
               {"micro_batch_size": 10, "steps": 3}):
        rows, lora = run(**kw)
        assert [r["grad_norm"] for r in rows] == [approx(r["grad_norm"]) for r in ref_rows]
        for k in ref_lora:
            torch.testing.assert_close(lora[k], ref_lora[k], atol=1e-6, rtol=1e-5)
    default_rows, _ = run(micro_batch_size=4, grad_accum=1)
    assert len(default_rows) == 3  # 4, 4, 2
    assert default_rows[0]["grad_norm"] == approx(ref_rows[0]["grad_norm"])
    assert default_rows[1]["grad_norm"] != approx(ref_rows[1]["grad_norm"])  # 4 samples, not 3


def approx(value):
    return pytest.approx(value, rel=1e-5)
