"""What REPLAY_MALLOC_TUNING (and torchrun) cost: the same `replay learn` run per variant, side by side.

    python bench/learn_malloc_bench.py [--samples 32] [--epochs 2] [--completion-len 128]
        [--modes trim mmap 0 trim/2] [--model smollm2-135m]

Builds a store of synthetic rollouts for the model (random prompt tokens, 64 long; completions
of random tokens, lengths uniform in [len/4, len]; groups of 8, a quarter all wrong, the rest
mixed; stored logprobs -2 per token, T = 1), then runs `python -m replay learn --objective lens`
once per mode in a fresh process (1 torch thread) and reports wall and CPU seconds, minor page
faults and peak RSS of each (os.wait4). Modes (REPLAY_MALLOC_TUNING): 0 (glibc's defaults, the
default), trim (malloc_trim after each backward pass), mmap (128 KiB mmap threshold); trim and
mmap also put torch's large blocks on huge pages (THP_MEM_ALLOC_ENABLE=1). MODE,VAR=VALUE sets an
environment variable for that run (`trim,THP_MEM_ALLOC_ENABLE=0`: trim without huge pages).
MODE/N runs `replay learn --nproc N` (torchrun, gloo). Every run has the same global batch of 16:
micro-batch --micro, accumulation 16 / (micro x N).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = 8
GLOBAL_BATCH = 16


def build_store(root: Path, model: str, samples: int, completion_len: int, vocab: int) -> None:
    from replay import keys
    from replay.store import Store

    now = dt.datetime.now(dt.timezone.utc)
    rng = random.Random(0)
    store = Store.create(root, base_model=model)
    prompts, rollouts, verdicts = [], [], []
    for g in range(samples // GROUP):
        problem = f"synthetic problem {g}"
        pid = keys.prompt_id("bench", problem)
        prompts.append(dict(prompt_id=pid, source="bench", split="train", problem=problem, answer="1", level=None,
                            subject=None, unique_id=None, created_at=now))
        prompt_ids = [rng.randrange(vocab) for _ in range(64)]
        for i in range(GROUP):
            n = rng.randint(completion_len // 4, completion_len)
            rollouts.append(dict(
                round=0, prompt_id=pid, sample_idx=i, rollout_id=keys.rollout_id(0, pid, i),
                prompt_token_ids=prompt_ids, completion_token_ids=[rng.randrange(vocab) for _ in range(n)],
                completion_logprobs=[-2.0] * n, sum_logprob=-2.0 * n, num_completion_tokens=n, completion_text="x",
                finish_reason="stop", policy_round=None, policy_adapter=None, base_model=model, engine="bench",
                engine_version="0", logprobs_mode="processed", temperature=1.0, top_p=1.0, top_k=0,
                max_tokens=completion_len, seed=i, created_at=now))
            correct = g % 4 != 0 and i < 1 + g % 5  # a quarter of the groups all wrong, the rest mixed
            verdicts.append(dict(round=0, prompt_id=pid, sample_idx=i, rollout_id=keys.rollout_id(0, pid, i),
                                 correct=correct, reward=float(correct), status="ok", extracted_answer="1",
                                 error=None, verifier="bench", verifier_version="0", latency_ms=1.0, scored_at=now))
    store.write("prompts", prompts)
    store.write("rollouts", rollouts, round=0)
    store.write("verdicts", verdicts, round=0)


def run_learn(root: Path, variant: str, epochs: int, micro: int, index: int) -> dict:
    spec, _, nproc = variant.partition("/")
    nproc = int(nproc or 1)
    mode, *settings = spec.split(",")
    env = dict(os.environ, REPLAY_MALLOC_TUNING=mode, REPLAY_TORCH_THREADS="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name in ("MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE"):
        env.pop(name, None)
    env.update(setting.split("=", 1) for setting in settings)
    if GLOBAL_BATCH % (micro * nproc):
        raise SystemExit(f"--micro {micro} x {nproc} processes does not divide the global batch {GLOBAL_BATCH}")
    cmd = [sys.executable, "-m", "replay", "learn", "--store", str(root), "--round", "0", "--objective", "lens",
           "--epochs", str(epochs), "--adapter-name", f"run{index}", "--device", "cpu",
           "--micro-batch-size", str(micro), "--grad-accum", str(GLOBAL_BATCH // (micro * nproc)),
           "--nproc", str(nproc)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-3000:]}")
    return {"mode": variant, "wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime,
            "minor_faults": usage.ru_minflt, "peak_rss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["0", "trim", "mmap"])
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size of every run")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    from replay.models import resolve_model

    vocab = int(__import__("json").loads((resolve_model(args.model).path / "config.json").read_text())["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="malloc-bench-") as tmp:
        root = Path(tmp) / "store"
        build_store(root, args.model, args.samples, args.completion_len, vocab)
        print(f"lens learn, {args.samples} samples x {args.epochs} epochs, completions <= {args.completion_len} "
              f"tokens, {args.model}, micro-batch {args.micro}, 1 thread, load {os.getloadavg()[0]:.1f}")
        print(f"{'mode':32} {'wall s':>8} {'user s':>8} {'sys s':>8} {'minor faults':>13} {'peak RSS GiB':>13}")
        for index, mode in enumerate(args.modes):
            r = run_learn(root, mode, args.epochs, args.micro, index)
            print(f"{r['mode']:32} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:8.1f} {r['minor_faults']:13,d} "
                  f"{r['peak_rss_gib']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
