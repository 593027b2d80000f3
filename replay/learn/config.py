"""`replay learn` settings: one typed dataclass, the CLI flags and the TOML [learn] table mirror it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas import MAIN_ADAPTER

from replay.core import AGGREGATIONS, BEHAVIOUR_CORRECTIONS, D_IMP_MODES, OBJECTIVES, RESCUES
from replay.errors import ReplayError

DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "float32", "bfloat16")
ZERO_ADVANTAGE = ("skip", "keep")
HINTED_AS = ("rescue", "prompt")
# every attention and MLP projection of a Llama-style block (SmolLM2, Qwen, Mistral name them alike)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LearnConfig:
    round: int = 0
    objective: str = "lens"  # one of replay.core.OBJECTIVES
    adapter_name: str = MAIN_ADAPTER
    window: int = 1  # train on rounds [round-window+1, round]
    where: str | None = None  # SQL predicate over the `samples` view; a group is kept if any sample matches
    recompute_old_logprobs: bool = False
    partial: bool = False  # train on the fully scored groups of a window whose rounds are not all scored
    init_from_previous: bool = True  # continue round-1's adapter when it exists
    model: str | None = None  # default: the store's base model
    device: str = "auto"  # auto: CUDA when available (the local rank's GPU under torchrun)
    dtype: str = "auto"  # base weights; auto: bfloat16 on a GPU that supports it, else float32
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-5
    epochs: int = 1
    micro_batch_size: int = 4
    grad_accum: int = 4
    steps: int | None = None  # exactly this many optimizer steps per epoch (grad_accum then unused)
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = 3.0
    tis_cap: float | None = None
    aggregation: str = "seq-mean-token-mean"
    lens_alpha: float = 0.25
    lens_d_imp: str = "confidence"
    lens_inv_group_size: bool = True
    w_reinforce_lambda: float = 0.1
    gradient_checkpointing: bool = False
    zero_advantage: str = "skip"  # skip: no compute, not in the plan | keep: in the plan and the normaliser, loss 0
    rescue: str = "none"  # replay: stored correct rollouts of the prompt join each negative group
    rescue_max: int = 2  # at most this many replayed rows per negative group
    rescue_sql: str | None = None  # a query over `rescue_candidates` returning rollout_id: replaces the default pick
    behaviour_correction: str = "tis"  # replayed rows: tis | seq-mask | none | shaping (replay.core.behaviour)
    behaviour_cap: float = 2.0  # C of tis and seq-mask
    shaping_gamma: float = 0.1  # γ of shaping's f(π) = π/(π+γ)
    hinted_as: str = "rescue"  # hint sets' rows: rescue sources for --rescue replay | prompt: groups of their own
    seed: int = 0
    force: bool = False
    report_to: str = "none"  # live metrics: none | tensorboard | wandb (replay.metrics_sink)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ReplayError(f"unknown --objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ReplayError(f"unknown --aggregation {self.aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
        if self.epochs < 1 or self.micro_batch_size < 1 or self.grad_accum < 1 or self.window < 1:
            raise ReplayError("--epochs, --micro-batch-size, --grad-accum and --window must be at least 1")
        if self.steps is not None and not self.steps >= 1:
            raise ReplayError(f"--steps must be at least 1, got {self.steps}")
        if self.lens_d_imp not in D_IMP_MODES:
            raise ReplayError(f"unknown --lens-d-imp {self.lens_d_imp!r}; choose from {', '.join(D_IMP_MODES)}")
        if self.zero_advantage not in ZERO_ADVANTAGE:
            raise ReplayError(f"unknown --zero-advantage {self.zero_advantage!r}; choose from "
                              f"{', '.join(ZERO_ADVANTAGE)}")
        if self.rescue not in RESCUES:
            raise ReplayError(f"unknown --rescue {self.rescue!r}; choose from {', '.join(RESCUES)}")
        if self.behaviour_correction not in BEHAVIOUR_CORRECTIONS:
            raise ReplayError(f"unknown --behaviour-correction {self.behaviour_correction!r}; choose from "
                              f"{', '.join(BEHAVIOUR_CORRECTIONS)}")
        if not self.rescue_max >= 1:
            raise ReplayError(f"--rescue-max must be at least 1, got {self.rescue_max}")
        if not self.behaviour_cap > 1.0:  # `not >` also refuses nan
            raise ReplayError(f"--behaviour-cap must be a number above 1, got {self.behaviour_cap}")
        if not self.shaping_gamma > 0.0 or self.shaping_gamma == float("inf"):
            raise ReplayError(f"--shaping-gamma must be a positive number, got {self.shaping_gamma}")
        if self.hinted_as not in HINTED_AS:
            raise ReplayError(f"unknown --hinted-as {self.hinted_as!r}; choose from {', '.join(HINTED_AS)}")
        if self.rescue_sql is not None and self.rescue != "replay":
            raise ReplayError("--rescue-sql picks replayed rows: it needs --rescue replay")
        if self.dtype not in DTYPES:
            raise ReplayError(f"unknown --dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ReplayError(f"unknown --device {device!r}; use {DEVICES}")
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        """Numbers the optimizer and the loss take on trust: NaN or 0 there trains nothing, or NaN."""
        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        positive = {"--max-grad-norm": self.max_grad_norm, "--clip-eps": self.clip_eps,
                    "--clip-eps-high": self.clip_eps_high, "--tis-cap": self.tis_cap}
        for flag, value in positive.items():
            if value is not None and not (finite(value) and value > 0):  # `not >` also refuses nan
                raise ReplayError(f"{flag} must be a finite number above 0, got {value}")
        # --lr 0: every pass runs and nothing changes (a dry run of learn, which tests use)
        for flag, value in {"--lr": self.lr, "--lens-alpha": self.lens_alpha,
                            "--w-reinforce-lambda": self.w_reinforce_lambda}.items():
            if not (finite(value) and value >= 0):
                raise ReplayError(f"{flag} must be a finite number >= 0, got {value}")
        if self.dual_clip is not None and not (finite(self.dual_clip) and self.dual_clip > 1):
            raise ReplayError(f"--dual-clip must be a finite number above 1 (or 0: off), got {self.dual_clip}")
        if not self.lora_r >= 1:
            raise ReplayError(f"--lora-r must be at least 1, got {self.lora_r}")
        if not self.lora_alpha >= 1:
            raise ReplayError(f"--lora-alpha must be at least 1, got {self.lora_alpha}")
        if not (finite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise ReplayError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ReplayError("--target-modules names no module: give comma-separated names such as q_proj,v_proj")
