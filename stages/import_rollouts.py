"""`replay import`: completions produced elsewhere (another trainer, an API) become rollouts of a round.

Groups are formed by problem. Rows without token ids / logprobs are stored with
`logprobs_mode = 'none'`, so `learn` refuses them unless asked to recompute behaviour logprobs.
The whole file is validated before anything is written; re-importing skips groups already stored.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from replay import keys
from replay.datasets import DatasetError, Prompt, int32_field, read_rows, storable_text, text_field
from replay.errors import ReplayError
from replay.locks import locked_stage
from replay.manifests import finish_manifest, record_run, start_manifest
from replay.rows import register_prompts, rollout_row
from replay.storage import resolve
from replay.store import STORE_FILE, Store, utc_now

FLOAT32_MAX = 3.4028234663852886e38  # completion_logprobs are stored as float32


@dataclass
class ImportConfig:
    round: int = 0
    file: str = ""
    source: str | None = None  # prompt source label; default: the file's stem
    problem_key: str = "problem"
    answer_key: str = "answer"
    completion_key: str = "completion"
    model: str = "imported"  # recorded as base_model of the rows
    tokenizer: str | None = None  # model whose vocabulary token ids use; default: the store's base model


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(where: str, row: dict, key: str) -> list[int] | None:
    value = row.get(key)
    if value is None:
        return None
    # a float id would be truncated silently, an id beyond int32 fails only at the write
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v <= 2**31 - 1 for v in value):
        raise DatasetError(f"{where}: field {key!r} must be a list of integers 0 to 2^31-1")
    return value


def _logprobs(where: str, row: dict) -> list[float] | None:
    value = row.get("completion_logprobs")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{where}: field 'completion_logprobs' must be a list of numbers")
    # NaN passes `lp > 0`; NaN, inf and what float32 storage turns into inf would reach learn's loss.
    # abs(v) <= MAX is False for NaN and inf, and compares huge ints exactly (math.isfinite overflows)
    bad = next((i for i, v in enumerate(value) if not abs(v) <= FLOAT32_MAX), None)
    if bad is not None:
        raise DatasetError(f"{where}: completion_logprobs[{bad}] is {value[bad]}: must be a finite float32")
    if any(v > 0 for v in value):
        raise DatasetError(f"{where}: completion_logprobs must be <= 0 (log-probabilities)")
    return [float(v) for v in value]


def _sample_idx(where: str, row: dict, default: int) -> int:
    value = row.get("sample_idx")
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # pandas writes 3.0 for an int column with gaps
        value = int(value)
    if not _is_int(value) or value < 0:
        raise DatasetError(f"{where}: field 'sample_idx' must be a non-negative integer, got {value!r}")
    return int32_field(where, "sample_idx", value)


def parse_rows(path: Path, cfg: ImportConfig) -> tuple[list[Prompt], list[dict]]:
    """Validate every row; returns prompts and rollout dicts (sample_idx assigned per problem)."""
    source = cfg.source or path.stem
    prompts: dict[str, Prompt] = {}
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    seen_keys: dict[tuple, str] = {}
    for where, row in read_rows(path):
        problem = text_field(where, row, cfg.problem_key)
        answer = text_field(where, row, cfg.answer_key)
        completion = row.get(cfg.completion_key)
        if not isinstance(completion, str):
            raise DatasetError(f"{where}: field {cfg.completion_key!r} must be text, got "
                               f"{type(completion).__name__ if completion is not None else 'nothing'}")
        storable_text(where, cfg.completion_key, completion)
        pid = (storable_text(where, "prompt_id", str(row["prompt_id"])) if row.get("prompt_id") is not None
               else keys.prompt_id(source, problem))
        if pid in prompts and prompts[pid].answer != answer:
            raise DatasetError(f"{where}: problem has gold {answer!r} here but {prompts[pid].answer!r} earlier")
        prompts.setdefault(pid, Prompt(pid, source, "train", problem, answer))
        token_ids = _token_ids(where, row, "completion_token_ids")
        prompt_ids = _token_ids(where, row, "prompt_token_ids")
        logprobs = _logprobs(where, row)
        if logprobs is not None and (token_ids is None or len(token_ids) != len(logprobs)):
            raise DatasetError(f"{where}: completion_logprobs needs completion_token_ids of the same length")
        if prompt_ids is not None and token_ids is None:
            raise DatasetError(f"{where}: prompt_token_ids without completion_token_ids")
        idx = _sample_idx(where, row, len(by_prompt[pid]))
        if (pid, idx) in seen_keys:
            raise DatasetError(f"{where}: duplicate sample {idx} of one problem (first at {seen_keys[(pid, idx)]})")
        seen_keys[(pid, idx)] = where
        by_prompt[pid].append(dict(where=where, prompt_id=pid, sample_idx=idx, completion_text=completion,
                                   prompt_token_ids=prompt_ids, completion_token_ids=token_ids,
                                   completion_logprobs=logprobs))
    if not by_prompt:
        raise DatasetError(f"{path}: no rows")
    return list(prompts.values()), [r for rows in by_prompt.values() for r in rows]


def imported_row(cfg: ImportConfig, r: dict, now) -> dict:
    """A rollout row of an imported completion: no sampling settings, seed or policy are known."""
    logprobs = r["completion_logprobs"]
    return rollout_row(cfg.round, r["prompt_id"], r["sample_idx"], prompt_token_ids=r["prompt_token_ids"],
                       completion_token_ids=r["completion_token_ids"], completion_logprobs=logprobs,
                       completion_text=r["completion_text"], finish_reason="unknown", base_model=cfg.model,
                       engine="import", engine_version="0", logprobs_mode="none" if logprobs is None else "unknown",
                       created_at=now)


def complete_token_ids(store_path: str, cfg: ImportConfig, prompts: list[Prompt], rows: list[dict]) -> tuple[str, int]:
    """Check every token id against the vocabulary of the model the ids belong to, and derive the
    prompt ids of rows that carry completion ids only (the chat template `generate` uses), so that
    `learn` trains on imported rows exactly as on generated ones. Returns (model name, rows derived)."""
    from replay.models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from replay.prompting import chat_prompt_ids

    stored_model = Store.open(store_path).meta.get("base_model") if (resolve(store_path) / STORE_FILE).exists() else None
    model_ref = resolve_model(cfg.tokenizer or stored_model or DEFAULT_MODEL)
    tokenizer = load_tokenizer(model_ref)
    vocab = len(tokenizer)
    problems = {p.prompt_id: p.problem for p in prompts}
    derived = 0
    for row in rows:
        for key in ("prompt_token_ids", "completion_token_ids"):
            bad = next((i for i, t in enumerate(row[key] or ()) if t >= vocab), None)
            if bad is not None:
                raise DatasetError(f"{row['where']}: {key}[{bad}] is {row[key][bad]}, outside the vocabulary of "
                                   f"{model_ref.name} ({vocab} tokens; --tokenizer names the model of the ids)")
        if row["completion_token_ids"] is not None and row["prompt_token_ids"] is None:
            row["prompt_token_ids"] = chat_prompt_ids(tokenizer, problems[row["prompt_id"]])
            derived += 1
    return model_ref.name, derived


@locked_stage("rollouts", "import", creates_store=True)
def run(store_path: str, cfg: ImportConfig) -> dict:
    path = Path(cfg.file)
    prompts, rows = parse_rows(path, cfg)  # all validated before the first write
    tokenizer_model = None
    derived = 0
    if any(r["completion_token_ids"] is not None for r in rows):
        tokenizer_model, derived = complete_token_ids(store_path, cfg, prompts, rows)
    store = Store.create(store_path, base_model=tokenizer_model)
    if tokenizer_model and store.meta.get("base_model") not in (None, tokenizer_model):
        raise ReplayError(f"store {store.root} was made with base model {store.meta['base_model']!r}; these "
                          f"token ids are {tokenizer_model!r}'s (--tokenizer): they cannot share a store")
    record = start_manifest("import", cfg.round, asdict(cfg))
    stored = set(store.query("SELECT DISTINCT prompt_id FROM rollouts WHERE round = ?", [cfg.round])
                 .column("prompt_id").to_pylist())
    register_prompts(store, prompts)
    now = utc_now()
    new = [imported_row(cfg, r, now) for r in rows if r["prompt_id"] not in stored]
    batch: list[dict] = []
    for i, row in enumerate(new):  # flush only at group boundaries: a half group never lands
        batch.append(row)
        last_of_group = i + 1 == len(new) or new[i + 1]["prompt_id"] != row["prompt_id"]
        if last_of_group and len(batch) >= 50_000 or i + 1 == len(new):
            store.write("rollouts", batch, round=cfg.round)
            batch = []
    counts = {"rows_in_file": len(rows), "rollouts_written": len(new), "prompts": len(prompts),
              "prompt_token_ids_derived": derived,
              "groups_already_stored": len({r["prompt_id"] for r in rows} & stored)}
    record = record_run(store, cfg.round, "import", finish_manifest(record, counts), did_work=bool(new))
    if len(new) and any(r["completion_logprobs"] is None for r in rows):
        record["note"] = "rows without token ids/logprobs: learn needs --recompute-old-logprobs for them"
    return record


__all__ = ["ImportConfig", "run", "ReplayError"]
