"""The whole `replay generate` stage as a benchmark runner, beside the bare engine calls.

bench/generate_bench.py and bench/vllm_bench.py time three things on the same requests: the
stage (prompts registered, tokens sampled, rows validated and written to a fresh store), the
engine's generate call, and the bare library call. Requests use the seeds the stage derives
(keys.sample_seed), so all of them sample the very same tokens.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

from replay import keys
from replay.datasets import load_prompts
from replay.prompting import DEFAULT_INSTRUCTION, chat_prompt_ids

SEED = 0


def stage_requests(problems: list[tuple[str, str]], samples: int, tokenizer, workdir: Path):
    """Writes the problems as a JSONL dataset; returns (dataset path, prompt ids, seeds) of the
    requests the stage will make for round 0, in its order."""
    dataset = workdir / "bench_prompts.jsonl"
    dataset.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in problems))
    prompts = load_prompts(str(dataset), None, "train", SEED, None, None, (1, 2, 3, 4, 5))
    prompt_ids, seeds = [], []
    for prompt in prompts:
        ids = chat_prompt_ids(tokenizer, prompt.problem, DEFAULT_INSTRUCTION)
        for i in range(samples):
            prompt_ids.append(ids)
            seeds.append(keys.sample_seed(SEED, 0, prompt.prompt_id, i))
    return dataset, prompt_ids, seeds


def stage_runner(engine, model: str, dataset: Path, samples: int, settings, workdir: Path):
    """A runner (-> completion tokens written) calling stages.generate.run with this engine,
    into a new store each time, all prompts in one engine call as the other runners make."""
    from stages.generate import GenerateConfig, run

    counter = itertools.count()

    def run_stage() -> int:
        store = tempfile.mkdtemp(prefix=f"store-{next(counter)}-", dir=workdir)
        cfg = GenerateConfig(dataset=str(dataset), num_prompts=None, model=model, engine=engine.name,
                             num_samples=samples, temperature=settings.temperature, top_p=settings.top_p,
                             top_k=settings.top_k, max_new_tokens=settings.max_new_tokens, seed=SEED,
                             batch_size=10**6)
        return run(store, cfg, engine=engine)["counts"]["tokens_written"]

    return run_stage
