"""load_policy routes peft's LoRA Linears and Llama MLPs through replay's kernels: the same
logprobs and LoRA gradients as peft's own modules, less kept for backward, and peft's path
wherever the kernels would not compute what peft does."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from replay.learn.fused import fuse_for_training
from replay.learn.policy import LoraSettings, load_policy, make_batch, token_logprobs
from replay.models import resolve_model
from tests._autograd import saved_bytes
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


def unfused(model):
    for module in model.modules():
        vars(module).pop("forward", None)  # back to the class's own forward: peft's modules
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
    unfused(plain).load_state_dict(fused.state_dict())
    assert len(mlps(fused)) == 2 and all("forward" in vars(m) for m in mlps(fused))
    assert sum("forward" in vars(m) for m in fused.modules()) == 2 * len(ALL) + 2 + 5  # linears, MLPs, norms
    fused.train(), plain.train()
    ours, our_grads = logprobs_and_grads(fused)
    theirs, their_grads = logprobs_and_grads(plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and any("down_proj.lora_A" in n for n in our_grads)
    for name in our_grads:
        # float32 rounding of a different summation order, relative to the gradient's size
        assert float((our_grads[name] - their_grads[name]).norm() / their_grads[name].norm()) < 1e-5, name


def test_the_fused_policy_keeps_less_for_backward(ref):
    """Two [tokens, intermediate] tensors per layer fewer (silu(g) and the product h), and the norms
    keep their output, which the LoRA'd projections keep anyway, instead of the residual stream:
    one [tokens, hidden] fewer per norm whose input needs a gradient (all but layer 0's first)."""
    def saved(model):  # activations kept for backward (parameters cost nothing more)
        return saved_bytes(lambda: token_logprobs(model, BATCH), exclude=list(model.parameters()))

    fused = load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32")
    plain = unfused(load_policy(ref, None, LoraSettings(r=4, target_modules=ALL), device="cpu", dtype="float32"))
    tokens, inner = BATCH.input_ids.numel(), fused.config.intermediate_size
    layers = fused.config.num_hidden_layers
    hidden = fused.config.hidden_size
    assert saved(plain) - saved(fused) == (layers * 2 * tokens * inner + (2 * layers - 1) * tokens * hidden) * 4


def test_peft_path_wherever_the_kernels_would_differ():
    """Active dropout, disabled adapter, two active adapters, merged weights, DoRA, a base layer
    with its own forward: the fused model gives peft's numbers (the same dropout masks too)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def pair(**lora):
        peft_model = nonzero_lora(get_peft_model(tiny_model(), LoraConfig(
            r=4, lora_alpha=8, **{"target_modules": list(ALL)} | lora)))
        ours = copy.deepcopy(peft_model)
        return peft_model.train(), ours.train(), fuse_for_training(ours)

    def agree(theirs, ours):
        torch.manual_seed(0)
        expected = theirs(input_ids=ids).logits
        torch.manual_seed(0)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    theirs, ours, counts = pair(lora_dropout=0.5)
    assert counts == {"lora_linear": 2 * len(ALL), "swiglu_mlp": 2, "rmsnorm": 5}
    agree(theirs, ours)
    theirs, ours, _ = pair()
    with theirs.disable_adapter(), ours.disable_adapter():
        agree(theirs, ours)
    for m in (theirs, ours):
        torch.manual_seed(1)  # the same random A for both
        m.add_adapter("second", LoraConfig(r=2, target_modules=list(ALL)))
        nonzero_lora(m, seed=1)
        m.base_model.set_adapter(["default", "second"])
    agree(theirs, ours)
    for m in (theirs, ours):
        m.base_model.set_adapter("default")
        m.merge_adapter()
    agree(theirs, ours)
    agree(*pair(use_dora=True)[:2])

    class DoublingLinear(torch.nn.Linear):  # a base layer with its own forward, as quantized ones have
        def forward(self, x):
            return 2 * super().forward(x)

    theirs, ours, _ = pair()
    for m in (theirs, ours):
        for layer in (mlps(m)[0].down_proj, m.base_model.model.model.layers[0].self_attn.q_proj):
            layer.base_layer.__class__ = DoublingLinear
    agree(theirs, ours)
    assert pair(target_modules=["q_proj", "gate_proj"])[2] == {"lora_linear": 4, "swiglu_mlp": 0, "rmsnorm": 5}


def test_an_mlp_that_computes_something_else_is_not_fused():
    m = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=list(ALL)))
    mlp = mlps(m)[0]

    class ScaledMLP(type(mlp)):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__class__ = ScaledMLP
    assert fuse_for_training(m)["swiglu_mlp"] == 1  # the other layer's plain LlamaMLP only
    assert "forward" not in vars(mlp)


def test_only_llamas_rmsnorm_forward_is_replaced():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class EpsOutside(LlamaRMSNorm):  # one operation moved: not Llama's steps any more
        def forward(self, hidden_states):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance) + self.variance_epsilon
            return self.weight * hidden_states.to(input_dtype)

    norms = torch.nn.ModuleList([LlamaRMSNorm(8), GemmaRMSNorm(8), EpsOutside(8)])
    assert fuse_for_training(norms)["rmsnorm"] == 1
    assert ["forward" in vars(m) for m in norms] == [True, False, False]
    x = torch.randn(3, 8)
    assert torch.equal(norms[0](x), LlamaRMSNorm.forward(norms[0], x))


def test_a_norm_weight_with_a_zero_keeps_its_input():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norms = torch.nn.ModuleList([LlamaRMSNorm(4), LlamaRMSNorm(4)]).requires_grad_(False)
    norms[1].weight[2] = 0.0  # y / w would be 0 / 0 there
    fuse_for_training(norms)
    assert [vars(m)["forward"].args[1] for m in norms] == [True, False]
