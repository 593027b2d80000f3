"""Device and precision: bf16 base weights with float32 LoRA (and so float32 AdamW state), on CPU
here as on a GPU; device and dtype names resolve with clear errors."""

import pytest
import torch

from replay.core.sampling import Distribution
from replay.learn.config import LearnConfig
from replay.learn.loop import train
from replay.learn.policy import LoraSettings, load_policy
from replay.learn.selection import LearnSample
from replay.models import ModelError, pick_device, pick_dtype, resolve_model
from tests._tiny_model import save_tiny_model, tiny_tokenizer, word_prompt


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return resolve_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny"))))


def _samples():
    tok = tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        completion = torch.randint(5, len(tok), (6 + i,), generator=gen).tolist()
        out.append(LearnSample(0, f"p{i}", i, float(i % 2), word_prompt(tok, 4, i), completion,
                               [-3.5] * len(completion), Distribution(0.7), None, None))
    return out


def _advantages():
    from types import SimpleNamespace

    return SimpleNamespace(advantage=torch.tensor([1.0, -1.0, 1.0, -1.0]), weight=torch.ones(4))


def test_bf16_base_trains_a_float32_lora_with_a_loss_close_to_float32(ref):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = load_policy(ref, None, LoraSettings(r=4, target_modules=("q_proj", "v_proj")), device="cpu",
                            dtype=dtype)
        base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        assert base == {getattr(torch, dtype)}
        rows, _ = train(model, _samples(), _advantages(), LearnConfig(lr=1e-2, micro_batch_size=2, grad_accum=2))
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
        assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it stepped
        losses[dtype] = rows[0]["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2, abs=2e-3)


def test_device_and_dtype_names():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        pick_dtype("int8", "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            pick_device("cuda:1")


def test_learn_refuses_bad_device_and_dtype_flags():
    from replay.errors import ReplayError

    with pytest.raises(ReplayError, match="--dtype"):
        LearnConfig(dtype="fp8").validate()
    with pytest.raises(ReplayError, match="--device"):
        LearnConfig(device="gpu").validate()
    LearnConfig(device="cuda:3", dtype="bfloat16").validate()
