"""PPO clipped surrogate: hand-worked clipping on tokens with known ratios, aggregation, weights,
masking, and finiteness for extreme ratios."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.core.loss import policy_loss

# row 0 has A = +1, row 1 has A = -1 and its last position is padding
RATIOS = [[0.5, 0.9, 1.0, 1.1, 1.5, 4.0],
          [0.5, 0.9, 1.5, 4.0, 5.0, 1.0]]
MASK = [[1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0]]
# eps 0.2, dual clip 3. A=+1: loss = -min(ρ, clip ρ); A=-1: loss = min(max(ρ, clip ρ), 3)
ROW0_LOSS = [-0.5, -0.9, -1.0, -1.1, -1.2, -1.2]
ROW0_GRAD = [-0.5, -0.9, -1.0, -1.1, 0.0, 0.0]  # d loss_t / d logπ_t = -A·ρ where unclipped
ROW1_LOSS = [0.8, 0.9, 1.5, 3.0, 3.0]
ROW1_GRAD = [0.0, 0.9, 1.5, 0.0, 0.0, 0.0]


def batch(ratios=RATIOS, mask=MASK, pad_value=0.0):
    old = torch.full((len(ratios), len(ratios[0])), -2.0, dtype=torch.float64)
    new = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    m = torch.tensor(mask, dtype=torch.float64)
    with torch.no_grad():
        new[m == 0] = pad_value
    return new, old, torch.tensor([1.0, -1.0], dtype=torch.float64), m


def test_clipping_and_dual_clip_on_hand_worked_tokens_seq_mean():
    new, old, adv, mask = batch()
    loss, metrics = policy_loss(new, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    expected = (sum(ROW0_LOSS) / 6 + sum(ROW1_LOSS) / 5) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    want = torch.tensor([[g / 6 / 2 for g in ROW0_GRAD], [g / 5 / 2 for g in ROW1_GRAD]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, want)
    # clipped branch active: ρ = 1.5 and 4 with A > 0, ρ = 0.5 with A < 0; dual clip: ρ = 4 and 5 with A < 0
    assert metrics["clip_frac"] == pytest.approx(3 / 11)
    assert metrics["dual_clip_frac"] == pytest.approx(2 / 11)
    assert metrics["tokens"] == 11
    assert metrics["ratio_max"] == pytest.approx(5.0)
    assert metrics["ratio_mean"] == pytest.approx((sum(RATIOS[0]) + sum(RATIOS[1][:5])) / 11)


def test_token_mean_aggregation():
    new, old, adv, mask = batch()
    loss, _ = policy_loss(new, old, adv, mask, aggregation="token-mean")
    assert loss.item() == pytest.approx((sum(ROW0_LOSS) + sum(ROW1_LOSS)) / 11)
    loss.backward()
    want = torch.tensor([[g / 11 for g in ROW0_GRAD], [g / 11 for g in ROW1_GRAD]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, want)


def test_without_dual_clip_negative_advantage_follows_the_ratio():
    new, old, adv, mask = batch()
    loss, metrics = policy_loss(new, old, adv, mask, dual_clip=None, aggregation="token-mean")
    row1 = [0.8, 0.9, 1.5, 4.0, 5.0]
    assert loss.item() == pytest.approx((sum(ROW0_LOSS) + sum(row1)) / 11)
    loss.backward()
    assert new.grad[1].tolist() == pytest.approx([0.0, 0.9 / 11, 1.5 / 11, 4.0 / 11, 5.0 / 11, 0.0])
    assert metrics["dual_clip_frac"] == 0.0


def test_sequence_weights_scale_each_sequence():
    new, old, adv, mask = batch()
    loss, _ = policy_loss(new, old, adv, mask, weights=torch.tensor([1.0, 0.25], dtype=torch.float64))
    assert loss.item() == pytest.approx((sum(ROW0_LOSS) / 6 + 0.25 * sum(ROW1_LOSS) / 5) / 2)


def test_clip_eps_high_widens_only_the_upper_bound():
    new, old, adv, mask = batch(ratios=[[1.25, 0.75], [1.25, 0.75]], mask=[[1, 1], [1, 1]])
    loss, _ = policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, aggregation="token-mean")
    # A=+1: -min(1.25, 1.25), -min(0.75, 0.8); A=-1: max(1.25, 1.25), max(0.75, 0.8)
    assert loss.item() == pytest.approx((-1.25 - 0.75 + 1.25 + 0.8) / 4)
    default, _ = policy_loss(new, old, adv, mask, clip_eps=0.2, aggregation="token-mean")
    assert default.item() == pytest.approx((-1.2 - 0.75 + 1.25 + 0.8) / 4)


def test_truncated_importance_weight_is_a_detached_capped_ratio():
    new, old, adv, mask = batch(ratios=[[0.5, 4.0], [1.5, 1.0]], mask=[[1, 1], [1, 1]])
    loss, metrics = policy_loss(new, old, adv, mask, tis_cap=2.0, dual_clip=None, aggregation="token-mean")
    # per token: -0.5·0.5, -1.2·2, 1.5·1.5, 1.0·1.0
    assert loss.item() == pytest.approx((-0.25 - 2.4 + 2.25 + 1.0) / 4)
    loss.backward()
    # gradient of the surrogate times the (constant) weight: -ρ·w, 0 (clipped), ρ·w, ρ·w
    assert new.grad.flatten().tolist() == pytest.approx([-0.25 / 4, 0.0, 2.25 / 4, 1.0 / 4])
    assert metrics["tis_frac"] == pytest.approx(1 / 4)


def test_masked_tokens_get_exactly_zero_gradient_even_when_garbage():
    for pad in (float("nan"), float("inf"), -float("inf"), 1e4):
        new, old, adv, mask = batch(pad_value=pad)
        loss, metrics = policy_loss(new, old, adv, mask)
        loss.backward()
        assert math.isfinite(loss.item()) and new.grad[1, 5].item() == 0.0
        assert torch.isfinite(new.grad).all()
        assert all(math.isfinite(v) for v in metrics.values())


def test_ratio_at_one_gives_the_reinforce_gradient():
    new = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, _ = policy_loss(new, new.detach().clone(), torch.tensor([0.7]), torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(new.grad, torch.full((1, 3), -0.7 / 3))


def test_no_tokens_gives_zero_loss_with_a_graph():
    new = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = policy_loss(new, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and metrics["tokens"] == 0 and new.grad.abs().sum() == 0


def test_rejects_bad_settings():
    new, old, adv, mask = batch()
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(new, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(new, old, adv, mask, dual_clip=0.9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from([None, 3.0]), st.sampled_from([None, 2.0]),
       st.sampled_from(["seq-mean-token-mean", "token-mean"]))
def test_loss_and_gradient_are_finite_for_extreme_ratios(b, t, seed, dual_clip, tis_cap, aggregation):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.0, 1.0, 1e4, -1e4])
    new = (scale[torch.randint(0, 4, (b, t), generator=gen)] - 5.0).requires_grad_(True)
    old = scale[torch.randint(0, 4, (b, t), generator=gen)] - 5.0
    adv = torch.randn(b, generator=gen) * 3
    mask = (torch.rand(b, t, generator=gen) > 0.3).float()
    loss, metrics = policy_loss(new, old, adv, mask, dual_clip=dual_clip, tis_cap=tis_cap, aggregation=aggregation)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(new.grad).all()
    assert (new.grad[mask == 0] == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())
