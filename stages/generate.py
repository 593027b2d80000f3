"""`replay generate`: sample G completions per prompt with the round's policy and store them.

Policy of round r = base model + the adapter learned in round r-1 (round 0: the base model).
Whole groups are written per part file, so after a crash a prompt has either all G rows or none;
a rerun skips the prompts whose groups are stored and samples the rest with the same seeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from replay import adapters, keys
from replay.datasets import Prompt, load_prompts
from replay.errors import ReplayError
from replay.hints import Hint, hint_text, parse_hint
from replay.locks import locked_stage
from replay.manifests import finish_manifest, record_run, start_manifest
from replay.progress import note, progress_bar
from replay.prompt_sets import PromptSet, record_prompt_set, select_prompt_set
from replay.rows import register_prompts, rollout_row
from replay.storage import resolve
from replay.store import STORE_FILE, Store, utc_now


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
    prompts: str | None = None  # SQL choosing prompt ids (instead of dataset); adds K samples to stored groups
    prompts_from: str | None = None  # store the --prompts query runs on (default: this store; eval: the main one)
    hint: str | None = None  # with --prompts: re-sample with a hint (replay.hints): prefix:F | answer | ladder

    def validate(self) -> None:
        """The settings alone, before any file is touched (locked_stage calls it before the lock; `round`
        before its first stage)."""
        from replay.core.sampling import check_settings

        if self.round < 0:
            raise ReplayError(f"--round must be 0 or more (rounds count from 0), got {self.round}")
        if self.num_samples < 1:
            raise ReplayError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ReplayError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ReplayError(f"--batch-size must be at least 1, got {self.batch_size}")
        from replay.engines import ENGINES

        if self.engine not in ("auto", *ENGINES):
            raise ReplayError(f"unknown --engine {self.engine!r}; choose from auto, {', '.join(sorted(ENGINES))}")
        if self.hint:
            parse_hint(self.hint)
        try:
            check_settings(self.temperature, self.top_p, self.top_k)
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        keys.parse_shard(self.shard)


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
        if not adapters.exists(path):
            raise ReplayError(f"round {round} samples with the adapter of round {round - 1}, but {path} "
                              f"has none: run `replay learn --round {round - 1}` first, or pass --adapter none")
        return round - 1, str(path)
    from replay.storage import resolve

    path = resolve(adapter)  # a directory or an s3:// URI
    if not adapters.exists(path):
        raise ReplayError(f"--adapter {adapter}: not a peft adapter directory (no {adapters.MARKER})")
    manifest = path / "manifest.json"
    policy_round = None
    if manifest.exists():
        policy_round = json.loads(manifest.read_text()).get("round")
    return policy_round, str(path.absolute())


def stored_groups(store: Store, round: int, num_samples: int) -> set[str]:
    """prompt_ids whose group of this round is already stored; refuses a changed group size. The
    rows of prompt-set runs (rescue sampling, hint sets: their plans' ranges) are not the round's G."""
    rows = store.query("SELECT r.prompt_id, count(*) FILTER (WHERE p.stage IS NULL) AS n FROM rollouts r "
                       "LEFT JOIN sample_plans p ON p.round = r.round AND p.prompt_id = r.prompt_id "
                       "AND r.sample_idx >= p.first_sample_idx AND r.sample_idx < p.first_sample_idx + p.num_samples "
                       "WHERE r.round = ? GROUP BY r.prompt_id", [round])
    sizes = dict(zip(rows.column("prompt_id").to_pylist(), rows.column("n").to_pylist()))
    odd = {pid: n for pid, n in sizes.items() if n != num_samples}
    if odd:
        pid, n = next(iter(odd.items()))
        raise ReplayError(f"round {round} already holds groups of {n} samples (prompt {pid}), not "
                          f"--num-samples {num_samples}: use the same G, or another round")
    return set(sizes)


def rollout_rows(cfg: GenerateConfig, engine, settings, prompt: Prompt, prompt_ids: list[int],
                 completions, policy_round, adapter_path, base_model: str,
                 indices: list[int] | None = None) -> list[dict]:
    now = utc_now()
    return [rollout_row(cfg.round, prompt.prompt_id, idx, prompt_token_ids=prompt_ids,
                        completion_token_ids=completion.token_ids, completion_logprobs=completion.logprobs,
                        completion_text=completion.text, finish_reason=completion.finish_reason,
                        policy_round=policy_round, policy_adapter=adapter_path, base_model=base_model,
                        engine=engine.name, engine_version=engine.version, logprobs_mode=engine.logprobs_mode,
                        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                        max_tokens=settings.max_new_tokens,
                        seed=keys.sample_seed(cfg.seed, cfg.round, prompt.prompt_id, idx), created_at=now)
            for idx, completion in zip(indices if indices is not None else range(len(completions)), completions)]


@locked_stage("rollouts", "generate", creates_store=True)
def run(store_path: str, cfg: GenerateConfig, engine=None) -> dict:
    """Sample and store every missing group of the round; returns the manifest record (the
    settings alone were checked by cfg.validate() before the lock: locked_stage)."""
    shard_index, shard_count = keys.parse_shard(cfg.shard)
    hints = parse_hint(cfg.hint) if cfg.hint else None
    if hints and not cfg.prompts:
        raise ReplayError("--hint re-samples a prompt set: choose it with --prompts SQL (e.g. the round's "
                          "negative groups)")
    prompt_set = select_prompt_set(Store.open(cfg.prompts_from or store_path), cfg.prompts) if cfg.prompts else None
    prompts = list(prompt_set.prompts) if prompt_set else load_prompts(
        cfg.dataset, cfg.num_prompts, cfg.split, cfg.seed, cfg.problem_key, cfg.answer_key,
        tuple(cfg.levels), cfg.dataset_config, cfg.dataset_split)  # whole input validated before any write
    prompts = [p for p in prompts if keys.in_shard(p.prompt_id, shard_index, shard_count)]

    from replay.engines import SamplingSettings
    from replay.models import resolve_model

    try:
        settings = SamplingSettings(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    max_new_tokens=cfg.max_new_tokens)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    model_ref = resolve_model(cfg.model)
    tokenizer = _tokenizer(model_ref)
    prompt_ids = prompt_token_ids(tokenizer, prompts, cfg, context_length(model_ref.path))  # before any write
    # what needs the store is checked before its first write (store.json included): the adapter, the base
    # model, the group size of the round's stored groups
    existing = Store.open(store_path) if (resolve(store_path) / STORE_FILE).exists() else None
    if existing and existing.meta.get("base_model") not in (None, model_ref.name):
        raise ReplayError(f"store {existing.root} was made with base model {existing.meta['base_model']!r}, "
                          f"not {model_ref.name!r}: adapters only fit their own base model")
    policy_round, adapter_path = policy_adapter(existing or Store(resolve(store_path), {}), cfg.round, cfg.adapter)
    stored = stored_groups(existing, cfg.round, cfg.num_samples) if existing and not prompt_set else None
    store = Store.create(store_path, base_model=model_ref.name)
    if store.meta.get("base_model") not in (None, model_ref.name):
        raise ReplayError(f"store {store.root} was made with base model {store.meta['base_model']!r}, "
                          f"not {model_ref.name!r}: adapters only fit their own base model")
    stage = keys.shard_stage(prompt_set_stage(cfg, prompt_set), shard_index, shard_count)
    record = start_manifest(stage, cfg.round, asdict(cfg) | {"engine": pick_engine(cfg.engine)})
    register_prompts(store, prompts)
    if hints:
        return _hint_sets(store, cfg, hints, prompt_set, prompts, tokenizer, settings, model_ref, policy_round,
                          adapter_path, engine, shard_index, shard_count)
    if prompt_set:
        record_prompt_set(store, prompt_set)
        record["plan"] = sample_plan(store, cfg.round, stage, [p.prompt_id for p in prompts])
        store.write_manifest(cfg.round, stage, record)  # the plan first: a rerun resumes it exactly
        todo = missing_samples(store, cfg.round, prompts, record["plan"], cfg.num_samples)
    else:
        done = stored if stored is not None else stored_groups(store, cfg.round, cfg.num_samples)
        todo = [(p, list(range(cfg.num_samples))) for p in prompts if p.prompt_id not in done]

    new_rows = new_tokens = 0
    if todo:
        label = f"{cfg.stage} round {cfg.round}"
        own_engine = engine is None  # built here, so closed here (a clean vLLM shutdown, no warning)
        if own_engine:
            note(label, f"{len(todo)} of {len(prompts)} prompts to sample; starting the {pick_engine(cfg.engine)} "
                        f"engine")
        engine = engine or _build_engine(cfg, model_ref, adapter_path)
        with _closing(engine, built=own_engine):
            new_rows, new_tokens = sample_groups(store, cfg, engine, settings, todo, prompt_ids, len(prompts), label,
                                                 policy_round, adapter_path, model_ref.name)
    versions = {"engine": getattr(engine, "name", pick_engine(cfg.engine)),
                "engine_version": getattr(engine, "version", None)}
    counts = {"prompts": len(prompts), "groups_written": len(todo), "rollouts_written": new_rows,
              "tokens_written": new_tokens, "groups_already_stored": len(prompts) - len(todo)}
    record = finish_manifest(record, counts, versions, policy_round=policy_round, adapter=adapter_path,
                             base_model=model_ref.name, prompt_set=prompt_set and prompt_set.prompt_set_id)
    return record_run(store, cfg.round, stage, record, did_work=bool(todo))


def sample_groups(store: Store, cfg: GenerateConfig, engine, settings, todo: list[tuple[Prompt, list[int]]],
                  prompt_ids: dict[str, list[int]], total: int, label: str, policy_round, adapter_path,
                  base_model: str) -> tuple[int, int]:
    """Sample the `todo` (prompt, sample indices) and write them, whole groups per part file;
    returns (rows, tokens) written."""
    new_rows = new_tokens = 0
    started = time.perf_counter()
    with progress_bar(label, total=total, done=total - len(todo), unit="prompts") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            requests = [prompt_ids[p.prompt_id] for p, indices in batch for _ in indices]
            seeds = [keys.sample_seed(cfg.seed, cfg.round, p.prompt_id, i) for p, indices in batch for i in indices]
            completions = iter(engine.generate(requests, seeds, settings))
            rows = []
            for prompt, indices in batch:
                group = [next(completions) for _ in indices]
                rows += rollout_rows(cfg, engine, settings, prompt, prompt_ids[prompt.prompt_id], group,
                                     policy_round, adapter_path, base_model, indices)
            store.write("rollouts", rows, round=cfg.round)  # whole groups: atomic per batch
            new_rows += len(rows)
            new_tokens += sum(r["num_completion_tokens"] for r in rows)
            elapsed = time.perf_counter() - started
            bar.advance(len(batch), f"{new_tokens} tokens, {new_tokens / elapsed:.0f} tok/s")
    return new_rows, new_tokens


def _hint_sets(store: Store, cfg: GenerateConfig, hints: list[Hint], prompt_set: PromptSet, prompts: list[Prompt],
               tokenizer, settings, model_ref, policy_round, adapter_path, engine, shard_index: int,
               shard_count: int) -> dict:
    """One hint set per tier (a manifest of its own, `<set stage>-hint-<slug>`, with its plan and its
    hint): hinted prompts get K samples each, beside the round's own groups; a ladder's next tier
    takes only the prompts that no earlier tier solved (checked with the verifier). Resumable like
    rescue sampling: a rerun finds each tier's plan and draws only what is missing."""
    by_id = {p.prompt_id: p for p in prompts}
    base_stage = prompt_set_stage(cfg, prompt_set)
    unsolved, records, own_engine = list(prompts), [], engine is None
    try:
        for hint in hints:
            stage = keys.shard_stage(f"{base_stage}-hint-{hint.slug}", shard_index, shard_count)
            previous = store.read_manifest(cfg.round, stage)
            if previous and isinstance(previous.get("plan"), dict):  # a rerun: the tier's prompts are its plan's
                tier = [by_id[pid] for pid in previous["plan"] if pid in by_id]
            else:
                tier = [p for p in unsolved if hint_text(hint, p.solution, p.answer) is not None]
            record = start_manifest(stage, cfg.round, asdict(cfg) | {"engine": pick_engine(cfg.engine)})
            record["hint"] = {"kind": hint.kind, "fraction": hint.fraction}
            record["plan"] = sample_plan(store, cfg.round, stage, [p.prompt_id for p in tier])
            store.write_manifest(cfg.round, stage, record)  # the plan (and the hint) before any sample
            hinted_ids = {p.prompt_id: _prompt_ids(tokenizer, p, cfg, hint_text(hint, p.solution, p.answer))
                          for p in tier}
            todo = missing_samples(store, cfg.round, tier, record["plan"], cfg.num_samples)
            rows = tokens = 0
            if todo:
                engine = engine or _build_engine(cfg, model_ref, adapter_path)
                rows, tokens = sample_groups(store, cfg, engine, settings, todo, hinted_ids, len(tier),
                                             f"{cfg.stage} round {cfg.round} hint {hint.slug}", policy_round,
                                             adapter_path, model_ref.name)
            solved = solved_prompts(store, cfg.round, record["plan"], cfg.num_samples, by_id)
            counts = {"prompts": len(tier), "groups_written": len(todo), "rollouts_written": rows,
                      "tokens_written": tokens, "groups_already_stored": len(tier) - len(todo),
                      "solved_with_hint": len(solved), "no_hint": len(unsolved) - len(tier) if not previous else 0}
            record = finish_manifest(record, counts, {"engine": getattr(engine, "name", pick_engine(cfg.engine)),
                                                      "engine_version": getattr(engine, "version", None)},
                                     policy_round=policy_round, adapter=adapter_path, base_model=model_ref.name,
                                     prompt_set=prompt_set.prompt_set_id)
            records.append(record_run(store, cfg.round, stage, record, did_work=bool(todo)))
            unsolved = [p for p in unsolved if p.prompt_id not in solved]
    finally:
        if own_engine and engine is not None and hasattr(engine, "close"):
            engine.close()
    last = dict(records[-1])
    last["counts"] = {key: sum(r["counts"][key] for r in records) for key in records[0]["counts"]} | {
        "prompts": len(prompts), "tiers": len(records), "unsolved": len(unsolved),
        "no_hint": records[0]["counts"]["no_hint"]}  # every tier skips the same prompts
    return last


def solved_prompts(store: Store, round: int, plan: dict[str, int], k: int, by_id: dict[str, Prompt]) -> set[str]:
    """The planned prompts with a right answer among their hinted samples (by the scorer's verifier)."""
    from replay.verify import VerifierPool

    rows = store.query("SELECT prompt_id, sample_idx, completion_text FROM rollouts WHERE round = ? AND "
                       "prompt_id IN (SELECT unnest(?))", [round, list(plan)]).to_pylist()
    items = [((r["prompt_id"], r["sample_idx"]), by_id[r["prompt_id"]].answer, r["completion_text"]) for r in rows
             if plan[r["prompt_id"]] <= r["sample_idx"] < plan[r["prompt_id"]] + k]
    if not items:
        return set()
    with VerifierPool(workers=1) as pool:
        return {v.key[0] for v in pool.verify_many(items) if v.correct}


def prompt_set_stage(cfg: GenerateConfig, prompt_set: PromptSet | None) -> str:
    """A prompt-set run has a manifest of its own per (set, K): it never overwrites the round's."""
    return f"{cfg.stage}.{prompt_set.prompt_set_id}-k{cfg.num_samples}" if prompt_set else cfg.stage


def sample_plan(store: Store, round: int, stage: str, prompt_ids: list[str]) -> dict[str, int]:
    """prompt_id -> first sample_idx this run adds: where the prompt's group ended when the run was
    first planned (0 for a prompt new to the round). A rerun finds the plan in its manifest, so it
    adds the missing samples of the same range and nothing more."""
    previous = store.read_manifest(round, stage)
    if previous and isinstance(previous.get("plan"), dict):
        return previous["plan"]
    rows = store.query("SELECT prompt_id, max(sample_idx) + 1 AS next FROM rollouts WHERE round = ? AND "
                       "prompt_id IN (SELECT unnest(?)) GROUP BY prompt_id", [round, prompt_ids]).to_pylist()
    ends = {r["prompt_id"]: r["next"] for r in rows}
    return {pid: int(ends.get(pid, 0)) for pid in prompt_ids}


def missing_samples(store: Store, round: int, prompts: list[Prompt], plan: dict[str, int],
                    k: int) -> list[tuple[Prompt, list[int]]]:
    """(prompt, sample indices still to draw) for each prompt whose planned range is not all stored."""
    rows = store.query("SELECT prompt_id, list(sample_idx) AS idx FROM rollouts WHERE round = ? AND "
                       "prompt_id IN (SELECT unnest(?)) GROUP BY prompt_id", [round, list(plan)]).to_pylist()
    stored = {r["prompt_id"]: set(r["idx"]) for r in rows}
    todo = []
    for prompt in prompts:
        start = plan[prompt.prompt_id]
        indices = [i for i in range(start, start + k) if i not in stored.get(prompt.prompt_id, ())]
        if indices:
            todo.append((prompt, indices))
    return todo


@contextlib.contextmanager
def _closing(engine, built: bool):
    """Close the engine built here; after a Ctrl-C stop it at once (`interrupt`: a short grace, then its
    processes are killed), as the groups in hand are redrawn by a rerun anyway."""
    try:
        yield engine
    except KeyboardInterrupt:
        if built and hasattr(engine, "interrupt"):
            engine.interrupt()
        raise
    finally:
        if built and hasattr(engine, "close"):
            engine.close()


def _build_engine(cfg: GenerateConfig, model_ref, adapter_path):
    from replay.adapters import local_copy
    from replay.engines import make_engine
    from replay.runtime import configure_torch

    configure_torch()
    return make_engine(pick_engine(cfg.engine), model_ref, lora=local_copy(adapter_path))


def _tokenizer(model_ref):
    from replay.models import load_tokenizer

    return load_tokenizer(model_ref)


def context_length(model_dir: Path) -> int | None:
    """The model's context window in tokens, from its config.json (None when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def prompt_token_ids(tokenizer, prompts: list[Prompt], cfg: GenerateConfig, context: int | None) -> dict[str, list[int]]:
    """Each prompt's token ids; a prompt that leaves no room for --max-new-tokens in the model's
    context is refused before anything is written (a 50 MB problem is caught by its length in
    characters, before the tokenizer spends minutes and gigabytes on it)."""
    longest_token = max(map(len, tokenizer.get_vocab()), default=1)
    ids = {}
    for number, prompt in enumerate(prompts, start=1):
        too_long = context is not None and len(prompt.problem) > longest_token * context
        ids[prompt.prompt_id] = [] if too_long else _prompt_ids(tokenizer, prompt, cfg)
        if context is not None and (too_long or len(ids[prompt.prompt_id]) + cfg.max_new_tokens > context):
            size = (f"{len(prompt.problem):,} characters" if too_long
                    else f"{len(ids[prompt.prompt_id]):,} tokens")
            raise ReplayError(f"prompt {number} of {cfg.dataset} (prompt_id {prompt.prompt_id}, "
                              f"{prompt.problem[:40]!r}…) is {size}: with --max-new-tokens {cfg.max_new_tokens} "
                              f"it does not fit the model's context of {context:,} tokens")
    return ids


def _prompt_ids(tokenizer, prompt: Prompt, cfg: GenerateConfig, hint: str | None = None) -> list[int]:
    from replay.prompting import DEFAULT_INSTRUCTION, chat_prompt_ids

    instruction = DEFAULT_INSTRUCTION if cfg.instruction is None else cfg.instruction
    return chat_prompt_ids(tokenizer, prompt.problem, instruction, hint=hint)
