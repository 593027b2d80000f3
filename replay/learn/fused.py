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

SWIGLU_LINE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
RMSNORM_BODY = """
input_dtype = hidden_states.dtype
hidden_states = hidden_states.to(torch.float32)
variance = hidden_states.pow(2).mean(-1, keepdim=True)
hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
return self.weight * hidden_states.to(input_dtype)
"""


def _forward_tree(cls: type) -> ast.FunctionDef | None:
    try:
        func = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    return func if isinstance(func, ast.FunctionDef) else None


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:  # without docstrings
    return [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]


@functools.cache
def _is_llama_rmsnorm(cls: type) -> bool:
    func = _forward_tree(cls)
    if func is None or [a.arg for a in func.args.args] != ["self", "hidden_states"]:
        return False
    expected = ast.parse(RMSNORM_BODY).body
    return [ast.dump(s) for s in _statements(func.body)] == [ast.dump(s) for s in expected]


@functools.cache
def _is_swiglu_mlp(cls: type) -> bool:
    """cls.forward(self, x) is exactly `return <SWIGLU_LINE>` (or through one local name)."""
    func = _forward_tree(cls)
    if func is None or [a.arg for a in func.args.args] != ["self", "x"]:
        return False
    body = _statements(func.body)
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.unparse(body[0].value) == SWIGLU_LINE
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.unparse(body[0].value) == SWIGLU_LINE
    return False


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
