"""`replay import`: completions produced elsewhere (another trainer, an API) become rollouts of a round.

Groups are formed by problem. Rows without token ids / logprobs are stored with
`logprobs_mode = 'none'`, so `learn` refuses them unless asked to recompute behaviour logprobs.
Rows with logprobs record how they were sampled (`--temperature/--top-p/--top-k`, or the row's own
fields): then `processed` (or `raw`, `--logprobs-mode raw`); without a temperature `unknown`, which
learn refuses unless --recompute-old-logprobs, since the logprobs' distribution is not known.
The whole file is validated before anything is written; re-importing skips groups already stored.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from replay import keys
from replay.datasets import DatasetError, Prompt, int32_field, json_object, read_rows, storable_text, text_field
from replay.errors import ReplayError
from replay.locks import locked_stage
from replay.manifests import finish_manifest, record_run, start_manifest
from replay.rows import register_prompts, rollout_row
from replay.storage import resolve
from replay.store import STORE_FILE, Store, utc_now

FLOAT32_MAX = 3.4028234663852886e38  # completion_logprobs are stored as float32
# one JSONL row at most: a file without line breaks (/dev/zero, a binary file) stops here, not in MemoryError
MAX_LINE_BYTES = 256 << 20


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
    # how the completions were sampled (a row's own temperature/top_p/top_k fields must agree): without a
    # temperature, rows with logprobs are stored as logprobs_mode 'unknown', which learn refuses unless
    # --recompute-old-logprobs
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    logprobs_mode: str = "processed"  # what the file's logprobs are under: processed (the sampling
    # distribution: temperature, top-k, top-p applied; what replay samples) | raw (the model's softmax, T = 1)

    def validate(self) -> None:
        """The settings alone, before any file is touched (locked_stage calls it before the lock)."""
        from replay.core.sampling import check_settings

        if self.round < 0:
            raise ReplayError(f"--round must be 0 or more, got {self.round}")
        try:
            check_settings(self.temperature, self.top_p, self.top_k)
        except ValueError as exc:
            raise ReplayError(f"{exc} (--temperature, --top-p, --top-k)") from None
        if self.temperature is None and (self.top_p is not None or self.top_k is not None):
            raise ReplayError("--top-p/--top-k without --temperature: give the temperature the completions were "
                              "sampled at too (1 if none was set)")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ReplayError(f"unknown --logprobs-mode {self.logprobs_mode!r}; choose from "
                              f"{', '.join(LOGPROBS_MODES)}")


LOGPROBS_MODES = ("processed", "raw")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
MAX_PROMPT_ID = 256  # characters


class PromptIds:
    """Each row's prompt_id: its own (checked), else a hash of (source, problem); one id names one
    problem, so a second problem under an id seen before is refused naming both rows."""

    def __init__(self, source: str):
        self.source = source
        self.first: dict[str, tuple[str, str]] = {}  # prompt_id -> (where, problem) of its first row

    def of(self, where: str, row: dict, problem: str) -> str:
        value = row.get("prompt_id")
        pid = keys.prompt_id(self.source, problem) if value is None else explicit_prompt_id(where, value)
        first_where, first_problem = self.first.setdefault(pid, (where, problem))
        if first_problem != problem:
            raise DatasetError(f"{where}: prompt_id {pid!r} names the problem {_short(problem)} here but "
                               f"{_short(first_problem)} at {first_where}: one id, one problem")
        return pid


def explicit_prompt_id(where: str, value) -> str:
    """A row's own prompt_id: text (an integer is written in decimal) of 1 to MAX_PROMPT_ID characters,
    not only spaces, without control characters or line breaks (ids are printed, and passed to SQL)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DatasetError(f"{where}: field 'prompt_id' must be text (or an integer), got {type(value).__name__}")
    text = storable_text(where, "prompt_id", str(value))
    if not text.strip():
        raise DatasetError(f"{where}: field 'prompt_id' is empty")
    if len(text) > MAX_PROMPT_ID:
        raise DatasetError(f"{where}: field 'prompt_id' is {len(text):,} characters long: at most {MAX_PROMPT_ID}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise DatasetError(f"{where}: field 'prompt_id' holds the control character {bad!r}")
    return text


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "…")


def row_sampling(where: str, row: dict, cfg: ImportConfig) -> dict:
    """temperature / top_p / top_k of one row: its own fields, which must agree with the flags when both
    are given, else the flags. Without a temperature nothing is known (all None); with one, a missing
    top_p / top_k means no cut (1.0 / 0)."""
    from replay.core.sampling import check_settings

    out = {}
    for key in SAMPLING_FIELDS:
        flag, value = getattr(cfg, key), row.get(key)
        if value is None:
            out[key] = flag
            continue
        if key == "top_k" and isinstance(value, float) and value.is_integer():  # pandas: ints with gaps
            value = int(value)
        try:
            check_settings(**{key: value})
        except ValueError as exc:
            raise DatasetError(f"{where}: field {exc}") from None
        if flag is not None and value != flag:
            raise DatasetError(f"{where}: field {key!r} is {value!r} but --{key.replace('_', '-')} is {flag!r}: "
                               f"which one sampled this row? (the flags are for rows without the field)")
        out[key] = value
    if out["temperature"] is None:
        if out["top_p"] is not None or out["top_k"] is not None:
            raise DatasetError(f"{where}: top_p/top_k without a temperature (field or --temperature): give the "
                               f"temperature it was sampled at too (1 if none was set)")
        return out
    return {"temperature": float(out["temperature"]),
            "top_p": 1.0 if out["top_p"] is None else float(out["top_p"]),
            "top_k": 0 if out["top_k"] is None else int(out["top_k"])}


def check_stored_prompts(store: Store, prompts: list[Prompt], rows: list[dict]) -> None:
    """A prompt id the store already holds must name the same problem and gold here: register_prompts keeps
    the stored row, so these completions would be scored against the other problem's answer."""
    by_id = {p.prompt_id: p for p in prompts}
    first = {}
    for r in rows:
        first.setdefault(r["prompt_id"], r["where"])
    stored = store.query("SELECT prompt_id, any_value(problem) AS problem, any_value(answer) AS answer FROM prompts "
                         "WHERE prompt_id IN (SELECT unnest(?)) GROUP BY prompt_id ORDER BY prompt_id",
                         [list(by_id)]).to_pylist()
    for row in stored:
        mine = by_id[row["prompt_id"]]
        if (row["problem"], row["answer"]) != (mine.problem, mine.answer):
            what = "problem" if row["problem"] != mine.problem else "gold"
            theirs, ours = (row["problem"], mine.problem) if what == "problem" else (row["answer"], mine.answer)
            raise DatasetError(f"{first[mine.prompt_id]}: prompt_id {mine.prompt_id!r} names the {what} "
                               f"{_short(ours)} here but {_short(theirs)} in the store's prompts: one id, one "
                               f"problem (give this row another prompt_id)")


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
    ids = PromptIds(source)
    for where, row in stream_rows(path):
        problem = text_field(where, row, cfg.problem_key)
        answer = text_field(where, row, cfg.answer_key)
        completion = row.get(cfg.completion_key)
        if not isinstance(completion, str):
            raise DatasetError(f"{where}: field {cfg.completion_key!r} must be text, got "
                               f"{type(completion).__name__ if completion is not None else 'nothing'}")
        storable_text(where, cfg.completion_key, completion)
        pid = ids.of(where, row, problem)
        if pid in prompts and prompts[pid].answer != answer:
            raise DatasetError(f"{where}: problem has gold {answer!r} here but {prompts[pid].answer!r} earlier")
        prompts.setdefault(pid, Prompt(pid, source, "train", problem, answer))
        token_ids = _token_ids(where, row, "completion_token_ids")
        prompt_ids = _token_ids(where, row, "prompt_token_ids")
        if prompt_ids == []:  # the first completion token would be scored after padding, not after a prompt
            raise DatasetError(f"{where}: prompt_token_ids is empty: give the prompt's ids, or leave the field "
                               f"out to have them derived with the chat template")
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
                                   completion_logprobs=logprobs, **row_sampling(where, row, cfg)))
    if not by_prompt:
        raise DatasetError(f"{path}: no rows")
    return list(prompts.values()), [r for rows in by_prompt.values() for r in rows]


def stream_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs as `replay.datasets.read_rows` gives them, a JSONL file read one line at a
    time: memory holds one line (at most MAX_LINE_BYTES) besides the parsed rows, whatever the file is."""
    if path.suffix == ".parquet":
        yield from read_rows(path)
        return
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, not a JSONL file")
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        number = 0
        while True:
            try:
                line = fh.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise DatasetError(f"{path}:line {number + 1}: cannot read: {exc.strerror or exc}") from None
            if not line:
                return
            number += 1
            where = f"{path}:line {number}"
            if len(line) > MAX_LINE_BYTES:
                raise DatasetError(f"{where}: longer than {MAX_LINE_BYTES:,} bytes without a line break: "
                                   "not a JSON Lines file of completions")
            if line.strip():
                yield where, json_object(line, where)


def imported_row(cfg: ImportConfig, r: dict, now) -> dict:
    """A rollout row of an imported completion: its sampling settings as given (row fields or flags); no
    seed or policy is known. Logprobs without a temperature are of unknown sampling: learn refuses them
    unless --recompute-old-logprobs (replay.learn.selection.refuse_unknown_sampling)."""
    logprobs = r["completion_logprobs"]
    sampling = {key: r.get(key) for key in SAMPLING_FIELDS}
    mode = ("none" if logprobs is None else "raw" if cfg.logprobs_mode == "raw"
            else "unknown" if sampling["temperature"] is None else "processed")
    return rollout_row(cfg.round, r["prompt_id"], r["sample_idx"], prompt_token_ids=r["prompt_token_ids"],
                       completion_token_ids=r["completion_token_ids"], completion_logprobs=logprobs,
                       completion_text=r["completion_text"], finish_reason="unknown", base_model=cfg.model,
                       engine="import", engine_version="0", logprobs_mode=mode, created_at=now, **sampling)


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
    if (resolve(store_path) / STORE_FILE).exists():  # before the first write, as every check
        check_stored_prompts(Store.open(store_path), prompts, rows)
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
    notes = []
    if len(new) and any(r["completion_logprobs"] is None for r in rows):
        notes.append("rows without token ids/logprobs: learn needs --recompute-old-logprobs for them")
    unknown = sum(r["logprobs_mode"] == "unknown" for r in new)
    if unknown:
        notes.append(f"{unknown} rows carry logprobs but no sampling settings (logprobs_mode 'unknown'): learn "
                     f"refuses them unless --recompute-old-logprobs; import them with the --temperature (--top-p, "
                     f"--top-k) they were sampled at, or --logprobs-mode raw for the model's own T = 1 logprobs")
    if notes:
        record["note"] = "; ".join(notes)
    return record


__all__ = ["ImportConfig", "run", "ReplayError"]
