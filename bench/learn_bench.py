"""One LoRA training step (GRPO loss, AdamW) with SmolLM2-135M, float32, CPU: replay's learner vs a
naive full-logits step vs TRL's GRPOTrainer, on the same fixed batch, in one run.

    python bench/learn_bench.py [--variants ours ours:16 naive trl] [--batch 16] [--prompt-len 64]
        [--completion-len 192] [--micro 4] [--reps 3] [--threads 0] [--gradient-checkpointing] [--profile]

A variant is `ours` | `naive` | `trl`, optionally `:M` for micro-batches of M (default --micro; the
gradient accumulation is batch / M, so every variant makes one optimizer step over the whole batch).
  ours   replay.learner.token_logprobs (hidden states at completion positions only, chunked vocab
         projection) + replay.core.loss.policy_loss + backward + clip + AdamW, as replay/train_loop.py
  naive  the same, but logprobs from model(input_ids).logits [B, L, V] -> log_softmax -> gather
  trl    trl.GRPOTrainer.train() (same LoRA via peft_config, loss_type="grpo", beta=0, same micro-batch
         and accumulation); its generation is replaced by a function returning the fixed batch, so a
         step is TRL's own training_step x accumulation + clip + optimizer step (timed by a callback)
Data: random token ids, rewards half 1 / half 0 in each group of 8 (so no sample has zero
advantage), old logprobs = the model's own plus N(0, 0.1^2) noise, computed once here.

Each variant runs in its own process (separate peak RSS). All of them load first, then the parent
steps them round-robin (1 warm-up step, then --reps timed steps each) so that load from other
processes on the machine hits them alike. Reported: median step time, tokens/s (batch x length per
step), RSS after setup, peak RSS during the steps (VmHWM, reset after setup) and their difference.
"""

from __future__ import annotations

import argparse
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


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- the fixed batch (parent)

def build_data(args, path: Path) -> None:
    from replay.core.advantages import compute_advantages
    from replay.learner import make_batch, token_logprobs
    from replay.models import load_model, resolve_model

    model = load_model(resolve_model(args.model))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    completions = torch.randint(0, vocab, (args.batch, args.completion_len), generator=g)
    rewards = torch.cat([torch.randperm(GROUP, generator=g).lt(GROUP // 2).float()
                         for _ in range(args.batch // GROUP)])
    adv = compute_advantages("grpo", rewards, torch.arange(args.batch) // GROUP)[0].advantage
    with torch.no_grad():
        old = torch.cat([token_logprobs(model, make_batch(prompts[i:i + 4].tolist(), completions[i:i + 4].tolist(),
                                                          [1.0] * len(prompts[i:i + 4])))
                         for i in range(0, args.batch, 4)])
    old = old + 0.1 * torch.randn(old.shape, generator=g)
    torch.save({"prompts": prompts, "completions": completions, "advantages": adv, "old": old}, path)


# ---------------------------------------------------------------- child: protocol with the parent

class Channel:
    """Protocol lines on the real stdout; everything libraries print goes to stderr (the log)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **msg) -> None:
        self.out.write(json.dumps(msg) + "\n")

    def command(self) -> str:
        return sys.stdin.readline().strip()


def profiled(fn):
    """Run fn under the torch profiler; returns the top ops by self CPU time as text."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def run_loop(chan: Channel, step) -> None:
    """Serve 'step' / 'profile' commands until 'end'."""
    while (cmd := chan.command()) in ("step", "profile"):
        start = time.perf_counter()
        if cmd == "profile":
            chan.send(profile=profiled(step))
            continue
        loss = step()
        chan.send(seconds=time.perf_counter() - start, loss=loss)


def naive_token_logprobs(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L, V]
    logp = torch.log_softmax(logits / batch.temperature[:, None, None], dim=-1)
    per_position = logp[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)  # [B, L-1]
    return per_position.gather(1, batch.source_positions) * batch.target_mask


def replay_child(chan, args, data, micro: int, logprob_fn) -> None:
    from replay.core.loss import policy_loss
    from replay.learner import LoraSettings, load_policy, make_batch
    from replay.models import resolve_model

    model = load_policy(resolve_model(args.model).path, None, LoraSettings(), args.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    accum = args.batch // micro
    micro_batches = []
    for i in range(0, args.batch, micro):
        rows = slice(i, i + micro)
        batch = make_batch(data["prompts"][rows].tolist(), data["completions"][rows].tolist(), [1.0] * micro)
        micro_batches.append((batch, data["old"][rows], data["advantages"][rows]))

    def step() -> float:
        total = 0.0
        for batch, old, adv in micro_batches:
            loss, _ = policy_loss(logprob_fn(model, batch), old, adv, batch.target_mask, clip_eps=CLIP_EPS,
                                  dual_clip=None, aggregation="seq-mean-token-mean")
            (loss / accum).backward()
            total += float(loss.detach()) / accum
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    ready(chan)
    run_loop(chan, step)


def trl_child(chan, args, data, micro: int, n_steps: int) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from replay.learner import LoraSettings
    from replay.models import resolve_model

    path, lora = resolve_model(args.model).path, LoraSettings()
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="learn_bench_trl_"), use_cpu=True, bf16=False,
                        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro,
                        num_generations=GROUP, max_completion_length=args.completion_len, loss_type="grpo",
                        beta=0.0, epsilon=CLIP_EPS, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
                        gradient_checkpointing=args.gradient_checkpointing, max_steps=n_steps,
                        report_to=[], save_strategy="no", logging_steps=n_steps + 1, disable_tqdm=True,
                        temperature=1.0, seed=0)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    prompts = [f"prompt {i}" for i in range(args.batch // GROUP)]
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                          processing_class=AutoTokenizer.from_pretrained(path), peft_config=peft_config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    fixed = {"prompt_ids": data["prompts"], "prompt_mask": torch.ones_like(data["prompts"]),
             "completion_ids": data["completions"], "completion_mask": torch.ones_like(data["completions"]),
             "advantages": data["advantages"], "old_per_token_logps": data["old"],
             "num_items_in_batch": torch.tensor(data["completions"].numel())}
    # generation replaced by the fixed batch: TRL splits it into micro-batches and trains on them
    trainer._generate_and_score_completions = lambda _inputs: dict(fixed)
    losses: list[float] = []
    compute_loss = trainer._compute_loss

    def recording_loss(model, inputs):
        loss = compute_loss(model, inputs)  # already divided by the accumulation steps
        losses.append(float(loss.detach()))
        return loss

    trainer._compute_loss = recording_loss

    class Driver(TrainerCallback):
        def on_step_begin(self, *_args, **_kw):
            self.cmd = chan.command()
            if self.cmd == "profile":
                from torch.profiler import ProfilerActivity, profile
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.start()
            losses.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *_args, **_kw):
            seconds = time.perf_counter() - self.start
            if self.cmd == "profile":
                self.prof.stop()
                chan.send(profile=self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            else:
                chan.send(seconds=seconds, loss=sum(losses))

    trainer.add_callback(Driver())
    ready(chan)
    trainer.train()
    if chan.command() != "end":
        raise RuntimeError("expected 'end' after the last step")


def ready(chan: Channel) -> None:
    import gc
    gc.collect()
    rss = proc_status_kib("VmRSS")
    reset_peak_rss()
    chan.send(ready=True, rss_kib=rss)


def child_main(args) -> None:
    chan = Channel()
    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    kind, _, size = args.child.partition(":")
    micro = int(size or args.micro)
    if kind == "trl":
        trl_child(chan, args, data, micro, n_steps=1 + args.reps + int(args.profile))
    else:
        from replay.learner import token_logprobs
        replay_child(chan, args, data, micro, token_logprobs if kind == "ours" else naive_token_logprobs)
    chan.send(done=True, peak_kib=proc_status_kib("VmHWM"))


# ---------------------------------------------------------------- parent

def spawn(args, variant: str, data: Path, log_dir: Path) -> dict:
    argv = [sys.executable, __file__, "--child", variant, "--data", str(data), "--threads", str(args.threads)]
    for flag in ("model", "batch", "prompt_len", "completion_len", "micro", "reps"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--profile"] * args.profile
    log = log_dir / f"{variant.replace(':', '_')}.log"
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, bufsize=1, env=env)
    return {"variant": variant, "proc": proc, "log": log, "times": [], "losses": []}


def ask(child: dict, command: str | None) -> dict:
    if command is not None:
        child["proc"].stdin.write(command + "\n")
        child["proc"].stdin.flush()
    line = child["proc"].stdout.readline()
    if not line:
        tail = child["log"].read_text()[-3000:]
        raise SystemExit(f"{child['variant']} died; end of its log {child['log']}:\n{tail}")
    return json.loads(line)


def report(args, children: list[dict]) -> None:
    base = next((c for c in children if c["variant"].startswith("trl")), None)
    tokens = args.batch * (args.prompt_len + args.completion_len)
    print(f"\n{'variant':<10}{'micro x acc':>12}{'s/step':>9}{'tokens/s':>10}{'RSS setup':>11}{'peak RSS':>10}"
          f"{'step delta':>12}{'speed/TRL':>11}{'delta/TRL':>11}{'peak/TRL':>10}{'loss step1':>12}")
    for c in children:
        c["median"] = statistics.median(c["times"][1:])
        c["delta"] = c["peak"] - c["rss"]
    for c in children:
        micro = int(c["variant"].partition(":")[2] or args.micro)
        ratios = ("", "", "") if base is None else (f"{base['median'] / c['median']:.2f}x",
                                                    f"{c['delta'] / max(base['delta'], 1):.2f}x",
                                                    f"{c['peak'] / base['peak']:.2f}x")
        print(f"{c['variant']:<10}{f'{micro} x {args.batch // micro}':>12}{c['median']:>9.2f}"
              f"{tokens / c['median']:>10.0f}{c['rss'] / 1024:>9.0f}Mi{c['peak'] / 1024:>8.0f}Mi"
              f"{c['delta'] / 1024:>10.0f}Mi{ratios[0]:>11}{ratios[1]:>11}{ratios[2]:>10}{c['losses'][0]:>+12.5f}")
    print("step times (s, first = warm-up):")
    for c in children:
        print(f"  {c['variant']:<10}" + " ".join(f"{t:.2f}" for t in c["times"]))


def parent_main(args) -> None:
    if args.threads == 0:
        args.threads = 2 if os.getloadavg()[0] < 0.5 else 1
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, loadavg {os.getloadavg()}, "
          f"torch threads per variant {args.threads}")
    print(f"batch {args.batch} x ({args.prompt_len} prompt + {args.completion_len} completion) tokens, "
          f"model {args.model}, float32, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.reps} timed steps after 1 warm-up, median reported")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="learn_bench_"))
    build_data(args, work / "data.pt")
    children = [spawn(args, v, work / "data.pt", work) for v in args.variants]
    for c in children:
        c["rss"] = ask(c, None)["rss_kib"]
    for rnd in range(1 + args.reps):
        order = children[rnd % len(children):] + children[:rnd % len(children)]
        for c in order:
            answer = ask(c, "step")
            c["times"].append(answer["seconds"])
            c["losses"].append(answer["loss"])
        print(f"round {rnd} done, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    profiles = {c["variant"]: ask(c, "profile")["profile"] for c in children} if args.profile else {}
    for c in children:
        c["peak"] = ask(c, "end")["peak_kib"]
        c["proc"].wait()
    report(args, children)
    for variant, table in profiles.items():
        print(f"\n--- {variant}: top ops by self CPU time (one step)\n{table}")
    print(f"loadavg at end {os.getloadavg()}; child logs in {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["ours", "ours:16", "naive", "trl"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (multiple of 8)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=192)
    parser.add_argument("--micro", type=int, default=4, help="default micro-batch size")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: 2 if the machine is idle, else 1")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every variant (TRL's default)")
    parser.add_argument("--profile", action="store_true", help="profile one extra step per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(v.partition(":")[2] or args.micro) for v in args.variants]
    if not args.child and (args.batch % GROUP or any(args.batch % m for m in sizes)):
        parser.error(f"--batch must be a multiple of {GROUP} and of every micro-batch size")
    child_main(args) if args.child else parent_main(args)


if __name__ == "__main__":
    main()
