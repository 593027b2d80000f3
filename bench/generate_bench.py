"""Sampling throughput: the `replay generate` stage vs its engine's generate call vs a bare
transformers `model.generate` loop, in one run.

    python bench/generate_bench.py                          # ~2 min on 2 idle CPU cores
    python bench/generate_bench.py --prompts 16 --samples 8 --max-new-tokens 128 --device cuda
    python bench/generate_bench.py --conversion             # also: GGUF conversion vs cached load

Every runner gets the same prompts (each repeated --samples times), batch size, sampling settings
and token budget. Tokens counted are real completion tokens (up to and including EOS), never
padding. `stage:<engine>` is stages.generate.run with that same engine object (prompts registered,
rows validated and written to a fresh store each time); its requests carry the stage's own seeds,
so it and the engine call sample identical tokens. For vLLM see bench/vllm_bench.py.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from replay.engines import ENGINES, SamplingSettings, make_engine  # noqa: E402
from replay.models import load_model, load_tokenizer, resolve_model  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_runner import stage_requests, stage_runner  # noqa: E402

BASELINE = "hf-generate"


def arithmetic_problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, op, b = rng.randint(10, 999), rng.choice("+-*"), rng.randint(10, 99)
        problems.append((f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b if op == "-" else a * b)))
    return problems


def engine_runner(engine, prompts, seeds, settings):
    engine.generate(prompts[:2], seeds[:2], SamplingSettings(max_new_tokens=4))  # warm-up

    def run() -> int:
        return sum(len(c.token_ids) for c in engine.generate(prompts, seeds, settings))

    return run


def hf_generate_runner(ref, args, prompts, seeds, settings):
    """The baseline: transformers' own sampling loop, same batches, no logprobs kept."""
    model = load_model(ref, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(ref)
    eos_ids = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    sample_args = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                       top_k=max(settings.top_k, 0),  # 0, not None: None means transformers' 50
                       output_scores=False, pad_token_id=tokenizer.pad_token_id)

    def generate(batch, max_new_tokens):
        inputs = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(args.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, **sample_args)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    generate(prompts[:2], 4)  # warm-up

    def run() -> int:
        torch.manual_seed(seeds[0])
        tokens = 0
        for i in range(0, len(prompts), args.batch_size):
            for row in generate(prompts[i:i + args.batch_size], settings.max_new_tokens):
                ends = [j for j, t in enumerate(row) if t in eos_ids]
                tokens += ends[0] + 1 if ends else len(row)
        return tokens

    return run


def time_conversion(spec: str) -> None:
    """Convert the GGUF into a throwaway REPLAY_HOME, then resolve + load again from the cache."""
    previous = os.environ.get("REPLAY_HOME")
    with tempfile.TemporaryDirectory(prefix="replay-home-") as home:
        os.environ["REPLAY_HOME"] = home
        try:
            start = time.perf_counter()
            ref = resolve_model(spec)
            convert = time.perf_counter() - start
            start = time.perf_counter()
            ref = resolve_model(spec)
            load_model(ref), load_tokenizer(ref)
            cached = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("REPLAY_HOME")
            else:
                os.environ["REPLAY_HOME"] = previous
    print(f"conversion of {spec}: {convert:.1f} s   cached resolve + load: {cached:.2f} s   "
          f"ratio {convert / cached:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--engines", default="transformers", help=f"comma list of {sorted(ENGINES)}")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; best is kept")
    parser.add_argument("--conversion", action="store_true", help="also time GGUF conversion")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.conversion:
        time_conversion(args.model)

    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    workdir = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    dataset, prompts, seeds = stage_requests(arithmetic_problems(args.prompts, seed=0), args.samples,
                                             tokenizer, workdir)
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens)
    print(f"model {ref.name} on {args.device} ({args.dtype}, {torch.get_num_threads()} threads): "
          f"{args.prompts} prompts x {args.samples} samples, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, T={args.temperature} top_p={args.top_p}")
    engines = [e for e in args.engines.split(",") if e]
    runners = {}
    for name in engines:  # the stage and the engine call share one engine: same weights, same tokens
        engine = make_engine(name, ref, dtype=args.dtype, device=args.device, batch_size=args.batch_size)
        runners[name] = engine_runner(engine, prompts, seeds, settings)
        runners[f"stage:{name}"] = stage_runner(engine, args.model, dataset, args.samples, settings, workdir)
    runners[BASELINE] = hf_generate_runner(ref, args, prompts, seeds, settings)
    # Interleaved rounds, so drifting machine load hits every runner alike; CPU seconds of this
    # process are shown too, as they are less sensitive to other jobs on a shared machine.
    best: dict[str, tuple[int, float, float]] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if name not in best or tokens / wall > best[name][0] / best[name][1]:
                best[name] = (tokens, wall, cpu)
    print(f"{'runner':<14}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'cpu s':>9}{'tokens/cpu s':>14}"
          f"   (best of {args.repeats})")
    for name, (tokens, wall, cpu) in best.items():
        print(f"{name:<14}{tokens:>8}{wall:>9.2f}{tokens / wall:>10.1f}{cpu:>9.2f}{tokens / cpu:>14.1f}")
    shutil.rmtree(workdir, ignore_errors=True)
    base_tokens, base_wall, base_cpu = best[BASELINE]
    for name in engines:
        stage = best[f"stage:{name}"]
        print(f"ratio stage:{name} / {name}: {(stage[0] / stage[1]) / (best[name][0] / best[name][1]):.2f}x "
              f"tokens/s (the stage: prompts registered, rows validated and written)")
    for name in [*engines, *(f"stage:{e}" for e in engines)]:
        tokens, wall, cpu = best[name]
        print(f"ratio {name} / {BASELINE}: {(tokens / wall) / (base_tokens / base_wall):.2f}x tokens/s, "
              f"{(tokens / cpu) / (base_tokens / base_cpu):.2f}x tokens per CPU second")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


if __name__ == "__main__":
    main()
