"""The behaviour correction of replayed rows and the loss terms it adds, with worked numbers.

The group of the rescue issue: 4 wrong on-policy answers (1 token each) and 2 replayed right ones
(2 tokens each) whose behaviour weights π_θold/μ are [2, 0.5] and [3, 0.25]; at θ = θ_old every
PPO ratio is 1. Every expected number below was worked by hand from the formulas in
replay/core/behaviour.py, replay/core/advantages.py and replay/core/loss.py.
"""

import math

import pytest
import torch

from replay.core.advantages import compute_advantages
from replay.core.behaviour import behaviour_weights, replay_metrics
from replay.core.loss import policy_loss

LN = math.log
# θ_old and μ logprobs of the two replayed rows: w = [0.5/0.25, 0.2/0.4] = [2, 0.5] and [0.9/0.3, 0.1/0.4] = [3, 0.25]
OLD = torch.tensor([[LN(0.5), LN(0.2)], [LN(0.9), LN(0.1)]], dtype=torch.float64)
MU = torch.tensor([[LN(0.25), LN(0.4)], [LN(0.3), LN(0.4)]], dtype=torch.float64)
MASK = torch.ones(2, 2)


def test_tis_truncates_each_token_at_the_cap():
    w = behaviour_weights(OLD, MU, MASK, "tis", cap=2.0)
    torch.testing.assert_close(w.weight, torch.tensor([[2.0, 0.5], [3.0, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(w.factor, torch.tensor([[2.0, 0.5], [2.0, 0.25]], dtype=torch.float64))
    assert w.truncated.tolist() == [0, 1]  # 2.0 is at the cap, not over it; 3.0 is cut
    torch.testing.assert_close(w.sequence_weight, torch.tensor([1.0, math.sqrt(0.75)], dtype=torch.float64))
    assert w.masked.tolist() == [False, False]


def test_seq_mask_drops_a_sequence_whose_geometric_mean_leaves_the_band():
    kept = behaviour_weights(OLD, MU, MASK, "seq-mask", cap=2.0)  # 1 and 0.866 lie in [0.5, 2]
    assert kept.masked.tolist() == [False, False]
    torch.testing.assert_close(kept.factor, torch.ones(2, 2, dtype=torch.float64))
    cut = behaviour_weights(OLD, MU, MASK, "seq-mask", cap=1.1)  # 0.866 < 1/1.1 = 0.909
    assert cut.masked.tolist() == [False, True]
    torch.testing.assert_close(cut.factor, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["none", "shaping"])
def test_none_and_shaping_weigh_nothing(mode):
    w = behaviour_weights(OLD, MU, MASK, mode, cap=2.0)
    torch.testing.assert_close(w.factor, torch.ones(2, 2, dtype=torch.float64))


def test_padding_is_ignored_even_when_it_holds_inf():
    old = torch.tensor([[LN(0.5), float("inf")]], dtype=torch.float64)
    mu = torch.tensor([[LN(0.25), float("-inf")]], dtype=torch.float64)
    w = behaviour_weights(old, mu, torch.tensor([[1.0, 0.0]]), "tis", cap=2.0)
    assert w.factor.tolist() == [[2.0, 0.0]] and w.weight.tolist() == [[2.0, 0.0]]
    assert w.sequence_weight.tolist() == [2.0] and w.truncated.tolist() == [0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        behaviour_weights(OLD, MU, MASK, "clip", cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(OLD, MU, MASK, "tis", cap=1.0)


def test_replay_metrics_of_a_step():
    m = replay_metrics(torch.tensor([1.0, 3.0], dtype=torch.float64), token_weight_sum=5.75, token_weight_max=3.0,
                       tokens=4, truncated=1, masked=1, ages=torch.tensor([1.0, 2.0]))
    assert m == {"replayed_rows": 2, "replay_mean_age": 1.5, "behaviour_weight_mean": 5.75 / 4,
                 "behaviour_weight_max": 3.0, "behaviour_truncated_share": 0.25, "behaviour_masked_share": 0.5,
                 "replay_ess": 16 / 10}  # (1 + 3)² / (1 + 9)
    assert replay_metrics(torch.zeros(0), 0.0, 0.0, 0, 0, 0, torch.zeros(0))["replayed_rows"] == 0


# -- the worked group -------------------------------------------------------------------------------
REWARDS = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.float64)
GROUPS = torch.zeros(6, dtype=torch.long)
# c of the wrong rows (stored), of the replayed ones (θ_old at T = 1): D_imp = [(1/6)(1/0.9 + 1/0.6)]⁻¹ = 2.16 > 2·0.9
CONFIDENCE = torch.tensor([0.2, 0.4, 0.1, 0.3, 0.9, 0.6], dtype=torch.float64)
GRPO_ADV = [-0.6454959743703232] * 4 + [1.2909919487406467] * 2  # (r − 1/3)/(√(4/15) + 1e-6)
# r̃_wrong = −(1/6)·c/(2.16 − c) = −0.0170068, −0.0378788, −0.0080906, −0.0268817; r̃_right = 1
LENS_ADV = [-0.6350470696495277, -0.6745703945182703, -0.6181633192201619, -0.6537462771143091,
            1.2907635302511344, 1.2907635302511344]


@pytest.mark.parametrize("objective, expected", [("grpo", GRPO_ADV), ("lens", LENS_ADV)])
def test_replayed_successes_make_the_negative_group_mixed(objective, expected):
    result, _ = compute_advantages(objective, REWARDS, GROUPS, CONFIDENCE)
    torch.testing.assert_close(result.advantage, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert result.kind.tolist() == [1] * 6  # mixed: no LENS α on it any more
    assert result.weight.tolist() == [1.0] * 6


def _group_loss(advantage, factors, shaped=None, logprobs=None):
    """The worked group through policy_loss at θ = θ_old: rows 0-3 one token, rows 4-5 two."""
    mask = torch.tensor([[1, 0]] * 4 + [[1, 1]] * 2, dtype=torch.float32)
    old = torch.tensor([[LN(0.5), 0.0]] * 4 + OLD.tolist(), dtype=torch.float64)
    lp = (old.clone() if logprobs is None else logprobs).requires_grad_(True)
    weights = torch.ones(6, 2, dtype=torch.float64)
    weights[4:] = factors
    loss, _ = policy_loss(lp, old, torch.tensor(advantage, dtype=torch.float64), mask, token_weights=weights,
                          shaped=shaped)
    loss.backward()
    return float(loss.detach()), lp.grad


@pytest.mark.parametrize("objective, advantage, expected_loss, expected_grad", [
    # loss = (1/6) Σ_i mean_t(−A_i·b_t); ∂loss/∂logπ_t = −A_i·b_t/(n_i·6) at ρ = 1; tis: b = [2, 0.5], [2, 0.25]
    ("grpo", GRPO_ADV, -0.0806869967962905,
     [[0.10758266239505387, 0]] * 4 + [[-0.21516532479010778, -0.053791331197526944],
                                       [-0.21516532479010778, -0.026895665598763472]]),
    ("lens", LENS_ADV, -0.0806727206406959,
     [[0.10584117827492129, 0], [0.11242839908637837, 0], [0.10302721987002698, 0], [0.10895771285238486, 0],
      [-0.21512725504185573, -0.05378181376046393], [-0.21512725504185573, -0.026890906880231966]]),
])
def test_the_worked_group_loss_and_gradient_under_tis(objective, advantage, expected_loss, expected_grad):
    factors = behaviour_weights(OLD, MU, MASK, "tis", cap=2.0).factor
    loss, grad = _group_loss(advantage, factors)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_the_worked_group_under_seq_mask_loses_the_masked_row():
    factors = behaviour_weights(OLD, MU, MASK, "seq-mask", cap=1.1).factor
    _, grad = _group_loss(GRPO_ADV, factors)
    assert grad[5].tolist() == [0.0, 0.0]  # the masked replayed row gives no gradient
    # the kept one counts with factor 1: −A/(2·6) per token
    torch.testing.assert_close(grad[4], torch.full((2,), -1.2909919487406467 / 12, dtype=torch.float64))


def test_the_worked_group_under_shaping():
    """Shaped rows: loss_t = −A·π/(π + γ) (γ 0.1, no ratio, no clip); at π = 0.5 and 0.2 for row 4
    and 0.9, 0.1 for row 5: f = 5/6, 2/3 and 0.9, 0.5; ∂/∂logπ = −A·γπ/(π + γ)²/(2·6)."""
    shaped = torch.tensor([False] * 4 + [True] * 2)
    loss, grad = _group_loss(GRPO_ADV, torch.ones(2, 2, dtype=torch.float64), shaped=shaped)
    a_wrong, a_right = GRPO_ADV[0], GRPO_ADV[4]
    f = [0.5 / 0.6, 0.2 / 0.3, 0.9 / 1.0, 0.1 / 0.2]
    expected = (4 * -a_wrong + -a_right * (f[0] + f[1]) / 2 + -a_right * (f[2] + f[3]) / 2) / 6
    assert loss == pytest.approx(expected, rel=1e-12)
    d = [0.1 * p / (p + 0.1) ** 2 for p in (0.5, 0.2, 0.9, 0.1)]
    torch.testing.assert_close(grad[4:], torch.tensor([[-a_right * d[0] / 12, -a_right * d[1] / 12],
                                                       [-a_right * d[2] / 12, -a_right * d[3] / 12]],
                                                      dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # no clip for shaped rows: far from θ_old the surrogate still moves (a clipped row would be flat)
    far = torch.tensor([[LN(0.5), 0.0]] * 4 + [[LN(0.05), LN(0.05)]] * 2, dtype=torch.float64)
    _, grad_far = _group_loss(GRPO_ADV, torch.ones(2, 2, dtype=torch.float64), shaped=shaped, logprobs=far)
    assert (grad_far[4:] != 0).all()


def test_without_replayed_rows_the_loss_is_bit_for_bit_the_old_one():
    torch.manual_seed(0)
    lp, old = torch.randn(3, 4, dtype=torch.float64) - 2, torch.randn(3, 4, dtype=torch.float64) - 2
    mask, adv = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]), torch.tensor([0.5, -1.0, 2.0])
    plain, _ = policy_loss(lp, old, adv, mask, tis_cap=1.5)
    ones, _ = policy_loss(lp, old, adv, mask, tis_cap=1.5, token_weights=torch.ones(3, 4, dtype=torch.float64),
                          shaped=torch.zeros(3, dtype=torch.bool))
    assert float(plain) == float(ones)
