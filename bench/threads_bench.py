"""Generate tokens/s under thread settings, on an idle machine and beside a competing CPU load.

    python bench/threads_bench.py                     # ~10 min on 2 cores
    python bench/threads_bench.py --configs "2:active,1:passive" --load 1 --repeats 3

Each measurement is a fresh process (OpenMP reads its settings at start) that samples the same
requests with the transformers engine. A config is THREADS:WAIT — torch threads (0: torch's
default, one per core) and the OpenMP wait policy (unset: libgomp's default, spin a while then
sleep; active: spin; passive: sleep at once). The load is N processes spinning on the CPU (`--load N`), started
before and stopped after each measurement. Configs and loads are interleaved in every repeat, so
drifting background load hits them alike; the best of the repeats is kept, and tok/s of each
config is shown beside the first config's (the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SPIN = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True: pass\n"


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from replay.engines import SamplingSettings, make_engine
    from replay.models import load_tokenizer, resolve_model
    from replay.prompting import chat_prompt_ids

    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    options = {"batch_size": args.prompts * args.samples} if args.engine == "transformers" else {}
    engine = make_engine(args.engine, ref, **options)
    problems = [f"What is {17 * i + 3} + {29 * i + 11}?" for i in range(args.prompts)]
    prompts = [chat_prompt_ids(tokenizer, p) for p in problems for _ in range(args.samples)]
    seeds = list(range(len(prompts)))
    settings = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:2], seeds[:2], SamplingSettings(max_new_tokens=4))  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(c.token_ids) for c in engine.generate(prompts, seeds, settings))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"tokens": tokens, "seconds": wall, "cpu": cpu, "threads": torch.get_num_threads()}))
    if hasattr(engine, "close"):
        engine.close()


def measure(args, threads: int, wait: str, load: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=wait.upper(), HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)  # the config says how many
    if wait == "unset":  # libgomp's own default: spin a while (GOMP_SPINCOUNT 300000), then sleep
        env.pop("OMP_WAIT_POLICY")
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)
        out = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(threads), "--model", args.model,
                              "--prompts", str(args.prompts), "--samples", str(args.samples),
                              "--max-new-tokens", str(args.max_new_tokens), "--engine", args.engine],
                             capture_output=True, text=True, env=env, timeout=1800)
    finally:
        for p in spinners:
            p.terminate()
            p.wait()
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(next(line for line in out.stdout.splitlines()[::-1] if line.startswith('{"tokens"')))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default="0:unset,0:passive,1:unset,1:passive",
                        help="comma list of THREADS:WAIT (threads 0: torch's default)")
    parser.add_argument("--load", type=int, default=1, help="spinning processes in the loaded runs")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", default="transformers", help="transformers | vllm (its threads: "
                        "VLLM_CPU_OMP_THREADS_BIND; the threads of a config then only set torch's)")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = [(int(t), w) for t, w in (c.split(":") for c in args.configs.split(","))]
    loads = sorted({0, args.load})
    best: dict[tuple, dict] = {}
    for _ in range(args.repeats):
        for load in loads:
            for threads, wait in configs:
                r = measure(args, threads, wait, load)
                r["tok_s"] = r["tokens"] / r["seconds"]
                key = (threads, wait, load)
                if key not in best or r["tok_s"] > best[key]["tok_s"]:
                    best[key] = r
                print(f"  threads {threads or 'default'} ({r['threads']}), OMP_WAIT_POLICY={wait}, load {load}: "
                      f"{r['tok_s']:.1f} tok/s, cpu {r['cpu']:.1f} s", flush=True)
    print(f"\n{os.cpu_count()} CPUs; {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, "
          f"{args.engine} engine; best of {args.repeats}")
    print("| threads | OMP_WAIT_POLICY | " + " | ".join(f"tok/s, load {n}" for n in loads)
          + " | " + " | ".join(f"ratio, load {n}" for n in loads) + " |")
    print("|---|---|" + "---|" * (2 * len(loads)))
    first = configs[0]
    for threads, wait in configs:
        cells = [f"{best[(threads, wait, n)]['tok_s']:.1f}" for n in loads]
        ratios = [f"{best[(threads, wait, n)]['tok_s'] / best[(*first, n)]['tok_s']:.2f}" for n in loads]
        print(f"| {threads or 'default (' + str(best[(threads, wait, 0)]['threads']) + ')'} | {wait} | "
              + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
