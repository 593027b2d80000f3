"""At θ = θ_old the importance ratio is exactly 1 for every sampling setting the engines store,
on models whose head has a bias or a final-logit softcap; the step's gradient does not depend on
how it is cut into micro-batches."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, PhiConfig, PhiForCausalLM

from replay.core.sampling import stored_distribution
from replay.engines import SamplingSettings
from replay.engines.hf_engine import HFEngine
from replay.learn.config import LearnConfig
from replay.learn.loop import train
from replay.learn.policy import make_batch, token_logprobs
from replay.learn.selection import LearnSample
from tests._tiny_model import tiny_model, tiny_tokenizer, word_prompt

SETTINGS = list(itertools.product([0.7, 1.0], [0, 5], [1.0, 0.8]))  # temperature x top_k x top_p
TOKENIZER = tiny_tokenizer()
SIZES = dict(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
             bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id,
             pad_token_id=TOKENIZER.pad_token_id)


def biased_head_model():
    torch.manual_seed(1)
    model = PhiForCausalLM(PhiConfig(**SIZES)).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 2.0)  # a large bias: (h·W + b)/T differs from (h/T)·W + b
    return model


def softcapped_model():
    torch.manual_seed(2)
    model = Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=16, final_logit_softcapping=3.0)).eval()
    with torch.no_grad():
        # logits past the cap, so the softcap matters, but not so far that tanh saturates into
        # exact float ties (at a tie on the cut the engines keep an arbitrary one; we keep all)
        model.lm_head.weight.mul_(2.0)
    return model


MODELS = {"llama": tiny_model, "phi-bias": biased_head_model, "gemma2-softcap": softcapped_model}


def _policy(model, init_lora_weights=True):
    model.generation_config = GenerationConfig(bos_token_id=TOKENIZER.bos_token_id,
                                               eos_token_id=TOKENIZER.eos_token_id,
                                               pad_token_id=TOKENIZER.pad_token_id)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init_lora_weights)
    return get_peft_model(model, config)


def engine_samples(policy, temperature, top_k, top_p, n=6):
    """Rows as the transformers engine stores them (processed logprobs), sampled by `policy`."""
    prompts = [word_prompt(TOKENIZER, 3 + i % 3, offset=i) for i in range(n)]
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10)
    completions = HFEngine(policy, TOKENIZER, batch_size=n).generate(prompts, list(range(n)), settings)
    distribution = stored_distribution("processed", temperature, top_k, top_p)
    return [LearnSample(0, f"p{i}", i, float(i % 2), prompts[i], c.token_ids, c.logprobs, distribution, None, None)
            for i, c in enumerate(completions)]


def _advantages(n):
    return SimpleNamespace(advantage=torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64),
                           weight=torch.ones(n, dtype=torch.float64))


@pytest.fixture(scope="module", params=list(MODELS))
def policy(request):
    return _policy(MODELS[request.param]())


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_ratio_is_one_before_any_update(policy, temperature, top_k, top_p):
    samples = engine_samples(policy, temperature, top_k, top_p)
    batch = make_batch([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                       [s.distribution for s in samples])
    with torch.no_grad():
        ours = token_logprobs(policy, batch)
    for i, s in enumerate(samples):
        log_ratio = ours[i, : len(s.completion_ids)] - torch.tensor(s.old_logprobs)
        assert log_ratio.abs().max() < 1e-4, (i, log_ratio)
    # the first optimizer step sees ratio 1 and clips nothing (lr 0 keeps θ = θ_old for the next case)
    cfg = LearnConfig(lr=0.0, micro_batch_size=2, grad_accum=3, clip_eps=0.2, dual_clip=3.0)
    rows, _ = train(policy, samples, _advantages(len(samples)), cfg)
    assert len(rows) == 1
    assert rows[0]["clip_frac"] == 0.0 and rows[0]["dual_clip_frac"] == 0.0
    assert abs(rows[0]["ratio_mean"] - 1) < 1e-4 and abs(rows[0]["ratio_max"] - 1) < 1e-4


def test_the_tempered_head_is_not_the_model_head_scaled():
    """The defect this guards: (h/T)·W + b instead of (h·W + b)/T is far off with a biased head."""
    policy = _policy(biased_head_model())
    samples = engine_samples(policy, 0.5, 0, 1.0)
    s = samples[0]
    batch = make_batch([s.prompt_ids], [s.completion_ids], [s.distribution])
    with torch.no_grad():
        exact = token_logprobs(policy, batch)[0, : len(s.completion_ids)]
        body, head = policy.get_base_model().model, policy.get_base_model().lm_head
        hidden = body(input_ids=batch.input_ids).last_hidden_state[0, batch.source_positions[0, : len(s.completion_ids)]]
        wrong = torch.log_softmax(hidden / 0.5 @ head.weight.T + head.bias, -1).gather(
            1, torch.tensor(s.completion_ids)[:, None])[:, 0]
    assert (exact - torch.tensor(s.old_logprobs)).abs().max() < 1e-4
    assert (wrong - torch.tensor(s.old_logprobs)).abs().max() > 0.1


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_accumulation_four_by_one_equals_one_by_four(aggregation):
    results = []
    for micro, accum in [(4, 1), (1, 4), (2, 2)]:
        torch.manual_seed(0)
        policy = _policy(tiny_model(), init_lora_weights=False)  # random B: A gets gradient too
        samples = engine_samples(policy, 1.0, 0, 1.0, n=4)
        cfg = LearnConfig(lr=1e-3, micro_batch_size=micro, grad_accum=accum, max_grad_norm=1e9,
                          aggregation=aggregation)
        assert len({len(s.completion_ids) for s in samples}) > 1  # unequal lengths: token shares differ
        rows, _ = train(policy, samples, _advantages(4), cfg)
        lora = {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k}
        results.append((rows[0], lora))
    (ref_row, ref_lora), others = results[0], results[1:]
    for row, lora in others:
        assert row["grad_norm"] == pytest.approx(ref_row["grad_norm"], rel=1e-5)
        for k in ref_lora:
            torch.testing.assert_close(lora[k], ref_lora[k], atol=1e-6, rtol=1e-5)


def test_a_model_with_final_processing_the_learner_does_not_know_is_refused():
    from replay.errors import ReplayError
    from replay.learn.policy import check_head

    class Doubled(type(tiny_model())):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = tiny_model()
    model.__class__ = Doubled
    with pytest.raises(ReplayError, match="final logits are not lm_head"):
        check_head(model)
    check_head(tiny_model())
