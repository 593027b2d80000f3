"""Advantages: worked LENS/GRPO numbers (G = 4, unbiased std, eps 1e-6, before the α weight),
flat-batch invariance, and property tests for sums and finiteness."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.core.advantages import (
    KIND_MIXED,
    KIND_NAMES,
    KIND_NEGATIVE,
    KIND_POSITIVE,
    compute_advantages,
    grpo_advantages,
    group_kinds,
    lens_advantages,
    reinforce_advantages,
    sequence_confidence,
)

NEG = dict(r=[0, 0, 0, 0], c=[0.90, 0.80, 0.60, 0.50])
MIX1 = dict(r=[1, 0, 0, 0], c=[0.85, 0.90, 0.70, 0.60])
MIX2 = dict(r=[1, 1, 0, 0], c=[0.85, 0.80, 0.90, 0.60])
POS = dict(r=[1, 1, 1, 1], c=[0.5, 0.6, 0.7, 0.8])


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def lens_group(group, **options):
    n = len(group["r"])
    result, metrics = lens_advantages(t(group["r"]), torch.zeros(n, dtype=torch.long), t(group["c"]), **options)
    return result, metrics


def test_kind_names_match_the_sql_view():
    assert KIND_NAMES == ("negative", "mixed", "positive")
    assert (KIND_NAMES[KIND_NEGATIVE], KIND_NAMES[KIND_MIXED], KIND_NAMES[KIND_POSITIVE]) == KIND_NAMES


def test_lens_negative_group_worked_example():
    result, metrics = lens_group(NEG)
    # D = 2·0.9 = 1.8; r~_i = -(1/4)·c_i/(1.8 - c_i)
    assert metrics["lens_mean_d_negative"] == pytest.approx(1.8)
    assert result.shaped_reward.tolist() == pytest.approx([-0.250, -0.200, -0.125, -0.0962], abs=5e-4)
    assert result.advantage.tolist() == pytest.approx([-0.082, -0.032, 0.043, 0.072], abs=5e-4)
    assert result.weight.tolist() == [0.25] * 4
    assert result.kind.tolist() == [KIND_NEGATIVE] * 4


def test_lens_mixed_group_where_d_imp_wins():
    result, metrics = lens_group(MIX1)
    # D_imp = [(1/0.85)/4]^-1 = 3.4 > 2·0.9
    assert metrics["lens_mean_d_mixed"] == pytest.approx(3.4)
    assert result.advantage.tolist() == pytest.approx([1.499, -0.538, -0.491, -0.470], abs=5e-4)
    assert result.weight.tolist() == [1.0] * 4


def test_lens_mixed_group_where_twice_max_confidence_wins():
    result, metrics = lens_group(MIX2)
    # D_imp = [(1/0.85 + 1/0.8)/4]^-1 = 1.649 < 2·0.9 = 1.8
    assert metrics["lens_mean_d_mixed"] == pytest.approx(1.8)
    assert result.advantage.tolist() == pytest.approx([0.864, 0.864, -0.955, -0.773], abs=5e-4)


def test_lens_positive_group_has_zero_advantage_and_unit_weight():
    result, _ = lens_group(POS)
    assert result.advantage.tolist() == [0.0] * 4
    assert result.weight.tolist() == [1.0] * 4
    assert result.shaped_reward.tolist() == [1.0] * 4


def test_lens_d_imp_off_and_sequence_modes():
    off, metrics = lens_group(MIX1, d_imp_mode="off")
    assert metrics["lens_mean_d_mixed"] == pytest.approx(1.8)
    # with D = 1.8 the wrong answers are penalised harder than with D = 3.4
    assert off.shaped_reward[1] < lens_group(MIX1)[0].shaped_reward[1]
    # a sequence probability of 0.2 for the right answer makes D_imp = 0.8 < 1.8
    seq_prob = t([0.2, 0.01, 0.01, 0.01])
    result, metrics = lens_advantages(t(MIX1["r"]), torch.zeros(4, dtype=torch.long), t(MIX1["c"]),
                                      d_imp_mode="sequence", sequence_prob=seq_prob)
    assert metrics["lens_mean_d_mixed"] == pytest.approx(1.8)
    # ... while 0.5 makes D_imp = 2.0 > 1.8
    _, metrics = lens_advantages(t(MIX1["r"]), torch.zeros(4, dtype=torch.long), t(MIX1["c"]),
                                 d_imp_mode="sequence", sequence_prob=t([0.5, 0.01, 0.01, 0.01]))
    assert metrics["lens_mean_d_mixed"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="sequence_prob"):
        lens_group(MIX1, d_imp_mode="sequence")
    with pytest.raises(ValueError, match="d_imp_mode"):
        lens_group(MIX1, d_imp_mode="paper")


def test_lens_without_inverse_group_size_scales_the_penalty_by_g():
    result, _ = lens_group(NEG, inv_group_size=False)
    assert result.shaped_reward.tolist() == pytest.approx([-1.0, -0.8, -0.5, -0.3846], abs=5e-4)


def test_lens_alpha_is_the_negative_group_weight():
    result, _ = lens_group(NEG, alpha=0.5)
    assert result.weight.tolist() == [0.5] * 4


def test_less_confident_wrong_answer_gets_positive_advantage_in_negative_group():
    result, _ = lens_group(NEG)
    c = t(NEG["c"])
    below_mean = c < c.mean()
    assert below_mean.any()
    assert (result.advantage[below_mean] > 0).all()
    assert (result.advantage[~below_mean] < 0).all()


def test_interleaved_groups_match_each_group_alone():
    groups = [NEG, MIX1, MIX2, POS]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    rewards = t(sum((g["r"] for g in groups), []))[order]
    conf = t(sum((g["c"] for g in groups), []))[order]
    ids = torch.tensor([70, 5, 11, 2]).repeat_interleave(4)[order]  # arbitrary, non-contiguous labels
    for objective in ("lens", "grpo"):
        batch, metrics = compute_advantages(objective, rewards, ids, conf)
        for gi, g in enumerate(groups):
            alone, _ = compute_advantages(objective, t(g["r"]), torch.zeros(4, dtype=torch.long), t(g["c"]))
            rows = order.argsort()[gi * 4:(gi + 1) * 4]
            for field in ("advantage", "shaped_reward", "weight", "kind"):
                assert getattr(batch, field)[rows].tolist() == pytest.approx(getattr(alone, field).tolist())
    assert metrics["groups"] == 4 and metrics["negative_group_share"] == 0.25
    assert metrics["mixed_group_share"] == 0.5 and metrics["positive_group_share"] == 0.25


def test_grpo_worked_numbers_and_uniform_groups():
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    r = t([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    adv = grpo_advantages(r, ids)
    # mean 0.25, unbiased std 0.5
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert adv[4:].tolist() == [0.0] * 8


def test_group_of_one_gives_zero_not_nan():
    for objective in ("grpo", "lens"):
        result, _ = compute_advantages(objective, t([0.0, 1.0]), torch.tensor([0, 1]), t([0.3, 0.9]))
        assert result.advantage.tolist() == [0.0, 0.0]


def test_group_kinds():
    kinds = group_kinds(t([0, 0, 1, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    assert kinds.tolist() == [KIND_NEGATIVE, KIND_NEGATIVE, KIND_MIXED, KIND_MIXED,
                              KIND_POSITIVE, KIND_POSITIVE, KIND_NEGATIVE]


def test_reinforce_family():
    r, ids = t([1, 0, 0, 1]), torch.tensor([0, 0, 1, 1])
    assert reinforce_advantages(r).tolist() == pytest.approx([0.1, -1.0, -1.0, 0.1])
    nsr, _ = compute_advantages("nsr", r, ids)
    psr, _ = compute_advantages("psr", r, ids)
    wr, metrics = compute_advantages("w_reinforce", r, ids, positive=0.3)
    assert nsr.advantage.tolist() == [0.0, -1.0, -1.0, 0.0]
    assert psr.advantage.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert wr.advantage.tolist() == pytest.approx([0.3, -1.0, -1.0, 0.3])
    assert wr.weight.tolist() == [1.0] * 4 and wr.shaped_reward.tolist() == r.tolist()
    assert metrics["nonzero_adv_share"] == 1.0
    assert compute_advantages("nsr", r, ids)[1]["nonzero_adv_share"] == 0.5


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ValueError, match="grpo, lens, nsr, psr, w_reinforce"):
        compute_advantages("ppo", t([1.0]), torch.tensor([0]), t([0.5]))


def test_results_come_back_in_the_rewards_dtype():
    result, _ = compute_advantages("lens", t([1, 0], torch.float32), torch.tensor([0, 0]), t([0.5, 0.5]))
    assert result.advantage.dtype == torch.float32 and result.weight.dtype == torch.float32
    assert result.kind.dtype == torch.int64


def test_sequence_confidence():
    c = sequence_confidence(t([-2.0, -1e4, 0.0, -3.0]), torch.tensor([4, 10, 0, 0]))
    assert c[0].item() == pytest.approx(math.exp(-0.5))
    assert c[1].item() == pytest.approx(math.exp(-1e3))
    # zero-length completion: empty mean taken as 0 -> c = 1, never NaN
    assert c[2].item() == 1.0 and c[3].item() == pytest.approx(math.exp(-3.0))


groups_strategy = st.lists(
    st.tuples(st.lists(st.booleans(), min_size=1, max_size=8),
              st.lists(st.floats(-1e4, 0.0), min_size=8, max_size=8),
              st.lists(st.integers(0, 50), min_size=8, max_size=8)),
    min_size=1, max_size=6)


def _flatten(groups):
    rewards, sums, lengths, ids = [], [], [], []
    for gi, (right, logprob_means, lens) in enumerate(groups):
        for j, ok in enumerate(right):
            rewards.append(float(ok))
            lengths.append(lens[j])
            sums.append(logprob_means[j] * lens[j])
            ids.append(gi)
    return t(rewards), t(sums), torch.tensor(lengths), torch.tensor(ids)


@settings(max_examples=60, deadline=None)
@given(groups_strategy)
def test_properties_hold_on_random_batches(groups):
    rewards, sums, lengths, ids = _flatten(groups)
    conf = sequence_confidence(sums, lengths)
    kinds = group_kinds(rewards, ids)
    for objective in ("grpo", "lens", "nsr", "psr", "w_reinforce"):
        result, metrics = compute_advantages(objective, rewards, ids, conf)
        for field in ("advantage", "shaped_reward", "weight"):
            assert torch.isfinite(getattr(result, field)).all(), (objective, field)
        assert all(math.isfinite(v) for v in metrics.values())
    grpo, _ = compute_advantages("grpo", rewards, ids)
    lens, _ = compute_advantages("lens", rewards, ids, conf, d_imp_mode="sequence", sequence_prob=torch.exp(sums))
    assert torch.isfinite(lens.advantage).all()
    lens, _ = compute_advantages("lens", rewards, ids, conf)
    for gi in ids.unique():
        rows = ids == gi
        kind = int(kinds[rows][0])
        if kind == KIND_MIXED:
            assert grpo.advantage[rows].sum().item() == pytest.approx(0.0, abs=1e-6)
            assert lens.advantage[rows].sum().item() == pytest.approx(0.0, abs=1e-6)
        elif kind == KIND_NEGATIVE:
            assert lens.advantage[rows].sum().item() == pytest.approx(0.0, abs=1e-9)
            assert (lens.weight[rows] == 0.25).all() and (grpo.advantage[rows] == 0).all()
        else:
            assert (lens.advantage[rows] == 0).all() and (grpo.advantage[rows] == 0).all()
        # the shaped reward never leaves [-1/G, 1]
        assert (lens.shaped_reward[rows] >= -1.0 / rows.sum() - 1e-12).all()


def test_grpo_on_groups_of_unequal_size_uses_each_groups_own_n():
    # rescue sampling leaves groups of different sizes in one round; worked by hand:
    # [1, 0]: mean 1/2, unbiased std sqrt(1/2) -> ±0.7071; [1, 0, 0, 0]: mean 1/4, std 1/2 -> 1.5, -0.5
    adv = grpo_advantages(t([1, 0, 1, 0, 0, 0]), torch.tensor([0, 0, 1, 1, 1, 1]))
    assert adv.tolist() == pytest.approx([0.70711, -0.70711, 1.5, -0.5, -0.5, -0.5], abs=1e-4)


def test_lens_on_groups_of_unequal_size_uses_each_groups_own_n():
    # negative group of 2, c = [.2, .4]: D = .8, r~ = -(1/2)[.2/.6, .4/.4] = [-1/6, -1/2], A = r~ + 1/3
    # negative group of 3, c = [.1, .2, .4]: D = .8, r~ = -(1/3)[1/7, 1/3, 1], A = r~ - mean(r~)
    # mixed group of 3, r = [1, 0, 0], c = [.5, .4, .2]: D = max(3 / (1/.5), 2 * .5) = 1.5,
    #   r~ = [1, -(1/3)(.4/1.1), -(1/3)(.2/1.3)], A = (r~ - mean) / unbiased std
    rewards, groups = t([0, 0, 0, 0, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    confidence = t([0.2, 0.4, 0.1, 0.2, 0.4, 0.5, 0.4, 0.2])
    result, _ = lens_advantages(rewards, groups, confidence)
    neg3 = [-1 / 21, -1 / 9, -1 / 3]
    mix = [1.0, -0.4 / 3.3, -0.2 / 3.9]
    mean, n = sum(mix) / 3, 3
    std = math.sqrt(sum((x - mean) ** 2 for x in mix) / (n - 1))
    expected = [1 / 6, -1 / 6] + [x - sum(neg3) / 3 for x in neg3] + [(x - mean) / (std + 1e-6) for x in mix]
    assert result.shaped_reward.tolist() == pytest.approx([-1 / 6, -1 / 2] + neg3 + mix, abs=1e-9)
    assert result.advantage.tolist() == pytest.approx(expected, abs=1e-9)
    assert result.advantage.tolist() == pytest.approx([0.1667, -0.1667, 0.1164, 0.0529, -0.1693, 1.1529, -0.6321,
                                                       -0.5208], abs=1e-4)
    assert result.weight.tolist() == [0.25] * 5 + [1.0] * 3
