"""load_policy routes a Llama MLP with a LoRA down_proj through the fused kernel: the same logprobs
and LoRA gradients as peft's own modules, less kept for backward, and peft's path wherever the
kernel would not compute what peft does."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from replay.learn.fused import fuse_swiglu_mlps
from replay.learn.policy import LoraSettings, load_policy, make_batch, token_logprobs
from replay.models import resolve_model
from tests._tiny_model import save_tiny_model, tiny_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13, 14, 15], [16, 17, 18]])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return resolve_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny"))))


def nonzero_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0: the LoRA path would carry no signal
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def mlps(model):
    return [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]


def logprobs_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = token_logprobs(model, BATCH)
    (out * BATCH.target_mask * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_load_policy_fuses_every_mlp_and_changes_no_number(ref):
    fused = nonzero_lora(load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32"))
    plain = load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32")
    plain.load_state_dict(fused.state_dict())
    for mlp in mlps(plain):
        del mlp.forward  # back to the class's own forward: peft's modules
    assert len(mlps(fused)) == 2 and all("forward" in vars(m) for m in mlps(fused))
    fused.train(), plain.train()
    ours, our_grads = logprobs_and_grads(fused)
    theirs, their_grads = logprobs_and_grads(plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and any("down_proj.lora_A" in n for n in our_grads)
    for name in our_grads:
        # float32 rounding of a different summation order, relative to the gradient's size
        assert float((our_grads[name] - their_grads[name]).norm() / their_grads[name].norm()) < 1e-5, name


def test_the_fused_policy_keeps_less_for_backward(ref):
    """Two [tokens, intermediate] tensors per layer fewer: silu(g) and the product h."""
    def saved(model):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_logprobs(model, BATCH)
        return sum(storages.values())

    fused = load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32")
    plain = load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32")
    for mlp in mlps(plain):
        del mlp.forward
    tokens, inner = BATCH.input_ids.numel(), fused.config.intermediate_size
    layers = fused.config.num_hidden_layers
    assert saved(plain) - saved(fused) == layers * 2 * tokens * inner * 4


def test_peft_path_wherever_the_kernel_would_differ(ref):
    """Active dropout, disabled adapter, two active adapters, merged weights, no LoRA on down_proj,
    DoRA, a base layer with its own forward: each call goes through the modules (or is not fused
    at all) and gives peft's numbers."""
    def model(**lora):
        m = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, **{"target_modules": list(ALL)} | lora))
        return nonzero_lora(m)

    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5))
    with_dropout = model(lora_dropout=0.5)
    assert fuse_swiglu_mlps(with_dropout) == 2
    with_dropout.train()
    torch.manual_seed(0)
    drop_a = mlps(with_dropout)[0](x)
    torch.manual_seed(0)
    drop_b = type(mlps(with_dropout)[0]).forward(mlps(with_dropout)[0], x)
    torch.testing.assert_close(drop_a, drop_b)  # the same dropout mask: the same path

    m = model()
    fuse_swiglu_mlps(m)
    mlp = mlps(m)[0]
    base_out = mlp.down_proj.base_layer(torch.nn.functional.silu(mlp.gate_proj.base_layer(x))
                                        * mlp.up_proj.base_layer(x))
    with m.disable_adapter():
        torch.testing.assert_close(mlp(x), base_out)
    m.add_adapter("second", LoraConfig(r=2, target_modules=list(ALL)))
    nonzero_lora(m, seed=1)
    m.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))
    m.base_model.set_adapter("default")
    unmerged = mlp(x)
    m.merge_adapter()
    torch.testing.assert_close(mlp(x), unmerged, rtol=1e-5, atol=1e-5)
    assert fuse_swiglu_mlps(model(target_modules=["q_proj", "gate_proj"])) == 0

    dora = model(use_dora=True)
    fuse_swiglu_mlps(dora)
    torch.testing.assert_close(mlps(dora)[0](x), type(mlp).forward(mlps(dora)[0], x))

    class DoublingLinear(torch.nn.Linear):  # a base layer with its own forward, as quantized ones have
        def forward(self, x):
            return 2 * super().forward(x)

    quantized = model()
    fuse_swiglu_mlps(quantized)
    mlp = mlps(quantized)[0]
    mlp.down_proj.base_layer.__class__ = DoublingLinear
    torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))


def test_an_mlp_that_computes_something_else_is_not_fused():
    m = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=list(ALL)))
    mlp = mlps(m)[0]

    class ScaledMLP(type(mlp)):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__class__ = ScaledMLP
    assert fuse_swiglu_mlps(m) == 1  # the other layer's plain LlamaMLP only
    assert "forward" not in vars(mlp)
