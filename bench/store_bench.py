"""Store benchmark: write N synthetic rollouts through `Store.write`, then time the negative-group
question through `replay sql` (CLI subprocess and in-process) vs pandas over JSONL rollout dumps.

    python bench/store_bench.py [--rollouts 1000000] [--out DIR] [--keep] [--skip-pandas]

Synthetic data: 8 samples per prompt, 5 rounds over one prompt set, completion lengths ~ Gamma
(mean 300, max 1024) with a float32 logprob per token, a per-prompt difficulty that eases each
round (about 31% → 22% negative groups). Generation is vectorised (numpy/pyarrow) and not timed
as part of the write. The JSONL dumps (one object per rollout: ids, logprobs, text, reward, as
peers' trainers dump them) are written from the same batches with DuckDB's JSON writer.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay import keys  # noqa: E402
from replay.store import Store  # noqa: E402

G, ROUNDS, VOCAB, MAX_TOKENS = 8, 5, 49152, 1024
NOW_US = 1_790_000_000_000_000
TS = pa.timestamp("us", tz="UTC")
Q_COUNT = "SELECT round, count(*) AS negative_groups FROM negative_groups GROUP BY round ORDER BY round"
Q_TOP = ("SELECT prompt_id, n, mean_confidence FROM negative_groups WHERE round = {last} "
         "ORDER BY mean_confidence DESC LIMIT 20")


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
    problems = string_array(pool, rng.integers(80, 400, n), rng)
    ids = [keys.prompt_id("bench", p) for p in problems.to_pylist()]
    return pa.table({
        "prompt_id": ids, "source": pa.repeat("bench", n), "split": pa.repeat("train", n),
        "problem": problems, "answer": pa.array(rng.integers(0, 1000, n).astype(str)),
        "level": pa.array(rng.integers(1, 6, n, dtype=np.int32)), "subject": pa.nulls(n, pa.string()),
        "unique_id": pa.nulls(n, pa.string()), "created_at": pa.array(np.full(n, NOW_US), TS)})


def make_batch(rnd: int, prompt_rows: np.ndarray, prompts: pa.Table, difficulty: np.ndarray, rng, pool):
    """Rollouts, verdicts and the matching JSONL-dump table for whole groups of `prompt_rows`."""
    n = len(prompt_rows) * G
    pidx = np.repeat(prompt_rows, G)
    pids = prompts.column("prompt_id").take(pa.array(pidx))
    sample = np.tile(np.arange(G, dtype=np.int32), len(prompt_rows))
    lengths = np.clip(rng.gamma(2.0, 150.0, n), 1, MAX_TOKENS).astype(np.int32)
    total = int(lengths.sum())
    scale = np.repeat(rng.uniform(0.05, 0.8, n).astype(np.float32), lengths)
    logprobs = -rng.standard_exponential(total, dtype=np.float32) * scale
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    sum_lp = np.add.reduceat(logprobs.astype(np.float64), starts[:-1])
    token_ids = (VOCAB * rng.random(total, dtype=np.float32) ** 3).astype(np.int32)
    plen = np.repeat(rng.integers(40, 160, len(prompt_rows)).astype(np.int32), G)
    pid_list = pids.to_pylist()
    col = lambda v, t=None: pa.repeat(pa.scalar(v, t), n)  # noqa: E731
    rollouts = pa.table({
        "round": col(rnd, pa.int32()), "prompt_id": pids, "sample_idx": sample,
        "rollout_id": [keys.rollout_id(rnd, p, s) for p, s in zip(pid_list, sample.tolist())],
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
        "seed": [keys.sample_seed(0, rnd, p, s) for p, s in zip(pid_list, sample.tolist())],
        "created_at": pa.array(np.full(n, NOW_US), TS)})
    p_correct = 1 / (1 + np.exp(-(-1.2 + 0.2 * rnd + 2.5 * difficulty[pidx])))
    correct = rng.random(n) < p_correct
    status = np.where(correct, "ok", np.where(rng.random(n) < 0.1, "no_answer", "ok"))
    verdicts = pa.table({
        "round": col(rnd, pa.int32()), "prompt_id": pids, "sample_idx": sample,
        "rollout_id": rollouts.column("rollout_id"), "correct": correct,
        "reward": correct.astype(np.float32), "status": pa.array(status),
        "extracted_answer": pa.array(rng.integers(0, 1000, n).astype(str)), "error": pa.nulls(n, pa.string()),
        "verifier": col("math-verify"), "verifier_version": col("0.8.0"),
        "latency_ms": rng.gamma(2.0, 5.0, n).astype(np.float32), "scored_at": pa.array(np.full(n, NOW_US), TS)})
    dump = pa.table({
        "step": rollouts.column("round"), "prompt_id": pids, "sample_idx": sample,
        "prompt": prompts.column("problem").take(pa.array(pidx)),
        **{c: rollouts.column(c) for c in ("prompt_token_ids", "completion_token_ids",
                                           "completion_logprobs", "completion_text", "finish_reason")},
        "reward": verdicts.column("reward")})
    return rollouts, verdicts, dump


def write_all(store: Store, jsonl_dir: Path, n_rollouts: int, part_rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    pool = text_pool(rng)
    n_prompts = n_rollouts // (G * ROUNDS)
    prompts = make_prompts(n_prompts, rng, pool)
    difficulty = rng.standard_normal(n_prompts)
    gen = time.perf_counter() - t
    t = time.perf_counter()
    store.write("prompts", prompts)
    timing = {"prompts_write_s": time.perf_counter() - t, "gen_s": gen, "rollouts_write_s": 0.0,
              "verdicts_write_s": 0.0, "jsonl_write_s": 0.0, "rollouts": 0, "tokens": 0,
              "bench_peak_mib": 0.0, "write_peak_mib": 0.0}
    per_part = max(1, part_rows // G)
    con = duckdb.connect()
    for rnd in range(ROUNDS):
        for k, lo in enumerate(range(0, n_prompts, per_part)):
            t = time.perf_counter()
            rollouts, verdicts, dump = make_batch(rnd, np.arange(lo, min(lo + per_part, n_prompts)),
                                                  prompts, difficulty, rng, pool)
            timing["gen_s"] += time.perf_counter() - t
            timing["bench_peak_mib"] = max(timing["bench_peak_mib"], peak_rss_mib())
            reset_peak_rss()
            t = time.perf_counter()
            store.write("rollouts", rollouts)
            timing["rollouts_write_s"] += time.perf_counter() - t
            t = time.perf_counter()
            store.write("verdicts", verdicts)
            timing["verdicts_write_s"] += time.perf_counter() - t
            timing["write_peak_mib"] = max(timing["write_peak_mib"], peak_rss_mib())
            t = time.perf_counter()
            path = jsonl_dir / f"rollouts_step{rnd}_part{k:03d}.jsonl"
            con.register("dump", dump)
            con.execute(f"COPY dump TO '{path}' (FORMAT json)")
            con.unregister("dump")
            timing["jsonl_write_s"] += time.perf_counter() - t
            timing["bench_peak_mib"] = max(timing["bench_peak_mib"], peak_rss_mib())
            timing["rollouts"] += rollouts.num_rows
            timing["tokens"] += int(np.sum(rollouts.column("num_completion_tokens").to_numpy()))
    con.close()
    return timing


# -- queries ----------------------------------------------------------------------------------
def replay_command() -> list[str]:
    """The installed `replay` console script next to this interpreter (not a pyenv shim)."""
    script = Path(sys.executable).parent / "replay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "replay.cli"]


def peak_rss_mib() -> float:
    """VmHWM of this process: unlike ru_maxrss it is not inherited from the parent across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: reset VmHWM to the current RSS, so the next peak_rss_mib() covers one step."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cli_run(store: Path, sql: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one `replay sql ... --format csv` process.

    The peak RSS comes from GNU time (a fresh process between us and the CLI, so the CLI does not
    inherit this big process's high-water mark); NaN without /usr/bin/time."""
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    cmd = timer + replay_command() + ["sql", sql, "--store", str(store), "--format", "csv"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"replay sql failed: {proc.stderr}")
    rss = int(proc.stderr.split()[-1]) / 1024 if timer else float("nan")
    return wall, rss, proc.stdout


def inprocess(store: str, queries: list[str], repeats: int, queue) -> None:
    """Child process: time Store.read_only_query (connect + views + query) per query."""
    opened = Store.open(store)
    base = peak_rss_mib()
    result = {}
    for sql in queries:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            table = opened.read_only_query(sql)
            times.append(time.perf_counter() - t)
        result[sql] = (times, table.to_pylist())
    queue.put((result, base, peak_rss_mib()))


def pandas_baseline(jsonl_dir: str, last: int, engine: str, queue) -> None:
    """Child process: pandas.read_json over the dumps, then the same two questions."""
    import pandas as pd

    t0 = time.perf_counter()
    frames, parse_s, conf_s = [], 0.0, 0.0
    for path in sorted(Path(jsonl_dir).glob("*.jsonl")):
        t = time.perf_counter()
        chunks = (pd.read_json(path, lines=True, chunksize=20_000) if engine == "ujson"
                  else [pd.read_json(path, lines=True, engine="pyarrow")])
        for chunk in chunks:
            keep = pd.DataFrame({"round": chunk["step"], "prompt_id": chunk["prompt_id"],
                                 "correct": chunk["reward"] > 0.5})
            parse_s += time.perf_counter() - t
            t = time.perf_counter()
            keep["confidence"] = np.exp([np.mean(lp) for lp in chunk["completion_logprobs"]])
            conf_s += time.perf_counter() - t
            frames.append(keep)
            t = time.perf_counter()
        parse_s += time.perf_counter() - t
    df = pd.concat(frames, ignore_index=True)
    t = time.perf_counter()
    groups = df.groupby(["round", "prompt_id"]).agg(n=("correct", "size"), n_correct=("correct", "sum"))
    q1 = groups[groups.n_correct == 0].groupby(level="round").size()
    q1_s = time.perf_counter() - t
    t = time.perf_counter()
    last_round = df[df["round"] == last]
    g = last_round.groupby("prompt_id").agg(n=("correct", "size"), n_correct=("correct", "sum"),
                                             mean_confidence=("confidence", "mean"))
    q2 = g[g.n_correct == 0].nlargest(20, "mean_confidence")
    q2_s = time.perf_counter() - t
    queue.put({"parse_s": parse_s, "conf_s": conf_s, "q1_s": q1_s, "q2_s": q2_s,
               "total_s": time.perf_counter() - t0, "q1": {int(k): int(v) for k, v in q1.items()},
               "q2": list(q2.index),
               "rss_mib": peak_rss_mib()})


def profile(store: str, sql: str, top: int = 6) -> None:
    """EXPLAIN ANALYZE on a trusted connection, reduced to the slowest operators."""
    import json

    con = Store.open(store).connect()
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{fh.name}'")
        con.sql(sql).fetchall()
        con.execute("PRAGMA disable_profiling")
        tree = json.load(open(fh.name))
    nodes, stack = [], list(tree["operator"])
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("children", []))
    print(f"  profile of {sql[:70]}...: {sum(n['timing'] for n in nodes):.3f} s in operators (summed over threads)")
    for node in sorted(nodes, key=lambda n: -n["timing"])[:top]:
        info = {k: v for k, v in node["extra_info"].items() if k in ("Function", "Join Type", "Conditions",
                                                                      "Groups", "Partitions", "Projections")}
        print(f"    {node['type']:<22} {node['timing']:7.3f} s {node['intermediate_rows']:>10,} rows  "
              f"{json.dumps(info)[:110]}")


def in_child(target, *args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# -- report -----------------------------------------------------------------------------------
def du(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--part-rows", type=int, default=40_000, help="rollouts per part file (whole groups)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print the slowest operators of each query "
                    "(always done for a query whose CLI median exceeds 1 s)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="store-bench-", dir="/tmp"))
    store_dir, jsonl_dir = out / "store", out / "jsonl"
    jsonl_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}, numpy {np.__version__}, "
              f"{os.cpu_count()} cores, out {out}", flush=True)
        timing = write_all(Store.create(store_dir, base_model="bench"), jsonl_dir, args.rollouts, args.part_rows)
        n = timing["rollouts"]
        print(f"\nrollouts {n:,} ({timing['tokens'] / n:.0f} completion tokens mean), "
              f"{len(list(store_dir.glob('rollouts/*/part-*')))} rollout part files")
        print(f"generate (untimed in write)  {timing['gen_s']:8.2f} s")
        print(f"Store.write rollouts         {timing['rollouts_write_s']:8.2f} s  "
              f"{n / timing['rollouts_write_s']:10,.0f} rollouts/s  (goal >= 50,000)")
        print(f"Store.write verdicts         {timing['verdicts_write_s']:8.2f} s  "
              f"{n / timing['verdicts_write_s']:10,.0f} rows/s")
        print(f"Store.write prompts          {timing['prompts_write_s']:8.2f} s")
        print(f"JSONL dump (DuckDB COPY)     {timing['jsonl_write_s']:8.2f} s")
        print(f"peak RSS during Store.write   {timing['write_peak_mib']:8.0f} MiB (incl. the batch in memory)")
        print(f"peak RSS of the bench        {timing['bench_peak_mib']:8.0f} MiB (incl. generation, JSONL dump)")
        store_b, jsonl_b = du(store_dir), du(jsonl_dir)
        print(f"disk: store {store_b / 2**20:,.0f} MiB (rollouts {du(store_dir / 'rollouts') / 2**20:,.0f}, "
              f"verdicts {du(store_dir / 'verdicts') / 2**20:,.0f}), JSONL {jsonl_b / 2**20:,.0f} MiB "
              f"({jsonl_b / store_b:.1f}x)")

        queries = {"count": Q_COUNT, "top20": Q_TOP.format(last=ROUNDS - 1)}
        print("\nquery                      median s   min s   rows  peak RSS MiB")
        startup = [cli_run(store_dir, "SELECT 1") for _ in range(args.repeats)]
        print(f"CLI `SELECT 1` (start-up)  {statistics.median(s[0] for s in startup):8.3f} "
              f"{min(s[0] for s in startup):7.3f}      1  {max(s[1] for s in startup):8.0f}")
        best = {}
        for name, sql in queries.items():
            runs = [cli_run(store_dir, sql) for _ in range(args.repeats)]
            best[name] = statistics.median(r[0] for r in runs)
            print(f"CLI {name:<22} {best[name]:8.3f} {min(r[0] for r in runs):7.3f} "
                  f"{len(runs[0][2].splitlines()) - 1:6d}  {max(r[1] for r in runs):8.0f}")
        for name, sql in queries.items():
            if args.profile or best[name] > 1.0:
                profile(str(store_dir), sql)
        result, base_rss, rss = in_child(inprocess, str(store_dir), list(queries.values()), args.repeats + 2)
        for name, sql in queries.items():
            times, rows = result[sql]
            print(f"in-process {name:<15} {statistics.median(times):8.3f} {min(times):7.3f} {len(rows):6d}  "
                  f"{rss:8.0f} (after imports {base_rss:.0f})")
        if not args.skip_pandas:
            for engine in ("ujson", "pyarrow"):
                pd_res = in_child(pandas_baseline, str(jsonl_dir), ROUNDS - 1, engine)
                q1 = pd_res["parse_s"] + pd_res["q1_s"]
                q2 = pd_res["parse_s"] + pd_res["conf_s"] + pd_res["q2_s"]
                print(f"\npandas read_json(lines=True, engine={engine}) "
                      f"{'in chunks of 20,000 rows' if engine == 'ujson' else 'one file at a time'}: "
                      f"parse {pd_res['parse_s']:.1f} s, confidence {pd_res['conf_s']:.1f} s, "
                      f"groupby count {pd_res['q1_s']:.3f} s, top-20 {pd_res['q2_s']:.3f} s, "
                      f"peak RSS {pd_res['rss_mib']:.0f} MiB")
                print(f"  count: pandas {q1:.1f} s vs replay sql CLI {best['count']:.3f} s -> "
                      f"{q1 / best['count']:.0f}x; top-20: pandas {q2:.1f} s vs CLI {best['top20']:.3f} s -> "
                      f"{q2 / best['top20']:.0f}x")
                store_q1 = {r["round"]: r["negative_groups"] for r in result[Q_COUNT][1]}
                store_q2 = [r["prompt_id"] for r in result[queries["top20"]][1]]
                same = store_q1 == pd_res["q1"] and store_q2 == pd_res["q2"]
                print(f"  negative groups per round {store_q1}; pandas gives the same answers: {same}")
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(store_dir, ignore_errors=True)
            shutil.rmtree(jsonl_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
