"""`replay generate`: sample G completions per prompt with the round's policy and store them.

Policy of round r = base model + the adapter learned in round r-1 (round 0: the base model).
Whole groups are written per part file, so after a crash a prompt has either all G rows or none;
a rerun skips the prompts whose groups are stored and samples the rest with the same seeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from dataclasses import asdict, dataclass, field

from replay import keys
from replay.datasets import Prompt, load_prompts
from replay.errors import ReplayError
from replay.manifests import finish_manifest, record_run, start_manifest
from replay.progress import note, progress_bar
from replay.store import Store, utc_now


@dataclass
class GenerateConfig:
    round: int = 0
    dataset: str = "arith"
    num_prompts: int | None = 64
    split: str = "train"
    problem_key: str | None = None
    answer_key: str | None = None
    dataset_config: str | None = None  # a hub dataset's configuration (name)
    dataset_split: str | None = None  # the split to read from a hub dataset / DatasetDict (default: split)
    levels: tuple[int, ...] = (1, 2, 3, 4, 5)
    model: str = "smollm2-135m"
    engine: str = "auto"  # auto = vllm if importable, else transformers
    adapter: str = "auto"  # auto = the adapter of round-1 | none | a peft adapter directory
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # prompts per written part file (each with all its samples)
    shard: str = "0/1"
    instruction: str | None = None  # None: the default \boxed{} instruction
    stage: str = "generate"  # manifest name; eval writes its own
    extra: dict = field(default_factory=dict)


def pick_engine(name: str) -> str:
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "transformers"
    return name


def policy_adapter(store: Store, round: int, adapter: str) -> tuple[int | None, str | None]:
    """(policy_round, adapter path) for sampling round `round`."""
    if adapter == "none" or (adapter == "auto" and round == 0):
        return None, None
    if adapter == "auto":
        path = store.adapter_dir(round - 1)
        if not (path / "adapter_config.json").exists():
            raise ReplayError(f"round {round} samples with the adapter of round {round - 1}, but {path} "
                              f"has none: run `replay learn --round {round - 1}` first, or pass --adapter none")
        return round - 1, str(path)
    from pathlib import Path

    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise ReplayError(f"--adapter {adapter}: not a peft adapter directory (no adapter_config.json)")
    manifest = path / "manifest.json"
    policy_round = None
    if manifest.exists():
        import json

        policy_round = json.loads(manifest.read_text()).get("round")
    return policy_round, str(path.absolute())


def stored_groups(store: Store, round: int, num_samples: int) -> set[str]:
    """prompt_ids whose group of this round is already stored; refuses a changed group size."""
    rows = store.query("SELECT prompt_id, count(*) AS n FROM rollouts WHERE round = ? GROUP BY prompt_id", [round])
    sizes = dict(zip(rows.column("prompt_id").to_pylist(), rows.column("n").to_pylist()))
    odd = {pid: n for pid, n in sizes.items() if n != num_samples}
    if odd:
        pid, n = next(iter(odd.items()))
        raise ReplayError(f"round {round} already holds groups of {n} samples (prompt {pid}), not "
                          f"--num-samples {num_samples}: use the same G, or another round")
    return set(sizes)


def register_prompts(store: Store, prompts: list[Prompt]) -> int:
    known = set(store.query("SELECT DISTINCT prompt_id FROM prompts").column("prompt_id").to_pylist())
    new = [dict(asdict(p), created_at=utc_now()) for p in prompts if p.prompt_id not in known]
    store.write("prompts", new)
    return len(new)


def rollout_rows(cfg: GenerateConfig, engine, settings, prompt: Prompt, prompt_ids: list[int],
                 completions, policy_round, adapter_path, base_model: str) -> list[dict]:
    now = utc_now()
    rows = []
    for idx, completion in enumerate(completions):
        rows.append(dict(
            round=cfg.round, prompt_id=prompt.prompt_id, sample_idx=idx,
            rollout_id=keys.rollout_id(cfg.round, prompt.prompt_id, idx),
            prompt_token_ids=prompt_ids, completion_token_ids=completion.token_ids,
            completion_logprobs=completion.logprobs, sum_logprob=completion.logprob_sum,
            num_completion_tokens=len(completion.token_ids), completion_text=completion.text,
            finish_reason=completion.finish_reason, policy_round=policy_round, policy_adapter=adapter_path,
            base_model=base_model, engine=engine.name, engine_version=engine.version,
            logprobs_mode=engine.logprobs_mode, temperature=settings.temperature, top_p=settings.top_p,
            top_k=settings.top_k, max_tokens=settings.max_new_tokens,
            seed=keys.sample_seed(cfg.seed, cfg.round, prompt.prompt_id, idx), created_at=now))
    return rows


def run(store_path: str, cfg: GenerateConfig, engine=None) -> dict:
    """Sample and store every missing group of the round; returns the manifest record."""
    if cfg.num_samples < 1:
        raise ReplayError(f"--num-samples must be at least 1, got {cfg.num_samples}")
    if cfg.max_new_tokens < 1:
        raise ReplayError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    shard_index, shard_count = keys.parse_shard(cfg.shard)
    # the whole input is validated before any write
    prompts = load_prompts(cfg.dataset, cfg.num_prompts, cfg.split, cfg.seed, cfg.problem_key,
                           cfg.answer_key, tuple(cfg.levels), cfg.dataset_config, cfg.dataset_split)
    prompts = [p for p in prompts if keys.in_shard(p.prompt_id, shard_index, shard_count)]

    from replay.engines import SamplingSettings
    from replay.models import resolve_model

    try:
        settings = SamplingSettings(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    max_new_tokens=cfg.max_new_tokens)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    model_ref = resolve_model(cfg.model)
    store = Store.create(store_path, base_model=model_ref.name)
    if store.meta.get("base_model") not in (None, model_ref.name):
        raise ReplayError(f"store {store.root} was made with base model {store.meta['base_model']!r}, "
                          f"not {model_ref.name!r}: adapters only fit their own base model")
    policy_round, adapter_path = policy_adapter(store, cfg.round, cfg.adapter)
    stage = keys.shard_stage(cfg.stage, shard_index, shard_count)
    record = start_manifest(stage, cfg.round, asdict(cfg) | {"engine": pick_engine(cfg.engine)})
    register_prompts(store, prompts)
    done = stored_groups(store, cfg.round, cfg.num_samples)
    todo = [p for p in prompts if p.prompt_id not in done]

    new_rows = new_tokens = 0
    if todo:
        label = f"{cfg.stage} round {cfg.round}"
        tokenizer = _tokenizer(model_ref)
        own_engine = engine is None  # built here, so closed here (a clean vLLM shutdown, no warning)
        if own_engine:
            note(label, f"{len(todo)} of {len(prompts)} prompts to sample; starting the {pick_engine(cfg.engine)} "
                        f"engine")
        engine = engine or _build_engine(cfg, model_ref, adapter_path)
        started = time.perf_counter()
        with _closing(engine, built=own_engine), \
                progress_bar(label, total=len(prompts), done=len(prompts) - len(todo), unit="prompts") as bar:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                prompt_ids = [_prompt_ids(tokenizer, p, cfg) for p in batch]
                requests = [ids for ids in prompt_ids for _ in range(cfg.num_samples)]
                seeds = [keys.sample_seed(cfg.seed, cfg.round, p.prompt_id, i)
                         for p in batch for i in range(cfg.num_samples)]
                completions = engine.generate(requests, seeds, settings)
                rows = []
                for j, prompt in enumerate(batch):
                    group = completions[j * cfg.num_samples:(j + 1) * cfg.num_samples]
                    rows += rollout_rows(cfg, engine, settings, prompt, prompt_ids[j], group,
                                         policy_round, adapter_path, model_ref.name)
                store.write("rollouts", rows, round=cfg.round)  # whole groups: atomic per batch
                new_rows += len(rows)
                new_tokens += sum(r["num_completion_tokens"] for r in rows)
                elapsed = time.perf_counter() - started
                bar.advance(len(batch), f"{new_tokens} tokens, {new_tokens / elapsed:.0f} tok/s")
    versions = {"engine": getattr(engine, "name", pick_engine(cfg.engine)),
                "engine_version": getattr(engine, "version", None)}
    counts = {"prompts": len(prompts), "groups_written": len(todo), "rollouts_written": new_rows,
              "tokens_written": new_tokens, "groups_already_stored": len(prompts) - len(todo)}
    record = finish_manifest(record, counts, versions, policy_round=policy_round, adapter=adapter_path,
                             base_model=model_ref.name)
    return record_run(store, cfg.round, stage, record, did_work=bool(todo))


@contextlib.contextmanager
def _closing(engine, built: bool):
    try:
        yield engine
    finally:
        if built and hasattr(engine, "close"):
            engine.close()


def _build_engine(cfg: GenerateConfig, model_ref, adapter_path):
    from replay.engines import make_engine
    from replay.runtime import configure_torch

    configure_torch()
    return make_engine(pick_engine(cfg.engine), model_ref, lora=adapter_path)


def _tokenizer(model_ref):
    from replay.models import load_tokenizer

    return load_tokenizer(model_ref)


def _prompt_ids(tokenizer, prompt: Prompt, cfg: GenerateConfig) -> list[int]:
    from replay.prompting import DEFAULT_INSTRUCTION, chat_prompt_ids

    instruction = DEFAULT_INSTRUCTION if cfg.instruction is None else cfg.instruction
    return chat_prompt_ids(tokenizer, prompt.problem, instruction)
