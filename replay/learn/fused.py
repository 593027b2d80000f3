"""replay's own kernels in place of a model's modules while it learns: the same numbers, fewer
fresh tensors and less memory kept for the backward pass.

- Every peft LoRA Linear runs through replay.core.lora (the LoRA term added into the base output
  in place, forward and backward).
- Llama's RMSNorm (the forward transformers' LlamaRMSNorm has, statement for statement) runs
  through replay.core.rmsnorm: the same steps in fewer fresh tensors.
- A Llama-shaped MLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU and a LoRA on
  down_proj, runs its second half through replay.core.swiglu (keeps g and u for backward instead
  of g, silu(g), u and their product). The match is on the MLP's own forward, which must be that
  one expression (read from its source), so a model whose MLP does anything else keeps its own.

Any call peft would compute differently goes through peft's own forward: adapter disabled, merged
or mixed, two active adapters, a LoRA variant (DoRA), active dropout, a base layer that is not a
plain torch Linear (quantized), extra arguments.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch

from replay.core.lora import lora_linear
from replay.core.rmsnorm import rms_norm
from replay.core.swiglu import swiglu_lora_down

SWIGLU = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
SWIGLU_BODIES = (f"return {SWIGLU}", f"down_proj = {SWIGLU}\nreturn down_proj")  # transformers writes both
RMSNORM_BODY = """
input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
return self.weight * hidden_states.to(input_dtype)
"""


def _forward_is(cls: type, arg: str, bodies: tuple[str, ...]) -> bool:
    """cls.forward(self, arg) is, statement for statement (docstrings aside), one of `bodies`."""
    try:
        func = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return False
    if not isinstance(func, ast.FunctionDef) or [a.arg for a in func.args.args] != ["self", arg]:
        return False
    body = [ast.dump(s) for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return any(body == [ast.dump(s) for s in ast.parse(expected).body] for expected in bodies)


@functools.cache
def _is_llama_rmsnorm(cls: type) -> bool:
    return _forward_is(cls, "hidden_states", (RMSNORM_BODY,))


@functools.cache
def _is_swiglu_mlp(cls: type) -> bool:
    return _forward_is(cls, "x", SWIGLU_BODIES)


def _is_silu(act) -> bool:  # torch's, or transformers' own (ACT2FN["silu"])
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_for_training(model: torch.nn.Module) -> dict[str, int]:
    """Route `model`'s (a peft model's) fusable modules through replay's kernels; returns how many
    of each kind."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = {"lora_linear": 0, "swiglu_mlp": 0, "rmsnorm": 0}
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = functools.partial(_lora_forward, module)
            fused["lora_linear"] += 1
        elif (_is_swiglu_mlp(type(module)) and _is_silu(getattr(module, "act_fn", None))
                and type(getattr(module, "down_proj", None)) is LoraLinear):
            module.forward = functools.partial(_mlp_forward, module)
            fused["swiglu_mlp"] += 1
        elif _is_llama_rmsnorm(type(module)):
            # a frozen weight without zeros: y / w gives x̂ back, so the norm keeps y (which the
            # LoRA'd projections after it keep too) instead of the residual stream x
            keep_output = not module.weight.requires_grad and bool((module.weight != 0).all())
            module.forward = functools.partial(_rmsnorm_forward, module, keep_output)
            fused["rmsnorm"] += 1
    return fused


def _plain_adapter(layer) -> str | None:
    """The one adapter a call of peft's LoRA Linear `layer` would add, if it is a plain one."""
    if layer.disable_adapters or layer.merged or type(layer.base_layer) is not torch.nn.Linear:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    dropout = layer.lora_dropout[active[0]]
    if layer.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return None
    return active[0]


def _lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = None if args or kwargs else _plain_adapter(layer)
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    return lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A[adapter].weight,
                       layer.lora_B[adapter].weight, layer.scaling[adapter])


def _mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    down = mlp.down_proj
    adapter = _plain_adapter(down)
    if adapter is None:
        return type(mlp).forward(mlp, x)
    return swiglu_lora_down(mlp.gate_proj(x), mlp.up_proj(x), down.base_layer.weight, down.base_layer.bias,
                            down.lora_A[adapter].weight, down.lora_B[adapter].weight, down.scaling[adapter])


def _rmsnorm_forward(norm, keep_output: bool, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, norm.weight, norm.variance_epsilon, keep_output)
