"""Prompt sets: the built-in arithmetic task, JSONL/Parquet files (MATH-500 and GSM8K formats) and
Hugging Face `datasets` (a save_to_disk directory, or a hub id when the hub is reachable).

Every reader validates the whole input before anything is written, and a problem is reported
with the file, the line (or row) and the field.

Reference solutions (the prompts table's `solution`, NULL where there is none):
- arith: worked from the generated expression, one line per operation in evaluation order (every
  × first, left to right, then + and - left to right), each "a op b = c" in exact integers, and a
  last line "\\boxed{answer}". "What is 3 + 4 × 5 - 2?" gets "4 × 5 = 20", "3 + 20 = 23",
  "23 - 2 = 21", "\\boxed{21}" (arith_solution).
- GSM8K: the `answer` text before "#### N", its calculator notes "<<48/2=24>>" removed (the text
  around each already states the result: "48/2 = <<48/2=24>>24" reads "48/2 = 24"), and a last
  line "\\boxed{N}" (gsm8k_solution).
- MATH / MATH-500 and any other JSONL/Parquet/Hugging Face input: its optional `solution` field as
  is (MATH's boxes the answer); a `solution` field also takes precedence over GSM8K's derived one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from . import keys
from .answers import split_gsm8k_answer
from .errors import ReplayError

ARITH = "arith"
# level -> (number of operands, max digits per operand, operators)
ARITH_LEVELS = {
    1: (2, 1, "+-"),
    2: (2, 2, "+-"),
    3: (3, 2, "+-"),
    4: (3, 2, "+-*"),
    5: (4, 3, "+-*"),
}
INT32 = (-(2**31), 2**31 - 1)  # the stored integer columns (level, sample_idx) are int32


class DatasetError(ReplayError):
    """Bad prompt input, named by file, line/row and field."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    source: str
    split: str
    problem: str
    answer: str
    level: int | None = None
    subject: str | None = None
    unique_id: str | None = None
    solution: str | None = None  # a worked reference solution (see the module docstring)


def _arith_terms(seed: int, split: str, index: int, level: int) -> tuple[list[int], list[str]]:
    """The operands and operators ("+", "-", "*") of one seeded arithmetic problem."""
    n_operands, digits, ops = ARITH_LEVELS[level]
    rng = random.Random(f"arith:{seed}:{split}:{level}:{index}")  # str seeds hash with sha512
    numbers = [rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1) for _ in range(n_operands)]
    operators = [rng.choice(ops) for _ in range(n_operands - 1)]
    return numbers, operators


def arith_problem(seed: int, split: str, index: int, level: int) -> tuple[str, int]:
    """One seeded arithmetic problem with an exact integer answer."""
    numbers, operators = _arith_terms(seed, split, index, level)
    expression = str(numbers[0])
    for op, number in zip(operators, numbers[1:]):
        expression += f" {op} {number}"
    # the expression is built from digits and + - * only, so eval is exact integer arithmetic
    answer = eval(expression, {"__builtins__": {}})  # noqa: S307
    return f"What is {expression.replace('*', '×')}?", answer


def arith_solution(seed: int, split: str, index: int, level: int) -> str:
    """The worked solution of arith_problem(seed, split, index, level): one line per operation in
    evaluation order, then "\\boxed{answer}" (module docstring). Worked step by step on its own, not
    copied from the problem's answer, so the tests can check that the two agree."""
    numbers, operators = _arith_terms(seed, split, index, level)
    lines, terms, signs = [], [numbers[0]], []
    for op, number in zip(operators, numbers[1:]):  # products first: each × folds into the term before it
        if op == "*":
            lines.append(f"{terms[-1]} × {number} = {terms[-1] * number}")
            terms[-1] *= number
        else:
            terms.append(number)
            signs.append(op)
    total = terms[0]
    for op, term in zip(signs, terms[1:]):  # then the sums and differences, left to right
        result = total + term if op == "+" else total - term
        lines.append(f"{total} {op} {term} = {result}")
        total = result
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


ARITH_TEST_SHARE = 4  # one problem in 4 belongs to the test pool


def arith_pool(problem: str) -> str:
    """"test" or "train": a fixed partition of the problem space by a hash of the text, so held-out
    problems never appear in training, whatever the seeds (level 1 has only 162 problems)."""
    digest = hashlib.sha256(problem.encode()).digest()
    return "test" if digest[0] % ARITH_TEST_SHARE == 0 else "train"


def arith_prompts(num_prompts: int, split: str = "train", seed: int = 0,
                  levels: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[Prompt]:
    """Draws cycle through `levels`; `split` selects an independent stream, drawn from the test
    pool for split "test" and from the train pool for any other split. A draw that repeats an
    earlier problem or falls in the other pool is skipped and the cycle moves on, so the mix
    follows `levels` only roughly where a level is small (level 1: 162 problems in all)."""
    bad = [lv for lv in levels if lv not in ARITH_LEVELS]
    if bad or not levels:
        raise DatasetError(f"arith: levels must be among 1-5, got {list(levels)}")
    prompts, seen, index = [], set(), 0
    while len(prompts) < num_prompts:
        level = levels[index % len(levels)]
        problem, answer = arith_problem(seed, split, index, level)
        index += 1
        pool_ok = arith_pool(problem) == ("test" if split == "test" else "train")
        if problem in seen or not pool_ok:  # tiny levels repeat; a group per distinct problem
            if index > 50 * num_prompts:
                raise DatasetError(f"arith: cannot draw {num_prompts} distinct problems from levels {list(levels)}")
            continue
        seen.add(problem)
        source = f"{ARITH}-{seed}"
        prompts.append(Prompt(keys.prompt_id(source, problem), source, split, problem, str(answer), level,
                              solution=arith_solution(seed, split, index - 1, level)))  # index moved on
    return prompts


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; location is 'file:line N' or 'file:row N' for error messages."""
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from None
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror}") from None
    return [(f"{path}:line {number}", json_object(line, f"{path}:line {number}"))
            for number, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]


def json_object(line: bytes, where: str) -> dict:
    """One JSON Lines line as a dict, or a DatasetError naming `where` (file and line)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DatasetError(f"{where}: not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise DatasetError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def storable_text(where: str, key: str, value: str) -> str:
    """`value` unchanged, if Parquet can hold it: a JSON '\\ud800' escape decodes to a lone surrogate,
    which no UTF-8 encoder accepts (the prompt id's hash and the store's writer both fail on it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(f"{where}: field {key!r} holds a lone surrogate {value[exc.start]!r} at character "
                           f"{exc.start} (not valid Unicode text)") from None
    return value


def text_field(where: str, row: dict, key: str) -> str:
    if key not in row:
        raise DatasetError(f"{where}: missing field {key!r} (fields: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if value is None:
        raise DatasetError(f"{where}: field {key!r} is null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        # JSON NaN/Infinity or a Parquet float NaN would be stored as "nan"/"inf", and \boxed{nan} verifies
        raise DatasetError(f"{where}: field {key!r} is {value}, not a finite number")
    value = storable_text(where, key, str(value).strip())
    if not value:
        raise DatasetError(f"{where}: field {key!r} is empty")
    return value


def optional_text(where: str, row: dict, key: str) -> str | None:
    """An optional field as text (numbers are stringified), None when absent."""
    value = row.get(key)
    return None if value is None else storable_text(where, key, str(value))


def int32_field(where: str, key: str, value: int) -> int:
    if not INT32[0] <= value <= INT32[1]:
        raise DatasetError(f"{where}: field {key!r} is {value}, outside the 32-bit integers the store holds")
    return value


def _level(where: str, row: dict) -> int | None:
    """MATH's levels come as 3 or 'Level 3'."""
    level = row.get("level")
    if level is None:
        return None
    if not (isinstance(level, int) and not isinstance(level, bool)):
        try:
            level = int(str(level).replace("Level", "").strip())
        except ValueError:
            raise DatasetError(f"{where}: field 'level' must be an integer, got {level!r}") from None
    return int32_field(where, "level", level)


def _gold(where: str, row: dict, answer_key: str, gsm8k: bool) -> str:
    answer = text_field(where, row, answer_key)
    if not gsm8k:
        return answer
    try:
        return split_gsm8k_answer(answer)[1]
    except ValueError as exc:
        raise DatasetError(f"{where}: field {answer_key!r} has {exc}") from None


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(answer_field: str) -> str:
    """GSM8K's `answer` field as a reference solution: the worked text before "#### N" with its
    calculator notes removed ("48/2 = <<48/2=24>>24" -> "48/2 = 24": the text already states each
    result), then a last line "\\boxed{N}" (N as the gold: thousands commas dropped)."""
    head, final = split_gsm8k_answer(answer_field)
    head = _CALCULATOR_NOTE.sub("", head).strip()
    return f"{head}\n\\boxed{{{final}}}" if head else f"\\boxed{{{final}}}"


def _solution(where: str, row: dict, answer_key: str, gsm8k: bool) -> str | None:
    """The row's `solution` field (text, or absent/null), else GSM8K's worked answer; None if neither."""
    value = row.get("solution")
    if value is None:
        return gsm8k_solution(text_field(where, row, answer_key)) if gsm8k else None
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field 'solution' must be text, got {type(value).__name__}")
    return storable_text(where, "solution", value) if value.strip() else None


def file_prompts(path: str | Path, num_prompts: int | None = None, split: str = "train",
                 problem_key: str | None = None, answer_key: str | None = None) -> list[Prompt]:
    """Prompts from a JSONL/Parquet file; the whole file is validated before returning."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows_prompts(rows, path.stem, num_prompts, split, problem_key, answer_key)


def rows_prompts(rows: list[tuple[str, dict]], source: str, num_prompts: int | None, split: str,
                 problem_key: str | None, answer_key: str | None) -> list[Prompt]:
    """Prompts from (location, row) pairs of any reader: MATH or GSM8K fields, or the given keys; an
    optional `solution` field (GSM8K: derived from its answer, notes removed; see gsm8k_solution)."""
    first = rows[0][1]
    gsm8k = problem_key is None and "problem" not in first and "question" in first
    problem_key = problem_key or ("question" if gsm8k else "problem")
    answer_key = answer_key or "answer"
    prompts, seen_ids, seen_problems = [], {}, {}
    for where, row in rows:
        problem = text_field(where, row, problem_key)
        answer = _gold(where, row, answer_key, gsm8k)
        unique_id = optional_text(where, row, "unique_id")
        if unique_id is not None:
            if unique_id in seen_ids:
                raise DatasetError(f"{where}: duplicate unique_id {unique_id!r} (first at {seen_ids[unique_id]})")
            seen_ids[unique_id] = where
        level = _level(where, row)
        subject = optional_text(where, row, "subject")
        solution = _solution(where, row, answer_key, gsm8k)
        if problem in seen_problems:  # the same problem twice would be one prompt_id twice
            first, first_answer = seen_problems[problem]
            if first_answer != answer:
                raise DatasetError(f"{where}: the problem of {first} again, with gold {answer!r} here but "
                                   f"{first_answer!r} there: which one is right?")
            continue
        seen_problems[problem] = (where, answer)
        prompts.append(Prompt(keys.prompt_id(source, problem), source, split, problem, answer, level,
                              subject, unique_id, solution))
    return prompts[:num_prompts] if num_prompts else prompts


FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip")  # a missing file, not a hub id
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hf_rows(dataset, where: str) -> list[tuple[str, dict]]:
    return [(f"{where} row {i + 1}", row) for i, row in enumerate(dataset)]


def _pick_split(loaded, where: str, split: str):
    """A Dataset as is; a DatasetDict's `split`, or a clear list of the splits it has."""
    if not hasattr(loaded, "keys"):
        return loaded
    if split not in loaded:
        raise DatasetError(f"{where}: no split {split!r}; it has {', '.join(sorted(loaded)) or 'none'} "
                           f"(choose with --split / --dataset-split)")
    return loaded[split]


def saved_dataset_prompts(path: Path, num_prompts: int | None, split: str, problem_key: str | None,
                          answer_key: str | None, read_split: str | None = None) -> list[Prompt]:
    """Prompts from a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise DatasetError(f"{path}: not a Hugging Face dataset directory (save_to_disk): {exc}") from None
    read_split = read_split or split
    dataset = _pick_split(loaded, str(path), read_split)
    where = f"{path} [{read_split}]" if hasattr(loaded, "keys") else str(path)
    rows = _hf_rows(dataset, where)
    if not rows:
        raise DatasetError(f"{where}: no rows")
    return rows_prompts(rows, path.name, num_prompts, split, problem_key, answer_key)


def hub_dataset_prompts(hub_id: str, config: str | None, hub_split: str, num_prompts: int | None, split: str,
                        problem_key: str | None, answer_key: str | None) -> list[Prompt]:
    """Prompts from a Hugging Face Hub dataset (or the local datasets cache when offline)."""
    import datasets

    where = f"{hub_id}{f' ({config})' if config else ''} [{hub_split}]"
    try:
        dataset = datasets.load_dataset(hub_id, config, split=hub_split)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
        reason = ("the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and the dataset is not in "
                  "the local cache" if offline else f"{type(exc).__name__}: {exc}")
        raise DatasetError(f"cannot load dataset {where} from the Hugging Face Hub: {reason}. Download it "
                           f"where the hub is reachable and pass the directory of Dataset.save_to_disk "
                           f"to --dataset") from None
    rows = _hf_rows(dataset, where)
    if not rows:
        raise DatasetError(f"{where}: no rows")
    return rows_prompts(rows, hub_id + (f":{config}" if config else ""), num_prompts, split, problem_key,
                        answer_key)


def load_prompts(dataset: str, num_prompts: int | None = None, split: str = "train", seed: int = 0,
                 problem_key: str | None = None, answer_key: str | None = None,
                 levels: tuple[int, ...] = (1, 2, 3, 4, 5), dataset_config: str | None = None,
                 dataset_split: str | None = None) -> list[Prompt]:
    """`dataset`: arith, a .jsonl/.parquet file, a save_to_disk directory or a hub id (org/name).
    A DatasetDict's split is `dataset_split`, else `split` (which also labels the prompts)."""
    if num_prompts is not None and num_prompts < 1:
        raise DatasetError(f"--num-prompts must be at least 1, got {num_prompts}")
    if dataset == ARITH:
        return arith_prompts(num_prompts or 64, split=split, seed=seed, levels=levels)
    path = Path(dataset)
    if path.is_dir():
        return saved_dataset_prompts(path, num_prompts, split, problem_key, answer_key, dataset_split)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return file_prompts(path, num_prompts, split, problem_key, answer_key)
    if HUB_ID.match(dataset) and not path.exists() and path.suffix not in FILE_SUFFIXES:
        return hub_dataset_prompts(dataset, dataset_config, dataset_split or split, num_prompts, split,
                                   problem_key, answer_key)
    raise DatasetError(f"unknown dataset {dataset!r}: use 'arith', a .jsonl/.parquet file, a directory written by "
                       f"datasets' save_to_disk, or a Hugging Face Hub id (org/name)")
