"""What Parquet page checksums cost: writing a rollouts part with and without them, and reading it
back with and without verifying them (what `replay doctor --deep` does), next to the DuckDB scan
that `learn`'s selection makes of the same columns (DuckDB never verifies checksums); then
`replay doctor --deep` on a store of the same rows in parts of 625, with and without its value checks.

    python bench/checksum_bench.py [--rollouts 20000] [--repeats 5]

Rows come from bench/store_bench.py's generator (completion lengths ~ Gamma, mean 300 tokens, one
float32 logprob per token), written as `Store.write` writes a rollouts part (ZSTD, its dictionary and
statistics options). Each timing is the best of --repeats, as wall and CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store_bench import G, make_batch, make_prompts, text_pool  # noqa: E402

from replay.read import doctor  # noqa: E402
from replay.store import Store, _parquet_options, validate  # noqa: E402


def best(fn, repeats: int) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of `repeats` calls."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(runs)


def best_of_pair(first, second, repeats: int) -> list[tuple[float, float]]:
    """best() of two calls taken in turns, so that a neighbour's load falls on both alike."""
    runs = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runs[i].append((time.perf_counter() - wall, time.process_time() - cpu))
    return [min(r) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pool = text_pool(rng)
    n_prompts = args.rollouts // G
    prompts = make_prompts(n_prompts, rng, pool)
    rollouts, *_ = make_batch(0, np.arange(n_prompts), prompts, rng.random(n_prompts), rng, pool)
    table = validate("rollouts", rollouts).drop_columns(["round"])
    options = _parquet_options("rollouts") | {"compression": "zstd"}
    tokens = int(np.asarray(table.column("num_completion_tokens")).sum())
    print(f"{table.num_rows} rollouts, {tokens:,} completion tokens, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        plain, checked = Path(tmp, "plain.parquet"), Path(tmp, "checked.parquet")
        writes = best_of_pair(lambda: pq.write_table(table, plain, write_page_checksum=False, **options),
                              lambda: pq.write_table(table, checked, write_page_checksum=True, **options),
                              args.repeats)
        rows = [(label, *timing, f"{path.stat().st_size:,} bytes") for label, timing, path in
                zip(("write", "write + page checksums"), writes, (plain, checked))]
        reads = best_of_pair(lambda: pq.read_table(checked),
                             lambda: pq.read_table(checked, page_checksum_verification=True), args.repeats)
        rows += [(label, *timing, "") for label, timing in
                 zip(("read (pyarrow)", "read + verify checksums (doctor --deep)"), reads)]
        sql = ("SELECT sum(len(prompt_token_ids)), sum(len(completion_token_ids)), "
               f"sum(list_sum(completion_logprobs)) FROM read_parquet('{checked}')")
        with duckdb.connect() as con:
            wall, cpu = best(lambda: con.execute(sql).fetchall(), args.repeats)
        rows.append(("DuckDB scan of learn's list columns", wall, cpu, ""))
        store = Store.create(Path(tmp, "store"), base_model="bench")
        for start in range(0, rollouts.num_rows, 625):
            store.write("rollouts", rollouts.slice(start, 625), round=0)
        for label, deep in (("doctor (footers)", False), ("doctor --deep", True)):
            wall, cpu = best(lambda: doctor.diagnose(store.root, deep=deep), args.repeats)
            rows.append((label, wall, cpu, f"{len(store.files('rollouts', 0))} parts"))
        checks, doctor._value_ranges = doctor._value_ranges, lambda *a: None
        wall, cpu = best(lambda: doctor.diagnose(store.root, deep=True), args.repeats)
        doctor._value_ranges = checks
        rows.append(("doctor --deep without its value checks", wall, cpu, ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'wall s':>8}  {'CPU s':>8}")
    for label, wall, cpu, extra in rows:
        print(f"{label:{width}}  {wall:8.3f}  {cpu:8.3f}  {extra}")
    (_, w0, c0, _), (_, w1, c1, _) = rows[2], rows[3]
    print(f"verification: +{(w1 - w0) * 1000:.0f} ms wall, +{(c1 - c0) * 1000:.0f} ms CPU per "
          f"{table.num_rows} rollouts ({(c1 - c0) / max(c0, 1e-9):+.0%} CPU of a plain read)")


if __name__ == "__main__":
    main()
