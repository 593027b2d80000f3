"""The GPU check of `replay learn` and `replay generate --engine vllm` (run by bench/gpu_check.sh).

    python bench/gpu_check.py learn [--device cuda] [--model smollm2-135m]
    python bench/gpu_check.py vllm  [--model smollm2-135m] [--store DIR]

learn: one fixed batch (8 rows, 64 prompt + 128 random completion tokens, T 0.7 / top-k 50 /
top-p 0.9, advantages ±1, old logprobs = the reference's + 0.05) through replay's learner — replay.learn.policy.token_logprobs +
replay.core.loss.policy_loss + backward — on CPU float32 (the reference), DEVICE float32 and
DEVICE bfloat16 (base weights; LoRA float32), every LoRA initialised to the same non-zero values.
Reports the max/mean |Δ logprob| and the cosine / relative norm error of the LoRA gradient against
the CPU reference (over the tokens every run keeps in its top-k/top-p set; how many differ in
membership is printed), then tokens/s and peak GPU memory of full optimizer steps (16 rows x 512 tokens,
micro-batch 4) for each DEVICE dtype. Exit 1 when an agreement bound fails.

vllm: `replay generate --engine vllm` (base), `score`, `learn --device DEVICE` (round-0 adapter),
`generate --round 1 --engine vllm` (base + that adapter as a LoRARequest), then the learner's
float32 recompute of the round-1 rows on DEVICE under the same adapter: max/mean |Δ logprob|.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# agreement bounds against CPU float32 (bf16 keeps ~3 significant digits per matmul)
BOUNDS = {"float32": {"max_dlogp": 2e-3, "cos": 0.9999, "rel": 1e-3},
          "bfloat16": {"max_dlogp": 0.5, "mean_dlogp": 0.05, "cos": 0.98, "rel": 0.2}}
VLLM_BOUNDS = {"max_dlogp": 0.1, "mean_dlogp": 5e-3}


def fixed_batch(vocab: int, rows: int, prompt_len: int, completion_len: int, seed: int = 0):
    from replay.core.sampling import Distribution
    from replay.learn.policy import make_batch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (rows, prompt_len), generator=g).tolist()
    completions = torch.randint(0, vocab, (rows, completion_len), generator=g).tolist()
    return make_batch(prompts, completions, [Distribution(0.7, 50, 0.9)] * rows)


def set_lora(model, seed: int = 1) -> None:
    """The same non-zero LoRA on every device (peft's init draws from the device's RNG)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def policy(ref, device: str, dtype: str):
    from replay.learn.policy import LoraSettings, load_policy

    model = load_policy(ref, None, LoraSettings(), device=device, dtype=dtype)
    set_lora(model)
    model.train()
    return model


def lora_grad(model, batch, old, mask):
    """The LoRA gradient of the GRPO-style loss over `mask` (advantages ±1, dual clip on)."""
    from replay.core.loss import policy_loss
    from replay.learn.policy import token_logprobs

    model.zero_grad(set_to_none=True)
    logprobs = token_logprobs(model, batch)
    device = logprobs.device
    advantages = torch.tensor([1.0, -1.0] * (batch.targets.shape[0] // 2), device=device)
    loss, _ = policy_loss(logprobs, old.to(device), advantages, mask.float().to(device))
    loss.backward()
    return torch.cat([p.grad.float().flatten().cpu() for n, p in sorted(model.named_parameters()) if "lora_" in n])


def check_learn(args) -> bool:
    from replay.learn.policy import token_logprobs
    from replay.models import resolve_model

    ref = resolve_model(args.model)
    models = {("cpu", "float32"): policy(ref, "cpu", "float32"), (args.device, "float32"): None,
              (args.device, "bfloat16"): None}
    for key in models:
        models[key] = models[key] or policy(ref, *key)
    reference = models[("cpu", "float32")]
    batch = fixed_batch(reference.config.vocab_size, 8, 64, 128)
    with torch.no_grad():
        logps = {key: token_logprobs(m, batch).float().cpu() for key, m in models.items()}
    # tokens every run keeps in its top-k/top-p set (random tokens sit near the cut in bf16)
    common = batch.target_mask.bool()
    for logp in logps.values():
        common &= torch.isfinite(logp)
    old = logps[("cpu", "float32")].masked_fill(~common, 0.0) + 0.05  # ratio != 1: both PPO branches occur
    ref_grad = lora_grad(reference, batch, old, common)
    ok = True
    for key in list(models)[1:]:
        device, dtype = key
        dlogp = (logps[key] - logps[("cpu", "float32")])[common].abs()
        grad = lora_grad(models[key], batch, old, common)
        cos = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
        rel = float((grad - ref_grad).norm() / ref_grad.norm())
        membership = int((torch.isfinite(logps[key]) != torch.isfinite(logps[("cpu", "float32")]))
                         [batch.target_mask.bool()].sum())
        bounds = BOUNDS[dtype]
        passed = (float(dlogp.max()) <= bounds["max_dlogp"] and cos >= bounds["cos"] and rel <= bounds["rel"]
                  and float(dlogp.mean()) <= bounds.get("mean_dlogp", 1.0))
        ok &= passed
        print(f"learn {device} {dtype} vs cpu float32: |dlogp| max {float(dlogp.max()):.2e} mean "
              f"{float(dlogp.mean()):.2e} over {int(common.sum())} tokens ({membership} differ in top-k/p "
              f"membership); LoRA grad cos {cos:.6f} rel err {rel:.2e} -> {'ok' if passed else 'FAIL'}")
    for key, model in models.items():
        if key[0].startswith("cuda"):
            print(f"  speed {key[1]}: " + speed(model, key[0]))
    return ok


def speed(model, device: str, rows: int = 16, length: int = 512, micro: int = 4, reps: int = 3) -> str:
    from replay.core.loss import policy_loss
    from replay.learn.policy import token_logprobs

    batch = fixed_batch(model.config.vocab_size, rows, length // 4, length - length // 4, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    old = torch.full(batch.targets.shape, -5.0)
    advantages = torch.tensor([1.0, -1.0] * (rows // 2))

    def step():
        for start in range(0, rows, micro):
            sub = type(batch)(*(getattr(batch, f)[start:start + micro] for f in batch.__dataclass_fields__))
            logprobs = token_logprobs(model, sub)
            loss, _ = policy_loss(logprobs, old[start:start + micro].to(device), advantages[start:start + micro].to(device),
                                  sub.target_mask.to(device), dual_clip=None)
            (loss * micro / rows).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return f"{rows * length / seconds:,.0f} tokens/s ({seconds:.3f} s/step, {rows}x{length}), peak {peak:.2f} GiB"


def replay(*args, env=None) -> str:
    cmd = [sys.executable, "-m", "replay", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def check_vllm(args) -> bool:
    from replay.learn.policy import frozen_policy, make_batch, token_logprobs
    from replay.learn.selection import SAMPLING_COLUMNS, row_distribution
    from replay.models import resolve_model
    from replay.store import Store

    store = Path(args.store or tempfile.mkdtemp(prefix="gpu-check-")) / "store"
    common = ["--store", store, "--model", args.model]
    sampling = ["--dataset", "arith", "--num-prompts", args.prompts, "--num-samples", 4, "--max-new-tokens", 96,
                "--temperature", 0.7, "--top-k", 50, "--top-p", 0.9, "--engine", "vllm"]
    replay("generate", "--round", 0, *common, *sampling)
    replay("score", "--store", store, "--round", 0, "--workers", 4)
    replay("learn", "--store", store, "--round", 0, "--device", args.device, "--lr", "1e-4", "--epochs", 2)
    started = time.perf_counter()
    out = replay("generate", "--round", 1, *common, *sampling)
    written = [line for line in out.splitlines() if "groups written" in line]
    print(f"round 1: {written[-1] if written else out.strip()[-200:]} "
          f"({time.perf_counter() - started:.1f} s with the round-0 adapter)")
    s = Store.open(store)
    rows = s.query(f"SELECT prompt_token_ids p, completion_token_ids c, completion_logprobs l, policy_round, "
                   f"{', '.join(SAMPLING_COLUMNS)} FROM rollouts WHERE round = 1").to_pylist()
    assert rows and all(r["policy_round"] == 0 for r in rows), "round 1 was not sampled with the round-0 adapter"
    model = frozen_policy(resolve_model(args.model), s.adapter_dir(0), device=args.device, dtype="float32")
    diffs = []
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            batch = make_batch([r["p"] for r in chunk], [r["c"] for r in chunk],
                               [row_distribution(r, recompute=False) for r in chunk])
            ours = token_logprobs(model, batch).float().cpu()
            for i, r in enumerate(chunk):
                mine, theirs = ours[i, : len(r["c"])], torch.tensor(r["l"])
                finite = torch.isfinite(mine)
                diffs.append((mine[finite] - theirs[finite]).abs())
                if not bool(finite.all()):
                    print(f"  warning: {int((~finite).sum())} vLLM-sampled tokens fall outside the learner's top-k/p set")
    diffs = torch.cat(diffs)
    ok = float(diffs.max()) <= VLLM_BOUNDS["max_dlogp"] and float(diffs.mean()) <= VLLM_BOUNDS["mean_dlogp"]
    print(f"vllm {args.device} + round-0 adapter vs learner float32: |dlogp| max {float(diffs.max()):.2e} "
          f"mean {float(diffs.mean()):.2e} over {diffs.numel()} tokens -> {'ok' if ok else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["learn", "vllm"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", help="directory for the vllm check's store (default: a temp dir)")
    parser.add_argument("--prompts", type=int, default=16, help="vllm check: prompts per round (4 samples each)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__}: this check needs a GPU")
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()} ({torch.__version__}, CUDA {torch.version.cuda})")
    ok = check_learn(args) if args.check == "learn" else check_vllm(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
