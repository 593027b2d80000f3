"""Throughput of the `replay generate` stage and of VLLMEngine.generate (request building +
conversion to Completion) against a bare vllm LLM.generate call with the same prompts and
SamplingParams, on one engine in one run (the stage writes its rows to a fresh store each time).

    python bench/vllm_bench.py                      # SmolLM2-135M, 4 prompts x 8 samples x 48 tokens
    python bench/vllm_bench.py --lora path/to/adapter
    python bench/vllm_bench.py --compile            # torch.compile on CPU too (slower start-up)

Prints start-up time, tokens/s of both (best of --reps, interleaved) and ours / bare (goal >= 0.9),
and the time of our own work per call (building requests, converting outputs) measured apart,
which machine load does not blur.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_runner import stage_requests, stage_runner  # noqa: E402

PROBLEMS = [("What is 17 + 25?", "42"), ("Compute 9 * 8 - 6.", "66"), ("Is 91 a prime number?", "no"),
            ("What is 2 to the power 7?", "128"), ("What is 144 / 12?", "12"), ("Find x if 3x + 4 = 19.", "5"),
            ("What is 15% of 80?", "12"), ("Sum the digits of 2026.", "10")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lora", default=None, help="peft adapter directory (sampled as a LoRA request)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--compile", dest="eager", action="store_false", default=None,
                        help="use torch.compile even on CPU (default: the engine's choice)")
    args = parser.parse_args()

    from replay.engines.base import SamplingSettings
    from replay.engines.vllm_engine import VLLMEngine, completion_from_output
    from replay.models import load_tokenizer, resolve_model

    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    problems = [(f"{p} (variant {i})" if i >= len(PROBLEMS) else p, a)
                for i, (p, a) in ((i, PROBLEMS[i % len(PROBLEMS)]) for i in range(args.prompts))]
    workdir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    dataset, prompt_ids, seeds = stage_requests(problems, args.samples, tokenizer, workdir)
    settings = SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    started = time.perf_counter()
    engine = VLLMEngine.load(ref, lora=args.lora, enforce_eager=args.eager)
    startup = time.perf_counter() - started
    bare_prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
    bare_params = [engine.sampling_params(settings, seed) for seed in seeds]  # built outside the clock
    lora_request = engine.lora_request
    bare_outputs = []

    def ours() -> tuple[int, list[list[int]]]:
        done = engine.generate(prompt_ids, seeds, settings)
        return sum(len(c.token_ids) for c in done), [c.token_ids for c in done]

    def bare() -> tuple[int, list[list[int]]]:
        outputs = engine.llm.generate(bare_prompts, bare_params, lora_request=lora_request, use_tqdm=False)
        bare_outputs[:] = outputs
        return (sum(len(o.outputs[0].token_ids) for o in outputs),
                [list(o.outputs[0].token_ids) for o in outputs])

    stage = stage_runner(engine, args.model, dataset, args.samples, settings, workdir)
    bare()  # warm-up at full batch size (first passes at a new batch shape are slower)
    best = {"ours": 0.0, "bare": 0.0, "stage": 0.0}
    tokens = {}
    for rep in range(args.reps):
        order = (("bare", bare), ("ours", ours), ("stage", lambda: (stage(), None)))
        for label, run in order if rep % 2 == 0 else order[::-1]:  # alternate: drift hits both
            t0 = time.perf_counter()
            count, tokens[label] = run()
            best[label] = max(best[label], count / (time.perf_counter() - t0))
    # Our own work per call, timed apart from vLLM so machine load cannot blur it.
    t0 = time.perf_counter()
    [engine.sampling_params(settings, seed) for seed in seeds]
    [completion_from_output(o.outputs[0].token_ids, o.outputs[0].logprobs, o.outputs[0].text,
                            o.outputs[0].finish_reason, settings.greedy) for o in bare_outputs]
    own_ms = (time.perf_counter() - t0) * 1e3
    call_ms = sum(len(t) for t in tokens["bare"]) / best["bare"] * 1e3
    engine.close()
    shutil.rmtree(workdir, ignore_errors=True)

    print(f"engine: {engine.version}, logprobs_mode={engine.logprobs_mode}, lora={args.lora}, "
          f"eager={engine.enforce_eager}")
    print(f"requests: {len(seeds)} ({args.prompts} prompts x {args.samples} seeds), "
          f"max_new_tokens={args.max_new_tokens}, temperature={args.temperature}")
    print(f"start-up: {startup:.1f} s")
    print(f"bare LLM.generate:    {best['bare']:8.1f} tok/s")
    print(f"VLLMEngine.generate:  {best['ours']:8.1f} tok/s")
    print(f"replay generate stage:{best['stage']:8.1f} tok/s (rows validated and written to a store)")
    print(f"ratio ours / bare:    {best['ours'] / best['bare']:8.3f}  (goal >= 0.9)")
    print(f"ratio stage / bare:   {best['stage'] / best['bare']:8.3f}  (goal >= 0.9)")
    print(f"request building + conversion: {own_ms:.1f} ms per call "
          f"({100 * own_ms / call_ms:.2f}% of a {call_ms / 1e3:.1f} s bare call)")
    print(f"same tokens: {tokens['ours'] == tokens['bare']}")


if __name__ == "__main__":
    main()
