"""The transformers engine: pure sampling pieces with worked numbers, then the decode loop on a
tiny random Llama (fast), then the real SmolLM2 (slow)."""

import math

import pytest
import torch

from replay.engines import SamplingSettings, make_engine
from replay.engines.base import check_requests, cut_at_stop, find_stop, generator_seed
from replay.engines.hf_engine import (HFEngine, left_pad, nucleus_mask, process_logits,
                                      sample_tokens)
from tests._tiny_model import (EOS, converted_smollm2, teacher_forced_logprobs, tiny_model,
                               tiny_tokenizer, word_prompt)

PROBS = [0.5, 0.3, 0.15, 0.05]
LOG_PROBS = torch.tensor([PROBS]).log()


# --- pure pieces ------------------------------------------------------------------------------

def test_temperature_divides_logits():
    scores = process_logits(torch.tensor([[2.0, 0.0, -4.0]]), temperature=0.5, top_k=None, top_p=1.0)
    assert scores.tolist() == [[4.0, 0.0, -8.0]]


def test_top_k_keeps_the_k_largest():
    scores = process_logits(LOG_PROBS, temperature=1.0, top_k=2, top_p=1.0)
    kept = scores.softmax(-1)[0]
    assert torch.isinf(scores[0, 2:]).all()
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)


@pytest.mark.parametrize("top_p, kept", [(0.75, 2), (0.45, 1), (0.9, 3), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    # sorted mass from the tail: 0.05, 0.20, 0.50, 1.0; a token goes if the mass up to it <= 1 - p
    scores = process_logits(LOG_PROBS, temperature=1.0, top_k=None, top_p=top_p)
    assert torch.isfinite(scores[0]).tolist() == [i < kept for i in range(4)]
    assert scores.softmax(-1)[0, :kept].tolist() == pytest.approx(
        [p / sum(PROBS[:kept]) for p in PROBS[:kept]], abs=1e-6)


def test_top_p_applies_after_top_k():
    # top-k 3 renormalises to 0.526, 0.316, 0.158: top-p 0.8 then keeps two (tail mass 0.158 < 0.2)
    scores = process_logits(LOG_PROBS, temperature=1.0, top_k=3, top_p=0.8)
    assert torch.isfinite(scores[0]).tolist() == [True, True, False, False]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, 0.95), (1.3, 40, 0.8), (1.0, 7, 1.0),
                                                     (0.5, None, 0.3)])
@pytest.mark.parametrize("probe", [3, 256])  # 3: the nucleus outgrows the probe -> full sort
def test_processing_matches_transformers_warpers(temperature, top_k, top_p, probe):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = process_logits(logits, temperature, top_k, 1.0)
    if top_p < 1:
        got = got.masked_fill(~nucleus_mask(got, top_p, probe=probe), float("-inf"))
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.isfinite(got).sum(-1).min() >= 1
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1))


def test_inverse_cdf_draws_follow_the_probabilities():
    n = 1000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spaced quantiles
    tokens, logprobs = sample_tokens(LOG_PROBS.expand(n, 4), uniforms)
    assert torch.bincount(tokens, minlength=4).tolist() == [500, 300, 150, 50]
    assert logprobs.tolist() == pytest.approx([math.log(PROBS[t]) for t in tokens.tolist()], abs=1e-6)


def test_cut_tokens_are_never_drawn_even_at_u_near_one():
    scores = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]])
    tokens, logprobs = sample_tokens(scores, torch.tensor([1 - 1e-16]))
    assert tokens.tolist() == [1]
    assert logprobs.item() == pytest.approx(1 - math.log(1 + math.e), abs=1e-6)


def test_left_pad_counts_positions_from_each_prompt_start():
    ids, mask, positions = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_contract_helpers():
    assert find_stop("abc STOP x END", ["END", "STOP"]) == 4
    assert cut_at_stop("abc STOP x", ["STOP"]) == "abc "
    assert cut_at_stop("abc", ["STOP"]) == "abc"
    assert generator_seed(-1) == 2**64 - 1 and generator_seed(2**70 + 5) == 5
    with pytest.raises(ValueError, match="one seed per request"):
        check_requests([[1], [2]], [0])
    with pytest.raises(ValueError, match="empty"):
        check_requests([[1], []], [0, 1])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
                dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
    assert SamplingSettings(top_k=-1).top_k_cut(50) is None
    assert SamplingSettings(top_k=60).top_k_cut(50) is None and SamplingSettings(top_k=5).top_k_cut(50) == 5


# --- the decode loop on a tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def prompts_of_mixed_length(tokenizer):
    return [word_prompt(tokenizer, n, offset=n) for n in (3, 9, 1, 14, 5)]


SETTINGS = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24)


def test_same_seed_same_tokens_across_batch_sizes_and_neighbours(tiny):
    model, tokenizer = tiny
    prompts = prompts_of_mixed_length(tokenizer)
    seeds = [11, 12, 13, 14, 15]
    reference = HFEngine(model, tokenizer, batch_size=1).generate(prompts, seeds, SETTINGS)
    for batch_size in (2, 5):
        batched = HFEngine(model, tokenizer, batch_size=batch_size).generate(prompts, seeds, SETTINGS)
        assert [c.token_ids for c in batched] == [c.token_ids for c in reference]
    # request 1 again, now beside other prompts and seeds and in a different slot
    mixed = HFEngine(model, tokenizer, batch_size=4).generate(
        [prompts[3], prompts[1], word_prompt(tokenizer, 20), prompts[1]], [99, 12, 7, 13], SETTINGS)
    assert mixed[1].token_ids == reference[1].token_ids
    # left padding changes nothing: alone and padded logprobs agree closely too
    assert mixed[1].logprobs == pytest.approx(reference[1].logprobs, abs=1e-5)


def test_different_seeds_give_different_samples(tiny):
    model, tokenizer = tiny
    prompt = word_prompt(tokenizer, 4)
    out = HFEngine(model, tokenizer, batch_size=8).generate([prompt] * 8, list(range(8)), SETTINGS)
    assert len({tuple(c.token_ids) for c in out}) == 8


@pytest.mark.parametrize("settings", [
    SETTINGS,
    SamplingSettings(temperature=1.0, max_new_tokens=16),
    SamplingSettings(temperature=1.7, top_k=5, max_new_tokens=16),
    SamplingSettings(temperature=0.5, top_p=0.7, max_new_tokens=16),
])
def test_stored_logprobs_equal_teacher_forced_recompute(tiny, settings):
    model, tokenizer = tiny
    prompts = prompts_of_mixed_length(tokenizer)
    out = HFEngine(model, tokenizer, batch_size=3).generate(prompts, [1, 2, 3, 4, 5], settings)
    for prompt, completion in zip(prompts, out):
        recomputed = teacher_forced_logprobs(model, prompt, completion.token_ids, settings)
        assert completion.logprobs == pytest.approx(recomputed, abs=1e-4)
    if settings.temperature != 1.0:  # the stored numbers are the processed, not the raw, ones
        raw = teacher_forced_logprobs(model, prompts[0], out[0].token_ids, SamplingSettings())
        assert max(abs(a - b) for a, b in zip(raw, out[0].logprobs)) > 1e-2


def test_finish_reasons_and_lengths(tiny):
    model, tokenizer = tiny
    settings = SamplingSettings(temperature=1.0, max_new_tokens=30)
    out = HFEngine(model, tokenizer, batch_size=8).generate(
        [word_prompt(tokenizer, 3)] * 24, list(range(24)), settings)
    for c in out:
        assert 1 <= len(c.token_ids) <= settings.max_new_tokens and len(c.logprobs) == len(c.token_ids)
        assert c.token_ids.count(tokenizer.eos_token_id) == (c.finish_reason == "stop")
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tokenizer.eos_token_id and EOS not in c.text
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == settings.max_new_tokens
    assert {c.finish_reason for c in out} == {"stop", "length"}


def test_stop_string_ends_the_sample_and_is_cut_from_the_text(tiny):
    model, tokenizer = tiny
    prompt, seed = word_prompt(tokenizer, 6), 3
    free = HFEngine(model, tokenizer).generate([prompt], [seed], SETTINGS)[0]
    stop_word = tokenizer.decode([free.token_ids[len(free.token_ids) // 2]])  # a word midway
    # the sample must end at the first token whose text completes the stop string
    prefix_texts = [tokenizer.decode(free.token_ids[:n], skip_special_tokens=True)
                    for n in range(1, len(free.token_ids) + 1)]
    n_expected = next(n for n, text in enumerate(prefix_texts, 1) if stop_word in text)
    settings = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24,
                                stop=(stop_word,))
    stopped = HFEngine(model, tokenizer).generate([prompt], [seed], settings)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:n_expected]
    assert stopped.logprobs == free.logprobs[:n_expected]
    assert stop_word not in stopped.text
    assert stopped.text == prefix_texts[n_expected - 1].split(stop_word)[0]


def test_greedy_takes_the_argmax_with_logprob_zero(tiny):
    model, tokenizer = tiny
    prompt = word_prompt(tokenizer, 5)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=8)
    out = HFEngine(model, tokenizer, batch_size=2).generate([prompt, prompt], [1, 2], settings)
    assert out[0].token_ids == out[1].token_ids and out[0].logprobs == [0.0] * len(out[0].token_ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + out[0].token_ids])).logits[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out[0].token_ids


def test_only_last_position_logits_are_computed(tiny):
    model, tokenizer = tiny
    shapes = []
    hook = model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    try:
        HFEngine(model, tokenizer, batch_size=3).generate(prompts_of_mixed_length(tokenizer)[:3], [1, 2, 3],
                                                          SamplingSettings(max_new_tokens=6))
    finally:
        hook.remove()
    assert shapes and all(s[1] == 1 for s in shapes)
    assert shapes[0] == (3, 1, len(tokenizer))


def test_lora_adapter_is_applied_on_top_of_the_base(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = tiny
    adapter = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    adapter.save_pretrained(str(tmp_path / "adapter"))
    prompt, settings = word_prompt(tokenizer, 5), SamplingSettings(max_new_tokens=12)
    engine = HFEngine(tiny_model(), tokenizer, lora=tmp_path / "adapter")
    lora_out = engine.generate([prompt], [4], settings)[0]
    assert engine.lora == str(tmp_path / "adapter")
    assert lora_out.logprobs == pytest.approx(
        teacher_forced_logprobs(engine.model, prompt, lora_out.token_ids, settings), abs=1e-4)
    assert lora_out.logprobs != pytest.approx(  # the adapter really changes the distribution
        teacher_forced_logprobs(tiny_model(), prompt, lora_out.token_ids, settings), abs=1e-3)


# --- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_logprobs_match_recompute_and_seeds_repeat():
    from replay.prompting import chat_prompt_ids

    ref, _ = converted_smollm2()
    engine = make_engine("transformers", ref, batch_size=8)
    problems = ["What is 7 + 5?", "What is 12 * 3?", "Compute 100 - 37.", "What is 2 to the power 5?"]
    prompts = [chat_prompt_ids(engine.tokenizer, p) for p in problems for _ in range(2)]
    seeds = [1000 + i for i in range(len(prompts))]
    settings = SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=32)
    out = engine.generate(prompts, seeds, settings)
    for prompt, completion in zip(prompts, out):
        recomputed = teacher_forced_logprobs(engine.model, prompt, completion.token_ids, settings)
        assert completion.logprobs == pytest.approx(recomputed, abs=2e-3)
    assert out[0].token_ids != out[1].token_ids  # same prompt, different seed
    engine.batch_size = 3
    again = engine.generate(prompts, seeds, settings)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
