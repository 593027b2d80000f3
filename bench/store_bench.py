"""Store benchmark: write N synthetic rollouts through `Store.write`, then time the negative-group
question through `replay sql` (CLI subprocess and in-process) vs pandas over JSONL rollout dumps.

    python bench/store_bench.py [--rollouts 1000000] [--out DIR] [--keep] [--skip-pandas] [--profile]
    python bench/store_bench.py --s3 [--rollouts 100000]   # the same rows into a local and an s3:// store

With --s3 the bench starts an S3 API server on loopback (moto, in its own process), writes every
batch to a local store and to `s3://bench/store`, and times the negative-group queries on both.
    python bench/store_bench.py --sizes 1e6,1e7 --skip-pandas    # each question per size, side by side
    python bench/store_bench.py --reuse --out DIR --append 1e6   # the write rate at a kept store's size

With --sizes, each store is written, timed and deleted in turn (unless --keep), and a last table
puts every question's CLI time, the write rate and the disk of each size next to each other.
`--skip-pandas` also skips the JSONL dumps (4x the store's disk).

Synthetic data: 8 samples per prompt, 5 rounds over one prompt set, completion lengths ~ Gamma
(mean 300, max 1024) with a float32 logprob per token, a per-prompt difficulty that eases each
round (about 31% -> 22% negative groups). Generation is vectorised (numpy/pyarrow) and not part
of the timed write. The JSONL dumps (one object per rollout: ids, logprobs, text, reward, as
trainers dump them) are written from the same batches with DuckDB's JSON writer.

Every timing is printed as wall and CPU seconds (CPU of all threads of the timed process): on a
shared machine wall time depends on the neighbours, CPU time much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay import keys, summary  # noqa: E402
from replay.store import Store  # noqa: E402

G, ROUNDS, VOCAB, MAX_TOKENS = 8, 5, 49152, 1024
NOW_US = 1_790_000_000_000_000
TS = pa.timestamp("us", tz="UTC")
QUERIES = {
    "count": "SELECT round, count(*) AS negative_groups FROM negative_groups GROUP BY round ORDER BY round",
    "top20": (f"SELECT prompt_id, n, mean_confidence FROM negative_groups WHERE round = {ROUNDS - 1} "
              "ORDER BY mean_confidence DESC LIMIT 20"),
}

# failure-group questions through `replay sql` (CLI start-up included), per size
QUESTIONS = {
    "SELECT 1 (start-up)": "SELECT 1",
    "top-20 negative groups": QUERIES["top20"],
    "negative groups per round": QUERIES["count"],
    "group counts by kind and round": "SELECT round, kind, count(*) AS n FROM groups GROUP BY ALL ORDER BY ALL",
    "rounds view": "SELECT * FROM rounds",
    "confident mistakes, one round": (f"SELECT prompt_id, sample_idx, confidence, extracted_answer "
                                      f"FROM confident_mistakes WHERE round = {ROUNDS - 1} LIMIT 20"),
    # what `learn --round R --rescue replay` picks from: every stored success of each negative group's prompt
    "rescue candidates, one round": (f"SELECT count(*) AS candidates, count(DISTINCT prompt_id) AS groups "
                                     f"FROM rescue_candidates WHERE round = {ROUNDS - 1}"),
}


class Clock:
    """Accumulates wall and CPU seconds (all threads of this process) over timed blocks."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def __call__(self):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


# -- synthetic data ---------------------------------------------------------------------------
def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def string_array(pool: np.ndarray, nbytes: np.ndarray, rng) -> pa.StringArray:
    """Random windows of an ASCII text pool, gathered in one numpy pass."""
    offsets = np.zeros(len(nbytes) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=offsets[1:])
    starts = rng.integers(0, len(pool) - nbytes.max(), len(nbytes))
    idx = np.repeat((starts - offsets[:-1]).astype(np.int32), nbytes) + np.arange(offsets[-1], dtype=np.int32)
    return pa.StringArray.from_buffers(len(nbytes), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(pool[idx]))


def text_pool(rng, nbytes: int = 16 << 20) -> np.ndarray:
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10)))
             for _ in range(3000)] + ["=", "+", "\\frac{1}{2}", "x", "\\boxed{7}", "so", "the", "\n"]
    freq = 1.0 / np.arange(1, len(words) + 1)
    drawn = rng.choice(len(words), nbytes // 5, p=freq / freq.sum())
    return np.frombuffer(" ".join(words[i] for i in drawn).encode()[:nbytes], dtype=np.uint8)


def make_prompts(n: int, rng, pool: np.ndarray) -> pa.Table:
    # numbered, so that no two random windows of the pool give the same problem (and prompt_id)
    numbers = pa.array([f"Problem {i}. " for i in range(n)])
    problems = pc.binary_join_element_wise(numbers, string_array(pool, rng.integers(80, 400, n), rng), "")
    ids = [keys.prompt_id("bench", p) for p in problems.to_pylist()]
    return pa.table({
        "prompt_id": ids, "source": pa.repeat("bench", n), "split": pa.repeat("train", n),
        "problem": problems, "answer": pa.array(rng.integers(0, 1000, n).astype(str)),
        "level": pa.array(rng.integers(1, 6, n, dtype=np.int32)), "subject": pa.nulls(n, pa.string()),
        "unique_id": pa.nulls(n, pa.string()), "created_at": pa.array(np.full(n, NOW_US), TS),
        "solution": pa.nulls(n, pa.string())})


def make_batch(rnd: int, prompt_rows: np.ndarray, prompts: pa.Table, difficulty: np.ndarray, rng, pool):
    """Rollouts, verdicts and the matching JSONL-dump table for whole groups of `prompt_rows`."""
    n = len(prompt_rows) * G
    pidx = pa.array(np.repeat(prompt_rows, G))
    pids = prompts.column("prompt_id").take(pidx)
    sample = np.tile(np.arange(G, dtype=np.int32), len(prompt_rows))
    lengths = np.clip(rng.gamma(2.0, 150.0, n), 1, MAX_TOKENS).astype(np.int32)
    total = int(lengths.sum())
    scale = np.repeat(rng.uniform(0.05, 0.8, n).astype(np.float32), lengths)
    logprobs = -rng.standard_exponential(total, dtype=np.float32) * scale
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sum_lp = np.add.reduceat(logprobs.astype(np.float64), starts)
    token_ids = (VOCAB * rng.random(total, dtype=np.float32) ** 3).astype(np.int32)  # Zipf-ish ids
    plen = np.repeat(rng.integers(40, 160, len(prompt_rows)).astype(np.int32), G)
    keys_ = list(zip(pids.to_pylist(), sample.tolist()))
    col = lambda v, t=None: pa.repeat(pa.scalar(v, t), n)  # noqa: E731
    rollouts = pa.table({
        "round": col(rnd, pa.int32()), "prompt_id": pids, "sample_idx": sample,
        "rollout_id": [keys.rollout_id(rnd, p, s) for p, s in keys_],
        "prompt_token_ids": list_array(plen, rng.integers(0, VOCAB, int(plen.sum()), dtype=np.int32)),
        "completion_token_ids": list_array(lengths, token_ids),
        "completion_logprobs": list_array(lengths, logprobs),
        "sum_logprob": sum_lp, "num_completion_tokens": lengths,
        "completion_text": string_array(pool, lengths * 4, rng),
        "finish_reason": pa.array(np.where(lengths >= MAX_TOKENS, "length", "stop")),
        "policy_round": col(rnd - 1 if rnd else None, pa.int32()),
        "policy_adapter": col(f"adapters/round={rnd - 1}" if rnd else None, pa.string()),
        "base_model": col("SmolLM2-135M-Instruct"), "engine": col("vllm"), "engine_version": col("0.11.0"),
        "logprobs_mode": col("processed"), "temperature": col(1.0, pa.float32()),
        "top_p": col(1.0, pa.float32()), "top_k": col(-1, pa.int32()), "max_tokens": col(MAX_TOKENS, pa.int32()),
        "seed": [keys.sample_seed(0, rnd, p, s) for p, s in keys_],
        "created_at": pa.array(np.full(n, NOW_US), TS)})
    p_correct = 1 / (1 + np.exp(-(-1.2 + 0.2 * rnd + 2.5 * difficulty[np.repeat(prompt_rows, G)])))
    correct = rng.random(n) < p_correct
    verdicts = verdict_table(rnd, rollouts, correct, rng, "0.8.0", NOW_US)
    # 5% of the rollouts re-scored a day later by a newer verifier that flips 30% of those verdicts
    again = np.flatnonzero(rng.random(n) < 0.05)
    correct[again] ^= rng.random(len(again)) < 0.3
    rescores = verdict_table(rnd, rollouts.take(again), correct[again], rng, "0.8.1", NOW_US + 86_400_000_000)
    dump = pa.table({
        "step": rollouts.column("round"), "prompt_id": pids, "sample_idx": sample,
        "prompt": prompts.column("problem").take(pidx),
        **{c: rollouts.column(c) for c in ("prompt_token_ids", "completion_token_ids",
                                           "completion_logprobs", "completion_text", "finish_reason")},
        "reward": correct.astype(np.float32)})  # the final verdict, as a dump written after re-scoring
    return rollouts, verdicts, rescores, dump


def verdict_table(rnd: int, rollouts: pa.Table, correct: np.ndarray, rng, version: str, at_us: int) -> pa.Table:
    n = len(correct)
    status = np.where(correct | (rng.random(n) > 0.1), "ok", "no_answer")
    return pa.table({
        "round": pa.repeat(pa.scalar(rnd, pa.int32()), n), "prompt_id": rollouts.column("prompt_id"),
        "sample_idx": rollouts.column("sample_idx"), "rollout_id": rollouts.column("rollout_id"),
        "correct": correct, "reward": correct.astype(np.float32), "status": pa.array(status),
        "extracted_answer": pa.array(rng.integers(0, 1000, n).astype(str)), "error": pa.nulls(n, pa.string()),
        "verifier": pa.repeat("math-verify", n), "verifier_version": pa.repeat(version, n),
        "latency_ms": rng.gamma(2.0, 5.0, n).astype(np.float32), "scored_at": pa.array(np.full(n, at_us), TS)})


def write_all(store: Store, jsonl_dir: Path | None, n_rollouts: int, part_rows: int, seed: int = 0) -> dict:
    """Write the store (and the JSONL dumps unless jsonl_dir is None); each round ends as `replay
    score` ends, with the round's group summary."""
    rng = np.random.default_rng(seed)
    clocks = {k: Clock() for k in ("gen", "prompts", "rollouts", "verdicts", "summary", "jsonl")}
    stats = {"n_rollouts": 0, "tokens": 0, "write_peak_mib": 0.0, "bench_peak_mib": 0.0}
    with clocks["gen"]():
        pool = text_pool(rng)
        n_prompts = n_rollouts // (G * ROUNDS)
        prompts = make_prompts(n_prompts, rng, pool)
        difficulty = rng.standard_normal(n_prompts)
    with clocks["prompts"]():
        store.write("prompts", prompts)
    per_part = max(1, part_rows // G)
    con = duckdb.connect()
    for rnd in range(ROUNDS):
        for k, lo in enumerate(range(0, n_prompts, per_part)):
            with clocks["gen"]():
                rows = np.arange(lo, min(lo + per_part, n_prompts))
                rollouts, verdicts, rescores, dump = make_batch(rnd, rows, prompts, difficulty, rng, pool)
            stats["bench_peak_mib"] = max(stats["bench_peak_mib"], peak_rss_mib())
            reset_peak_rss()
            with clocks["rollouts"]():
                store.write("rollouts", rollouts)
            with clocks["verdicts"]():
                store.write("verdicts", verdicts)
                store.write("verdicts", rescores)
            stats["write_peak_mib"] = max(stats["write_peak_mib"], peak_rss_mib())
            if jsonl_dir is not None:
                with clocks["jsonl"]():
                    con.register("dump", dump)
                    con.execute(f"COPY dump TO '{jsonl_dir / f'rollouts_step{rnd}_part{k:03d}.jsonl'}' (FORMAT json)")
                    con.unregister("dump")
            stats["bench_peak_mib"] = max(stats["bench_peak_mib"], peak_rss_mib())
            stats["n_rollouts"] += rollouts.num_rows
            stats["tokens"] += int(np.sum(rollouts.column("num_completion_tokens").to_numpy()))
        with clocks["summary"]():
            summary.refresh(store, rnd)
    con.close()
    return {**stats, **clocks}


def append_round(store: Store, n_rollouts: int, part_rows: int) -> None:
    """The write rate at the store's size: one more round of n_rollouts (groups of the stored
    prompts) written into a kept store, Store.write alone timed, after a sync so that the kernel is
    not still writing back an earlier run; the round is removed afterwards (the store is as before)."""
    rng = np.random.default_rng(1)
    prompts = store.query("SELECT prompt_id, problem FROM prompts")
    difficulty = rng.standard_normal(prompts.num_rows)
    rnd = max(store.rounds()) + 1
    n_groups, per_part = min(n_rollouts // G, prompts.num_rows), max(1, part_rows // G)
    pool = text_pool(rng, 1 << 20)
    os.sync()
    clock, written = Clock(), 0
    try:
        for lo in range(0, n_groups, per_part):
            rows = np.arange(lo, min(lo + per_part, n_groups))
            rollouts, *_ = make_batch(rnd, rows, prompts, difficulty, rng, pool)
            with clock():
                store.write("rollouts", rollouts)
            written += rollouts.num_rows
    finally:
        shutil.rmtree(store.table_dir("rollouts", rnd), ignore_errors=True)
    print(f"append: Store.write of {written:,} rollouts as round {rnd} of the kept store: {clock.wall:.2f} s wall, "
          f"{clock.cpu:.2f} s CPU: {written / clock.wall:,.0f} rollouts/s wall, {written / clock.cpu:,.0f} per CPU-s")


# -- measuring --------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """VmHWM of this process: unlike ru_maxrss it is not inherited from the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: reset VmHWM to the current RSS, so the next peak_rss_mib() covers one step."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def cli_run(store: Path, sql: str, checkout: Path | None = None) -> tuple[float, float, float, str]:
    """Wall s, CPU s, peak RSS MiB and stdout of one `replay sql ... --format csv` process
    (of the replay at `checkout`, if given: PYTHONPATH).

    CPU and RSS come from GNU time (a fresh process between us and the CLI, so the CLI does not
    inherit this big process's high-water mark); NaN without /usr/bin/time."""
    script = Path(sys.executable).parent / "replay"  # the console script, not a pyenv shim
    replay = [str(script)] if script.exists() else [sys.executable, "-m", "replay"]
    timer = ["/usr/bin/time", "-f", "%U %S %M"] if Path("/usr/bin/time").exists() else []
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else None
    proc = subprocess.run(timer + replay + ["sql", sql, "--store", str(store), "--format", "csv"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"replay sql failed: {proc.stderr}")
    user, sys_, rss = map(float, proc.stderr.split()[-3:]) if timer else (float("nan"),) * 3
    return wall, user + sys_, rss / 1024, proc.stdout


def inprocess(store: str, queries: list[str], repeats: int, queue) -> None:
    """Child process: time Store.read_only_query (connect + views + query) per query."""
    opened = Store.open(store)
    base = peak_rss_mib()
    result = {}
    for sql in queries:
        runs = []
        for _ in range(repeats):
            clock = Clock()
            with clock():
                table = opened.read_only_query(sql)
            runs.append((clock.wall, clock.cpu))
        result[sql] = (runs, table.to_pylist())
    queue.put((result, base, peak_rss_mib()))


def pandas_baseline(jsonl_dir: str, last: int, engine: str, queue) -> None:
    """Child process: pandas.read_json over the dumps, then the same two questions."""
    import pandas as pd

    parse, conf, q1c, q2c = Clock(), Clock(), Clock(), Clock()
    frames = []
    for path in sorted(Path(jsonl_dir).glob("*.jsonl")):
        with parse():
            chunks = (pd.read_json(path, lines=True, chunksize=20_000) if engine == "ujson"
                      else iter([pd.read_json(path, lines=True, engine="pyarrow")]))
        while True:
            with parse():
                chunk = next(chunks, None)
                if chunk is None:
                    break
                keep = pd.DataFrame({"round": chunk["step"], "prompt_id": chunk["prompt_id"],
                                     "correct": chunk["reward"] > 0.5})
            with conf():
                keep["confidence"] = np.exp([np.mean(lp) for lp in chunk["completion_logprobs"]])
            frames.append(keep)
    with parse():
        df = pd.concat(frames, ignore_index=True)
    with q1c():
        groups = df.groupby(["round", "prompt_id"]).agg(n=("correct", "size"), n_correct=("correct", "sum"))
        q1 = groups[groups.n_correct == 0].groupby(level="round").size()
    with q2c():
        g = df[df["round"] == last].groupby("prompt_id").agg(
            n=("correct", "size"), n_correct=("correct", "sum"), mean_confidence=("confidence", "mean"))
        q2 = g[g.n_correct == 0].nlargest(20, "mean_confidence")
    queue.put({"parse": parse, "conf": conf, "q1": q1c, "q2": q2c, "rss_mib": peak_rss_mib(),
               "answer_count": {int(k): int(v) for k, v in q1.items()}, "answer_top20": list(q2.index)})


def in_child(target, *args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def profile(con: duckdb.DuckDBPyConnection, sql: str, top: int = 5) -> None:
    """EXPLAIN ANALYZE (JSON profile) on a trusted connection, reduced to the slowest operators."""
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{fh.name}'")
        con.sql(sql).fetchall()
        con.execute("PRAGMA disable_profiling")
        tree = json.loads(Path(fh.name).read_text())
    nodes, stack = [], list(tree["operator"])
    while stack:
        nodes.append(stack.pop())
        stack.extend(nodes[-1].get("children", []))
    print(f"    operators {sum(n['timing'] for n in nodes):.3f} s (thread time, incl. waits); slowest:")
    for node in sorted(nodes, key=lambda n: -n["timing"])[:top]:
        info = {k: v for k, v in node["extra_info"].items() if k in ("Function", "Join Type", "Conditions",
                                                                      "Groups", "Projections")}
        print(f"      {node['type']:<15} {node['timing']:6.3f} s {node['intermediate_rows']:>10,} rows  "
              f"{json.dumps(info)[:100]}")


def time_views(store: Store, repeats: int, show_profile: bool) -> None:
    """The queries, `rounds` and all of `samples` on a trusted connection (no CLI start-up)."""
    questions = {**QUERIES, "rounds": "SELECT * FROM rounds", "newest": "SELECT verifier_version, "
                 "count(*), sum(reward), sum(CAST(extracted_answer AS BIGINT)) FROM samples GROUP BY ALL ORDER BY 1"}
    con = store.connect()
    print("\nviews on a trusted connection   query   wall min s  CPU min s")
    for q, sql in questions.items():
        runs = []
        for _ in range(1 if q == "newest" else repeats):  # all of `samples`: seconds at 10 M rollouts
            clock = Clock()
            with clock():
                con.sql(sql).fetchall()
            runs.append((clock.wall, clock.cpu))
        print(f"  {'':<29} {q:<7} {min(r[0] for r in runs):10.3f} {min(r[1] for r in runs):10.3f}")
        if show_profile and q in QUERIES:
            profile(con, sql)
    con.close()


# -- report -----------------------------------------------------------------------------------
def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("**/*") if p.is_file())


def row(label: str, runs: list, extra: str = "") -> str:
    walls, cpus = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
    return f"{label:<28} {walls[len(walls) // 2]:8.3f} {walls[0]:7.3f} {cpus[len(cpus) // 2]:8.3f}  {extra}"


def report_write(w: dict, store: Store) -> None:
    n = w["n_rollouts"]
    print(f"\nrollouts {n:,} ({w['tokens'] / n:.0f} completion tokens mean), "
          f"{len(store.files('rollouts'))} rollout part files; load average {os.getloadavg()[0]:.1f}")
    print("step                               wall s    CPU s    rollouts/s (wall, CPU)")
    for key, label in (("gen", "generate (not in the write)"), ("rollouts", "Store.write rollouts"),
                       ("verdicts", "Store.write verdicts"), ("prompts", "Store.write prompts"),
                       ("summary", "group summaries (score's end)"), ("jsonl", "JSONL dump (DuckDB COPY)")):
        c = w[key]
        if c.wall == 0:
            continue
        print(f"{label:<32} {c.wall:8.2f} {c.cpu:8.2f}    {n / c.wall:10,.0f} {n / max(c.cpu, 1e-9):10,.0f}")
    print(f"peak RSS during Store.write {w['write_peak_mib']:6.0f} MiB (incl. the batch in memory); "
          f"whole bench {w['bench_peak_mib']:.0f} MiB (incl. generation and the JSONL dump)")


# -- local vs s3:// -----------------------------------------------------------------------------
@contextlib.contextmanager
def moto_server():
    """An S3 API server in its own process (not a thread of this one: no GIL shared with the client)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait()


def s3_compare(args) -> None:
    from replay.storage.s3 import client

    out = Path(tempfile.mkdtemp(prefix="store-bench-s3-", dir="/tmp"))
    try:
        with moto_server():
            client().create_bucket(Bucket="bench")
            stores = {"local": Store.create(out / "store", base_model="bench"),
                      "s3": Store.create("s3://bench/store", base_model="bench")}
            rng = np.random.default_rng(0)
            pool = text_pool(rng)
            n_prompts = args.rollouts // (G * ROUNDS)
            prompts = make_prompts(n_prompts, rng, pool)
            difficulty = rng.standard_normal(n_prompts)
            clocks = {name: Clock() for name in stores}
            per_part, n, parts = max(1, args.part_rows // G), 0, 0
            for name, store in stores.items():
                with clocks[name]():
                    store.write("prompts", prompts)
            for rnd in range(ROUNDS):
                for lo in range(0, n_prompts, per_part):
                    rows = np.arange(lo, min(lo + per_part, n_prompts))
                    rollouts, verdicts, rescores, _ = make_batch(rnd, rows, prompts, difficulty, rng, pool)
                    for name, store in stores.items():  # the same rows, one after the other
                        with clocks[name]():
                            for table, data in (("rollouts", rollouts), ("verdicts", verdicts), ("verdicts", rescores)):
                                store.write(table, data)
                    n, parts = n + rollouts.num_rows, parts + 3
            size = du(out / "store") / 2 ** 20
            print(f"{n:,} rollouts in {parts} rollout/verdict part files ({size:,.0f} MiB), the same rows to "
                  f"each store; load average {os.getloadavg()[0]:.1f}")
            print("store   write wall s  CPU s   rollouts/s   MiB/s")
            for name, c in clocks.items():
                print(f"{name:<7} {c.wall:12.2f} {c.cpu:6.2f} {n / c.wall:12,.0f} {size / c.wall:7.1f}")
            print(f"s3/local write time: {clocks['s3'].wall / clocks['local'].wall:.2f}x")
            print("\nquery (Store.read_only_query: connect + views + query)   median s  min s   (s3/local)")
            answers = {}
            for q, sql in QUERIES.items():
                med = {}
                for name, store in stores.items():
                    runs = []
                    for _ in range(args.repeats):
                        clock = Clock()
                        with clock():
                            answers[(q, name)] = store.read_only_query(sql).to_pylist()
                        runs.append(clock.wall)
                    med[name] = sorted(runs)[len(runs) // 2]
                    print(f"  {q:<7} {name:<6} {med[name]:46.3f} {min(runs):6.3f}")
                print(f"  {q:<7} s3/local {med['s3'] / med['local']:44.1f}x;  same answer: "
                      f"{answers[(q, 'local')] == answers[(q, 's3')]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
def measure(args, out: Path, n_rollouts: int) -> dict:
    """Write one store of n_rollouts, print its report, return its numbers for the size table."""
    store_dir, jsonl_dir = out / "store", (None if args.skip_pandas else out / "jsonl")
    if jsonl_dir:
        jsonl_dir.mkdir(parents=True, exist_ok=True)
    what = "the store kept there" if args.reuse else f"{n_rollouts:,} rollouts"
    print(f"\n===== {what}, out {out}, load average {os.getloadavg()[0]:.1f} =====", flush=True)
    if args.reuse:
        store, w = Store.open(store_dir), None
        if args.append:
            append_round(store, args.append, args.part_rows)
    else:
        store = Store.create(store_dir, base_model="bench")
        w = write_all(store, jsonl_dir, n_rollouts, args.part_rows)
        report_write(w, store)
    store_b = du(store_dir)
    jsonl_b = du(jsonl_dir) if jsonl_dir else 0
    print(f"disk: store {store_b / 2**20:,.0f} MiB (rollouts {du(store_dir / 'rollouts') / 2**20:,.0f}, "
          f"verdicts {du(store_dir / 'verdicts') / 2**20:,.0f}, group summary "
          f"{du(store_dir / 'group_summary') / 2**20:,.1f})"
          + (f", JSONL {jsonl_b / 2**20:,.0f} MiB ({jsonl_b / store_b:.1f}x the store)" if jsonl_dir else ""))
    result = {"disk_mib": store_b / 2**20, "write": w, "cli": {}}
    print(f"\nquery (load average {os.getloadavg()[0]:.1f})     median s   min s  CPU s  rows, peak RSS MiB")
    for name, sql in QUESTIONS.items():
        runs = [cli_run(store_dir, sql) for _ in range(args.repeats)]
        result["cli"][name] = runs
        print(row(f"CLI {name}"[:28], runs, f"{len(runs[0][3].splitlines()) - 1}, {max(r[2] for r in runs):.0f}"))
    print(f"(load average {os.getloadavg()[0]:.1f} after the CLI questions)")
    inproc, base_rss, rss = in_child(inprocess, str(store_dir), list(QUERIES.values()), args.repeats)
    for name, sql in QUERIES.items():
        print(row(f"in-process {name}", inproc[sql][0], f"{len(inproc[sql][1])}, {rss:.0f} "
                                                         f"({base_rss:.0f} after imports)"))
    time_views(store, args.repeats, args.profile)
    if args.baseline:
        compare_checkouts(store_dir, args.baseline, result["cli"], args.repeats)
    if jsonl_dir:
        pandas_compare(jsonl_dir, result["cli"], inproc)
    return result


def same_answers(a: str, b: str) -> bool:
    """Two CSV outputs hold the same values (numbers to 1e-9: the CSV writers print floats differently)."""
    import csv

    def cells(text):
        return [[(float(c) if c.replace(".", "", 1).replace("e-", "", 1).lstrip("-").isdigit() else c)
                 for c in row] for row in csv.reader(text.splitlines())]
    x, y = cells(a), cells(b)
    return len(x) == len(y) and all(
        len(r) == len(q) and all(abs(u - v) <= 1e-9 * max(1, abs(v)) if isinstance(u, float) and isinstance(v, float)
                                 else u == v for u, v in zip(r, q)) for r, q in zip(x, y))


def compare_checkouts(store_dir: Path, baseline: Path, ours: dict, repeats: int) -> None:
    """The same questions on the same store through another replay checkout (e.g. before a change)."""
    print(f"\n| question | {baseline}: median / min s (CPU s) | this checkout | ratio (median) |\n|---|---:|---:|---:|")
    for name, sql in QUESTIONS.items():
        runs = [cli_run(store_dir, sql, baseline) for _ in range(repeats)]
        same = same_answers(runs[0][3], ours[name][0][3])
        cells = []
        for r in (runs, ours[name]):
            walls, cpus = sorted(x[0] for x in r), sorted(x[1] for x in r)
            cells.append((walls[len(walls) // 2], walls[0], cpus[len(cpus) // 2]))
        print(f"| {name} | {cells[0][0]:.2f} / {cells[0][1]:.2f} ({cells[0][2]:.2f}) | {cells[1][0]:.2f} / "
              f"{cells[1][1]:.2f} ({cells[1][2]:.2f}) | {cells[0][0] / cells[1][0]:.1f}x; same CSV: {same} |")


def pandas_compare(jsonl_dir: Path, cli: dict, inproc: dict) -> None:
    names = {"count": "negative groups per round", "top20": "top-20 negative groups"}
    median = {k: sorted(r[0] for r in cli[names[k]])[len(cli[names[k]]) // 2] for k in names}
    median_cpu = {k: sorted(r[1] for r in cli[names[k]])[len(cli[names[k]]) // 2] for k in names}
    for engine in ("ujson", "pyarrow"):
        p = in_child(pandas_baseline, str(jsonl_dir), ROUNDS - 1, engine)
        how = "in chunks of 20,000 rows" if engine == "ujson" else "one 40k-row file at a time"
        print(f"\npandas read_json(lines=True, engine={engine}), {how}; load average "
              f"{os.getloadavg()[0]:.1f}; peak RSS {p['rss_mib']:.0f} MiB\n"
              f"  parse {p['parse'].wall:.1f} s (CPU {p['parse'].cpu:.1f}), confidence {p['conf'].wall:.1f} s "
              f"(CPU {p['conf'].cpu:.1f}), groupby count {p['q1'].wall:.3f} s, top-20 {p['q2'].wall:.3f} s")
        for name, parts in (("count", ("parse", "q1")), ("top20", ("parse", "conf", "q2"))):
            wall, cpu = sum(p[k].wall for k in parts), sum(p[k].cpu for k in parts)
            print(f"  {name}: pandas {wall:.1f} s (CPU {cpu:.1f}) vs `replay sql` CLI {median[name]:.3f} s "
                  f"(CPU {median_cpu[name]:.3f}) -> {wall / median[name]:.1f}x wall, "
                  f"{cpu / median_cpu[name]:.1f}x CPU")
        store_count = {r["round"]: r["negative_groups"] for r in inproc[QUERIES["count"]][1]}
        same = (store_count == p["answer_count"]
                and [r["prompt_id"] for r in inproc[QUERIES["top20"]][1]] == p["answer_top20"])
        print(f"  negative groups per round {store_count}; pandas gives the same answers: {same}")


def size_table(results: dict[int, dict]) -> None:
    """Every question's CLI time per size side by side (median / min wall of the repeats, median CPU),
    then the write rate, the summary's cost and the disk; growth is the last size's over the first's."""
    sizes = list(results)
    head = "".join(f" | {n / 1e6:g} M: median / min s (CPU s)" for n in sizes)
    growth = " | growth" if len(sizes) > 1 else ""
    print(f"\n| question{head}{growth} |\n|---{'|---:' * (len(sizes) + bool(growth))}|")
    for q in QUESTIONS:
        meds = [sorted(r[0] for r in results[n]["cli"][q])[len(results[n]["cli"][q]) // 2] for n in sizes]
        mins = [min(r[0] for r in results[n]["cli"][q]) for n in sizes]
        cpus = [sorted(r[1] for r in results[n]["cli"][q])[len(results[n]["cli"][q]) // 2] for n in sizes]
        cells = "".join(f" | {m:.2f} / {b:.2f} ({c:.2f})" for m, b, c in zip(meds, mins, cpus))
        print(f"| CLI: {q}{cells}" + (f" | {meds[-1] / meds[0]:.1f}x" if growth else "") + " |")
    if all(results[n]["write"] for n in sizes):
        rates = [results[n]["write"]["n_rollouts"] / results[n]["write"]["rollouts"].wall for n in sizes]
        cpu = [results[n]["write"]["n_rollouts"] / results[n]["write"]["rollouts"].cpu for n in sizes]
        summ = [results[n]["write"]["summary"].wall / ROUNDS for n in sizes]
        print("| write, rollouts/s (wall; per CPU-s)" + "".join(f" | {r:,.0f} ({c:,.0f})" for r, c in zip(rates, cpu))
              + (f" | {rates[-1] / rates[0]:.2f}x" if growth else "") + " |")
        print("| group summary per round, s (score's last step)" + "".join(f" | {x:.2f}" for x in summ)
              + (f" | {summ[-1] / summ[0]:.1f}x" if growth else "") + " |")
    disk = [results[n]["disk_mib"] for n in sizes]
    print("| disk, store GiB" + "".join(f" | {d / 1024:.1f}" for d in disk)
          + (f" | {disk[-1] / disk[0]:.1f}x" if growth else "") + " |")


def parse_sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--sizes", type=parse_sizes, default=None, help="comma-separated store sizes, e.g. 1e6,1e7: "
                    "each is written, timed and deleted in turn; a last table compares them")
    ap.add_argument("--part-rows", type=int, default=40_000, help="rollouts per part file (whole groups)")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the store and the JSONL dumps")
    ap.add_argument("--skip-pandas", action="store_true", help="no pandas baseline, and no JSONL dumps for it")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="another replay checkout (e.g. before a "
                    "change): the same CLI questions through it, side by side")
    ap.add_argument("--profile", action="store_true", help="print each query's slowest operators")
    ap.add_argument("--s3", action="store_true", help="write the same rows to a local and an s3:// store (moto "
                    "server on loopback) and compare write rate and query time")
    ap.add_argument("--reuse", action="store_true", help="skip the write: query the store and dumps that "
                    "an earlier --keep run left in --out (implies --keep; one size)")
    ap.add_argument("--append", type=float, default=0, help="with --reuse: write this many more rollouts into "
                    "the kept store first and report the write rate at its size (the new round is removed)")
    args = ap.parse_args()
    args.append = int(args.append)
    if args.append and not args.reuse:
        ap.error("--append needs --reuse")
    if args.s3:
        return s3_compare(args)
    sizes = args.sizes or [args.rollouts]
    if args.reuse and (len(sizes) > 1 or not (args.out and (args.out / "store" / "store.json").exists())):
        ap.error("--reuse needs one size and --out DIR holding a store from an earlier --keep run")
    args.keep = args.keep or args.reuse
    root = args.out or Path(tempfile.mkdtemp(prefix="store-bench-", dir="/tmp"))
    print(f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, out {root}", flush=True)
    results = {}
    try:
        for n in sizes:
            out = root if len(sizes) == 1 else root / f"n{n}"
            try:
                results[n] = measure(args, out, n)
            finally:
                if not args.keep:
                    shutil.rmtree(out / "store", ignore_errors=True)
                    shutil.rmtree(out / "jsonl", ignore_errors=True)
        size_table(results)
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
