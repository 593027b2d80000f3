"""Test models: a tiny random Llama + word-level tokenizer built in-process (no download), a
teacher-forced logprob recompute, and the real SmolLM2 converted once per test process."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from replay.engines.base import SamplingSettings
from replay.engines.hf_engine import process_logits

SPECIALS = ["<unk>", "<pad>", "<bos>", "<|im_end|>", "<|im_start|>"]
WORDS = ["system", "user", "assistant", "Reason", "boxed", "answer"] + [f"w{i}" for i in range(40)]
EOS = "<|im_end|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<bos>", eos_token=EOS,
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """Random 2-layer Llama; init scale 0.2 so next-token distributions are peaked, not uniform."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    return model


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return directory


def word_prompt(tokenizer, n_words: int, offset: int = 0) -> list[int]:
    text = " ".join(f"w{(offset + 7 * i) % 40}" for i in range(n_words))
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int],
                            settings: SamplingSettings) -> list[float]:
    """Logprob of each completion token under the processed distribution, from one full forward
    pass over prompt + completion (no cache, no padding)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    step_logits = logits[len(prompt) - 1:-1]
    if settings.greedy:
        return [0.0] * len(completion)
    scores = process_logits(step_logits, settings.temperature,
                            settings.top_k_cut(step_logits.shape[-1]), settings.top_p)
    return scores.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


@functools.lru_cache(maxsize=1)
def converted_smollm2():
    """The embedded SmolLM2, converted once per test process into a throwaway REPLAY_HOME."""
    from replay.models import resolve_model

    home = tempfile.mkdtemp(prefix="replay-home-")
    atexit.register(shutil.rmtree, home, True)
    previous = os.environ.get("REPLAY_HOME")
    os.environ["REPLAY_HOME"] = home
    try:
        return resolve_model("smollm2-135m"), Path(home)
    finally:
        if previous is None:
            del os.environ["REPLAY_HOME"]
        else:
            os.environ["REPLAY_HOME"] = previous
