"""Peer check against TRL's GRPO: on one batch that TRL itself generated and scored, our `grpo`
advantages and `policy_loss` (with our chunked sampled-token logprobs) give TRL's loss and the
same gradients on every model parameter.

TRL is a test-only dependency. Loss types and their counterparts here, with TRL's `delta`
(two-sided clipping) being our dual clip bound:
    grpo  -> aggregation="seq-mean-token-mean" (per-sequence token mean, then mean over sequences)
    bnpo  -> aggregation="token-mean"
    dapo  -> aggregation="token-mean" (its normaliser is the token count of the generation batch,
             the same thing when one micro-batch is the whole batch, as here)
    dr_grpo (sum / (B · max_completion_length)) has no counterpart.
TRL normalises rewards with eps = 1e-4 (ours defaults to 1e-6), so the check passes eps=1e-4.
"""

import pytest
import torch

pytest.importorskip("trl")

from replay.core.advantages import compute_advantages  # noqa: E402
from replay.core.logprobs import sampled_token_logprobs  # noqa: E402
from replay.core.loss import policy_loss  # noqa: E402
from tests._tiny_model import tiny_model, tiny_tokenizer  # noqa: E402

G = 4
REWARDS = [1.0, 0.0, 0.0, 0.0,  # mixed
           1.0, 1.0, 0.0, 1.0,  # mixed
           0.0, 0.0, 0.0, 0.0]  # negative: zero advantage under GRPO
PROMPTS = ["w1 w2 w3", "w4 w5", "w9 w8 w7 w6"]


def trl_trainer(tmp_path, loss_type, epsilon_high, delta):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):
        return REWARDS[:len(completions)]

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(REWARDS), num_generations=G,
                      max_completion_length=6, use_cpu=True, report_to=[], save_strategy="no", bf16=False,
                      loss_type=loss_type, beta=0.0, epsilon=0.2, epsilon_high=epsilon_high, delta=delta,
                      temperature=1.0, seed=0)
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=reward, args=args, processing_class=tiny_tokenizer(),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training_step, which we skip
    return trainer


def our_token_logprobs(model, inputs):
    """[B, T] logprobs of the completion tokens through our chunked head."""
    prompt_len = inputs["prompt_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    # hidden state at position p predicts token p + 1
    picked = hidden[:, prompt_len - 1:-1].reshape(-1, hidden.shape[-1])
    targets = inputs["completion_ids"].reshape(-1)
    head = model.get_output_embeddings()
    values = sampled_token_logprobs(picked, head.weight, targets, chunk_size=5)
    return values.view(inputs["completion_ids"].shape)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,aggregation,epsilon_high,delta", [
    ("grpo", "seq-mean-token-mean", None, 3.0),
    ("bnpo", "token-mean", None, None),
    ("dapo", "token-mean", 0.28, 3.0),
])
def test_matches_trl_grpo_loss_and_gradients(tmp_path, loss_type, aggregation, epsilon_high, delta):
    trainer = trl_trainer(tmp_path, loss_type, epsilon_high, delta)
    model = trainer.model
    inputs = trainer._generate_and_score_completions(
        [{"prompt": p} for p in PROMPTS for _ in range(G)])
    # the tiny model rarely samples EOS within 6 tokens: end the completions at varied lengths, as
    # an earlier EOS would, so that the two aggregations differ
    width = inputs["completion_ids"].shape[1]
    lengths = torch.arange(len(REWARDS)) % width + 1
    inputs["completion_mask"] *= (torch.arange(width) < lengths[:, None]).to(inputs["completion_mask"].dtype)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    mask = inputs["completion_mask"].float()

    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(G)
    ours, _ = compute_advantages("grpo", torch.tensor(REWARDS), group_ids, eps=1e-4)
    torch.testing.assert_close(ours.advantage, inputs["advantages"], atol=1e-5, rtol=1e-5)

    # stale behaviour logprobs, so some ratios leave [0.8, 1.2] and some exceed the dual-clip bound 3
    model.train()
    with torch.no_grad():
        current = our_token_logprobs(model, inputs)
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(1)) * 0.9
    inputs["old_per_token_logps"] = (current + noise) * mask

    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    loss, metrics = policy_loss(our_token_logprobs(model, inputs), inputs["old_per_token_logps"], ours.advantage,
                                mask, weights=ours.weight, clip_eps=0.2, clip_eps_high=epsilon_high,
                                dual_clip=delta, aggregation=aggregation)
    loss.backward()
    assert metrics["clip_frac"] > 0
    if delta is not None:
        assert metrics["dual_clip_frac"] > 0
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert len(trl_grads) == sum(1 for p in model.parameters() if p.grad is not None) > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
