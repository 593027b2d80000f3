"""One LoRA training step (GRPO loss, AdamW) with SmolLM2-135M, float32, CPU: replay's learner vs a
naive full-logits step vs TRL's GRPOTrainer, on the same fixed batch, in one run.

    python bench/learn_bench.py [--variants ours ours:16 naive trl] [--batch 16] [--prompt-len 64]
        [--completion-len 192] [--micro 4] [--reps 2] [--threads 0] [--uniform-groups 0]
        [--gradient-checkpointing] [--chunk N] [--profile ours trl]

A variant is `ours` | `naive` | `trl`, optionally `:M` for micro-batches of M (default --micro; the
gradient accumulation is batch / M, so every variant makes one optimizer step over the whole batch).
  ours   replay.learn.policy.token_logprobs (hidden states at completion positions only, chunked vocab
         projection) + replay.core.loss.policy_loss + backward + clip + AdamW, as replay/learn/loop.py,
         in a process with replay.runtime.return_freed_memory applied as stages/learn.py does
         (REPLAY_MALLOC_TUNING: glibc's defaults unless set)
  replay the same as ours, with 2 rows of every group of 8 trained as replayed rows (learn --rescue
         replay): a per-token behaviour factor (tis, truncated at 2) and the shaping mask reach
         policy_loss, as replay/learn/loop.py passes them; its cost per token should equal ours'
  naive  the same, but logprobs from model(input_ids).logits [B, L, V] -> log_softmax -> gather
  trl    trl.GRPOTrainer.train() (same LoRA via peft_config, loss_type="grpo", beta=0, same micro-batch
         and accumulation); its generation is replaced by a function returning the fixed batch, so a
         step is TRL's own training_step x accumulation + clip + optimizer step (timed by a callback)
Data: random token ids; completion lengths `--lengths varied` (default: 40 % at the cap, the rest
anywhere from 8 tokens, as sampled rollouts end; `ours` sorts a step's rows by length before cutting
micro-batches, as replay/learn/loop.py does, and so does naive; TRL takes them as they come) or `fixed`
(all at the cap); rewards half 1 / half 0 in each group of 8 (so no sample has zero
advantage), old logprobs = the model's own plus N(0, 0.1^2) noise, computed once here. With
--uniform-groups K the first K groups get all-equal rewards: ours and naive then skip their rows
(zero advantage, as replay/learn/loop.py does), TRL trains on them as GRPOTrainer does.

Each variant runs in its own process, one after the other: 1 warm-up step, then --reps timed
steps; the median is reported, with tokens/s (batch x length per step), the RSS after setup (model,
optimizer, data; weights paged in), the peak RSS during the steps (VmHWM, reset after setup) and
their difference, the step's own memory. The warm-up step's loss must agree across variants.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GROUP = 8
LR, CLIP_EPS, MAX_GRAD_NORM = 1e-6, 0.2, 1.0


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def build_data(args, path: Path) -> None:
    """The fixed batch every variant trains on, saved to `path`."""
    from replay.core.advantages import compute_advantages
    from replay.learn.policy import make_batch, token_logprobs
    from replay.models import load_model, resolve_model

    model = load_model(resolve_model(args.model))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    completions = torch.randint(0, model.config.vocab_size, (args.batch, args.completion_len), generator=g)
    lengths = completion_lengths(args, g)
    rewards = torch.cat([torch.full((GROUP,), float(k % 2)) if k < args.uniform_groups
                         else torch.randperm(GROUP, generator=g).lt(GROUP // 2).float()
                         for k in range(args.batch // GROUP)])
    adv = compute_advantages("grpo", rewards, torch.arange(args.batch) // GROUP)[0].advantage
    old = torch.zeros((args.batch, args.completion_len))
    with torch.no_grad():
        for i in range(args.batch):
            n = int(lengths[i])
            batch = make_batch([prompts[i].tolist()], [completions[i, :n].tolist()])
            old[i, :n] = token_logprobs(model, batch)[0]
    old = old + 0.1 * torch.randn(old.shape, generator=g)
    torch.save({"prompts": prompts, "completions": completions, "lengths": lengths, "advantages": adv,
                "old": old}, path)


def completion_lengths(args, g: torch.Generator) -> torch.Tensor:
    """fixed: every completion --completion-len tokens. varied: as sampled rollouts are, 40 % cut
    at the cap, the rest ending anywhere from 8 tokens up (what SmolLM2's arithmetic rollouts show)."""
    cap = args.completion_len
    if args.lengths == "fixed":
        return torch.full((args.batch,), cap)
    ended = torch.randint(8, cap, (args.batch,), generator=g)
    return torch.where(torch.rand(args.batch, generator=g) < 0.4, torch.tensor(cap), ended)


def settle(model) -> int:
    """RSS after setup (KiB), with the peak count restarted from it."""
    # safetensors weights are mmapped and paged in on first use: touch them now, or the first
    # step's "own" memory would include the whole model
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    gc.collect()
    rss = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return rss


def top_ops(prof) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)


def naive_token_logprobs(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L, V]
    logp = torch.log_softmax(logits / batch.temperature[:, None, None], dim=-1)
    per_position = logp[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)  # [B, L-1]
    return per_position.gather(1, batch.source_positions) * batch.target_mask


def replay_child(args, data, micro: int, logprob_fn, replayed: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from replay.core.loss import policy_loss
    from replay.learn.loop import plan_steps
    from replay.learn.policy import LoraSettings, load_policy, make_batch
    from replay.models import resolve_model
    from replay.runtime import trim_freed_memory

    model = load_policy(resolve_model(args.model), None, LoraSettings(), args.gradient_checkpointing,
                        device="cpu", dtype="float32")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    accum = args.batch // micro
    # as replay/learn/loop.py: rows with zero advantage give no gradient and are not computed, and
    # the step's rows are sorted by length before they are cut into micro-batches
    active = torch.nonzero(data["advantages"] != 0).squeeze(1).tolist()
    lengths = data["lengths"].tolist()
    [(_, plan)] = plan_steps(active, lengths, micro, accum, seed=0, epochs=1)
    micro_batches = []
    for rows in plan:
        batch = make_batch(data["prompts"][rows].tolist(),
                           [data["completions"][r, :lengths[r]].tolist() for r in rows])
        width = batch.targets.shape[1]
        extra = {}
        if replayed:  # rows 6 and 7 of each group of 8 are replayed: behaviour factors in [0.5, 2]
            factors = torch.ones(len(rows), width)
            late = torch.tensor([r % GROUP >= GROUP - 2 for r in rows])
            factors[late] = torch.rand(int(late.sum()), width, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
            extra = {"token_weights": factors, "shaped": torch.zeros(len(rows), dtype=torch.bool)}
        micro_batches.append((batch, data["old"][rows, :width], data["advantages"][rows], len(rows) / len(active),
                              extra))

    def step() -> float:
        total = 0.0
        for batch, old, adv, share, extra in micro_batches:
            loss, _ = policy_loss(logprob_fn(model, batch), old, adv, batch.target_mask, clip_eps=CLIP_EPS,
                                  dual_clip=None, aggregation="seq-mean-token-mean", **extra)
            (loss * share).backward()
            total += float(loss.detach()) * share
            del loss
            trim_freed_memory()  # as replay/learn/loop.py does (a no-op unless REPLAY_MALLOC_TUNING=trim)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    out = {"rss_kib": settle(model), "seconds": [], "cpu": [], "losses": []}
    for _ in range(1 + args.reps):
        start, cpu = time.perf_counter(), time.process_time()
        out["losses"].append(step())
        out["seconds"].append(time.perf_counter() - start)
        out["cpu"].append(time.process_time() - cpu)
    if args.child in args.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out["profile"] = top_ops(prof)
    return out


def trl_child(args, data, micro: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from replay.learn.policy import LoraSettings
    from replay.models import resolve_model

    path, lora, profiling = resolve_model(args.model).path, LoraSettings(), args.child in args.profile
    n_steps = 1 + args.reps + int(profiling)
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="learn_bench_trl_"), use_cpu=True, bf16=False,
                        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro,
                        num_generations=GROUP, max_completion_length=args.completion_len, loss_type="grpo",
                        beta=0.0, epsilon=CLIP_EPS, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
                        gradient_checkpointing=args.gradient_checkpointing, max_steps=n_steps,
                        report_to=[], save_strategy="no", logging_steps=n_steps + 1, disable_tqdm=True,
                        temperature=1.0, seed=0)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                          processing_class=AutoTokenizer.from_pretrained(path), peft_config=peft_config,
                          train_dataset=Dataset.from_dict({"prompt": [f"p{i}" for i in range(args.batch // GROUP)]}))
    completion_mask = (torch.arange(args.completion_len) < data["lengths"][:, None]).long()
    fixed = {"prompt_ids": data["prompts"], "prompt_mask": torch.ones_like(data["prompts"]),
             "completion_ids": data["completions"], "completion_mask": completion_mask,
             "advantages": data["advantages"], "old_per_token_logps": data["old"],
             "num_items_in_batch": completion_mask.sum()}
    # generation replaced by the fixed batch: TRL shuffles and splits it into micro-batches itself
    trainer._generate_and_score_completions = lambda _inputs: dict(fixed)
    compute_loss, losses = trainer._compute_loss, []

    def recording_loss(model, inputs):
        loss = compute_loss(model, inputs)  # already divided by the accumulation steps
        losses.append(float(loss.detach()))
        return loss

    trainer._compute_loss = recording_loss
    out = {"rss_kib": settle(trainer.model), "seconds": [], "cpu": [], "losses": []}

    class Timer(TrainerCallback):  # brackets training_step x accumulation + clip + optimizer step
        def on_step_begin(self, *_args, **_kw):
            self.profiler = None
            if profiling and len(out["seconds"]) == 1 + args.reps:
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.start()
            losses.clear()
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_args, **_kw):
            if self.profiler is None:
                out["seconds"].append(time.perf_counter() - self.start)
                out["cpu"].append(time.process_time() - self.cpu)
                out["losses"].append(sum(losses))
            else:
                self.profiler.stop()
                out["profile"] = top_ops(self.profiler)

    trainer.add_callback(Timer())
    trainer.train()
    return out


def child_main(args) -> None:
    report_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to the log, the result line to the parent
    torch.set_num_threads(args.threads)
    kind, _, size = args.child.partition(":")
    micro = int(size or args.micro)
    if kind != "trl":
        from replay.runtime import return_freed_memory

        # as stages/learn.py does, before torch's first allocation (a no-op under --mmap-threshold)
        return_freed_memory()
    peak_before = matmul_peak()  # and again after the steps: the best of both is the machine's peak
    data = torch.load(args.data)
    if kind == "trl":
        out = trl_child(args, data, micro)
    else:
        from replay.learn.policy import token_logprobs
        ours = functools.partial(token_logprobs, chunk_size=args.chunk or None)
        out = replay_child(args, data, micro, naive_token_logprobs if kind == "naive" else ours,
                           replayed=kind == "replay")
    out["peak_kib"] = status_kib("VmHWM")
    out["matmul_flops"] = max(peak_before, matmul_peak())
    report_to.write(json.dumps(out) + "\n")
    report_to.flush()


def run_variant(args, variant: str, data: Path, log: Path) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--data", str(data), "--threads", str(args.threads),
            "--profile", *args.profile]
    for flag in ("model", "batch", "prompt_len", "completion_len", "micro", "reps", "uniform_groups", "lengths",
                 "chunk"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--gradient-checkpointing"] * args.gradient_checkpointing
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:  # glibc: allocations above it are mmapped and returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    load = os.getloadavg()[0]
    with log.open("w") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        why = " (SIGKILL: out of memory?)" if proc.returncode == -9 else ""
        raise SystemExit(f"{variant} exited with {proc.returncode}{why}; end of {log}:\n{log.read_text()[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["variant"], out["load"] = variant, (load + os.getloadavg()[0]) / 2
    out["median"], out["cpu_median"] = statistics.median(out["seconds"][1:]), statistics.median(out["cpu"][1:])
    out["delta_kib"] = out["peak_kib"] - out["rss_kib"]
    print(f"{variant} done: steps {' '.join(f'{s:.1f}' for s in out['seconds'])} s wall, "
          f"{' '.join(f'{s:.1f}' for s in out['cpu'])} s CPU (first = warm-up), "
          f"loadavg ~{out['load']:.1f}", flush=True)
    return out


def report(args, results: list[dict]) -> None:
    """Markdown table; CPU time is the steadier measure on a shared machine (equal to wall when idle
    and single-threaded), wall time is what a user waits."""
    base = next((r for r in results if r["variant"].startswith("trl")), None)
    tokens = real_tokens(args)
    flops = useful_flops(args)
    print(f"\n| variant | micro x accum | wall s/step | CPU s/step | tokens/s (wall) | tokens/CPU-s | RSS after setup "
          f"| peak RSS | step delta | speed vs TRL (wall / CPU) | peak vs TRL | delta vs TRL | warm-up loss "
          f"| MFU (own / run's best peak) |\n|{'---|' * 14}")
    best_peak = max(r["matmul_flops"] for r in results) / args.threads
    for r in results:
        micro = int(r["variant"].partition(":")[2] or args.micro)
        ratios = ["-"] * 3 if base is None else [
            f"{base['median'] / r['median']:.2f}x / {base['cpu_median'] / r['cpu_median']:.2f}x",
            f"{r['peak_kib'] / base['peak_kib']:.2f}x", f"{r['delta_kib'] / max(base['delta_kib'], 1):.2f}x"]
        mib = [f"{r[k] / 1024:.0f} MiB" for k in ("rss_kib", "peak_kib", "delta_kib")]
        print(f"| {r['variant']} | {micro} x {args.batch // micro} | {r['median']:.1f} | {r['cpu_median']:.1f} "
              f"| {tokens / r['median']:.0f} | {tokens / r['cpu_median']:.0f} "
              f"| {' | '.join(mib)} | {' | '.join(ratios)} | {r['losses'][0]:+.6f} "
              f"| {flops / r['cpu_median'] / (r['matmul_flops'] / args.threads):.0%} "
              f"/ {flops / r['cpu_median'] / best_peak:.0%} |")
    peaks = ", ".join(f"{r['matmul_flops'] / 1e9:.0f}" for r in results)
    print(f"\nMFU: the step's useful FLOPs ({flops / 1e12:.2f} TFLOP: forward, activation gradients, LoRA; see "
          f"useful_flops) per CPU second over the matmul peak per thread measured in each variant's process "
          f"({peaks} GFLOP/s on {args.threads} thread(s)), and over the best of them (the machine's peak: "
          f"the stricter figure)")
    for r in results:
        if "profile" in r:
            print(f"\n--- {r['variant']}: top ops by self CPU time, one step\n{r['profile']}")


def matmul_peak(n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of this process's best float32 [n, n] @ [n, n] (same threads as the steps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def useful_flops(args) -> float:
    """The step's useful FLOPs, counted per real token of the rows with gradient (zero-advantage
    rows and padding give no gradient and are not counted; neither is any recomputation):
      forward       2·P per token through the body's linear layers (P = their weights) + causal
                    attention 2·L·d·T² per row (QKᵀ and AV over T²/2 pairs) + the LM head 2·d·V per
                    completion token
      activation gradients  the same again (frozen weights: only input gradients), plus one more
                    2·L·d·T² for attention's backward (4 matmuls to the forward's 2)
      LoRA          forward, input and weight gradients: 3 · 2·R per token (R = LoRA weights)."""
    config = json.loads((resolve_model_path(args.model) / "config.json").read_text())
    d, m, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * config.get("head_dim", d // heads)
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * m)
    r = 16  # LoraSettings() default, on all 7 projections: r · (in + out) each
    lora = layers * r * ((d + d) * 2 + (d + kv) * 2 + (d + m) * 2 + (m + d))
    data = torch.load(args.data)
    active = (data["advantages"] != 0).nonzero().squeeze(1).tolist()
    total = 0.0
    for i in active:
        completion = int(data["lengths"][i])
        t = args.prompt_len + completion
        attention = 2 * layers * d * t * t
        total += 2 * (2 * body * t + attention + 2 * d * vocab * completion) + attention + 6 * lora * t
    return total


def resolve_model_path(spec: str) -> Path:
    from replay.models import resolve_model

    return resolve_model(spec).path


def real_tokens(args) -> int:
    """Prompt + completion tokens of the batch, padding not counted (the same for every variant)."""
    lengths = torch.load(args.data)["lengths"]
    return int(args.batch * args.prompt_len + lengths.sum())


def parent_main(args) -> None:
    if args.threads == 0:
        args.threads = 2 if os.getloadavg()[0] < 0.5 else 1
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, loadavg {os.getloadavg()}, "
          f"torch threads {args.threads}")
    print(f"batch {args.batch} x ({args.prompt_len} prompt + {args.completion_len} completion) tokens, {args.model}, "
          f"float32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.uniform_groups} of {args.batch // GROUP} groups with equal rewards, "
          f"MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold or 'unset'}; "
          f"median of {args.reps} steps after 1 warm-up", flush=True)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="learn_bench_"))
    build_data(args, work / "data.pt")
    args.data = str(work / "data.pt")
    print(f"completion lengths {args.lengths}: {real_tokens(args)} real tokens per step", flush=True)
    results = [run_variant(args, v, work / "data.pt", work / f"{v.replace(':', '_')}.log") for v in args.variants]
    report(args, results)
    print(f"\nloadavg at end {os.getloadavg()}; logs in {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["ours", "ours:16", "naive", "trl"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (multiple of 8)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=192)
    parser.add_argument("--micro", type=int, default=4, help="default micro-batch size")
    parser.add_argument("--reps", type=int, default=2, help="timed steps per variant after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: 2 if the machine is idle, else 1")
    parser.add_argument("--uniform-groups", type=int, default=0, help="groups with all-equal rewards")
    parser.add_argument("--lengths", choices=["fixed", "varied"], default="varied",
                        help="completion lengths: all --completion-len, or varied as real rollouts are")
    parser.add_argument("--chunk", type=int, default=0,
                        help="ours: completion positions per vocabulary-projection chunk (0: replay's default, "
                             "as many as fit replay.core.logprobs.BLOCK_BYTES)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ for the variants (bytes): peak RSS without heap fragmentation")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every variant (TRL's default)")
    parser.add_argument("--profile", nargs="*", default=[], help="variants to profile on one extra step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(v.partition(":")[2] or args.micro) for v in args.variants]
    if not args.child and (args.batch % GROUP or args.reps < 1 or any(args.batch % m for m in sizes)):
        parser.error(f"--batch must be a multiple of {GROUP} and of every micro-batch size; --reps >= 1")
    child_main(args) if args.child else parent_main(args)


if __name__ == "__main__":
    main()
