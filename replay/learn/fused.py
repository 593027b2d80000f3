"""replay's own kernels in place of a model's modules while it learns: the same numbers, less
memory kept for the backward pass.

Today one: a Llama-shaped MLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU, whose
down_proj carries a plain peft LoRA, runs its second half through replay.core.swiglu (saves g and
u instead of g, silu(g), u and their product). The match is on the MLP's own forward, which must
be that one expression (read from its source), so a model whose MLP does anything else keeps its
own forward; so does a call when the adapter is
disabled, merged, mixed, a LoRA variant (DoRA), with active dropout, or on a quantized base.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch

from replay.core.swiglu import swiglu_lora_down

SWIGLU_LINE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


@functools.cache
def _is_swiglu_mlp(cls: type) -> bool:
    """cls.forward(self, x) is exactly `return <SWIGLU_LINE>` (or through one local name)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef) or [a.arg for a in func.args.args] != ["self", "x"]:
        return False
    body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.unparse(body[0].value) == SWIGLU_LINE
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.unparse(body[0].value) == SWIGLU_LINE
    return False


def _is_silu(act) -> bool:  # torch's, or transformers' own (ACT2FN["silu"])
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_swiglu_mlps(model: torch.nn.Module) -> int:
    """Route every fusable MLP of `model` (a peft model) through the fused kernel; returns how many."""
    fused = 0
    for module in model.modules():
        if (_is_swiglu_mlp(type(module)) and _is_silu(getattr(module, "act_fn", None))
                and hasattr(module.down_proj, "lora_A")):
            module.forward = functools.partial(_fused_forward, module)
            fused += 1
    return fused


def _plain_adapter(down, training: bool) -> str | None:
    """The one adapter a call of peft's LoRA Linear `down` would add, if it is a plain one."""
    if down.disable_adapters or down.merged or type(down.base_layer) is not torch.nn.Linear:
        return None
    active = [name for name in down.active_adapters if name in down.lora_A]
    if len(active) != 1 or active[0] in getattr(down, "lora_variant", {}):
        return None
    dropout = down.lora_dropout[active[0]]
    if training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return None
    return active[0]


def _fused_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    down = mlp.down_proj
    adapter = _plain_adapter(down, mlp.training)
    if adapter is None:
        return type(mlp).forward(mlp, x)
    return swiglu_lora_down(mlp.gate_proj(x), mlp.up_proj(x), down.base_layer.weight, down.base_layer.bias,
                            down.lora_A[adapter].weight, down.lora_B[adapter].weight, down.scaling[adapter])
