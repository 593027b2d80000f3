"""The stage commands: generate, score, import, learn, round, eval. Each builds its stage's config and
calls the stage's `run`; heavy imports happen inside the command."""

from __future__ import annotations

from typing import Optional

import typer

from .app import StoreOpt, command
from ..core import AGGREGATIONS, BEHAVIOUR_CORRECTIONS, D_IMP_MODES, OBJECTIVES, RESCUES
from ..errors import ReplayError
from ..learn.config import DEVICES, DTYPES, LearnConfig


ReportToOpt = typer.Option("none", "--report-to", help="Live metrics: none | tensorboard (event files under "
                          "<store>/logs/tb/) | wandb (honours WANDB_MODE, WANDB_PROJECT, WANDB_DIR).")


def config_from(cls, values: dict, **converted):
    """A stage config from a command's parameters: each field of `cls` taken from the parameter of the
    same name (`converted` for those the CLI spells differently), so no field is restated by hand."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names} | converted)


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ReplayError(f"--levels must be comma-separated integers 1-5, got {text!r}") from None


@command(long_running=True, short_help="Sample G completions per prompt into the store.")
def generate(
    store: str = StoreOpt,
    round: int = typer.Option(0, "--round", "-r", help="Round to sample (policy: base + adapter of round-1)."),
    dataset: str = typer.Option("arith", help="arith (built-in), a .jsonl/.parquet file (MATH or GSM8K format), "
                                "a datasets save_to_disk directory, or a Hugging Face Hub id (org/name)."),
    num_prompts: Optional[int] = typer.Option(64, help="Number of prompts (files: the first N; all if 0)."),
    split: str = typer.Option("train", help="Split label (arith: train and test are disjoint streams; "
                              "a DatasetDict: the split to read)."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration (name)."),
    dataset_split: Optional[str] = typer.Option(None, help="Split to read from a hub dataset / DatasetDict "
                                                "(default: --split)."),
    problem_key: Optional[str] = typer.Option(None, help="Field holding the problem (default problem/question)."),
    answer_key: Optional[str] = typer.Option(None, help="Field holding the gold answer (default answer)."),
    levels: str = typer.Option("1,2,3,4,5", help="arith difficulty levels, cycled."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m (embedded), an HF model dir or a .gguf file."),
    engine: str = typer.Option("auto", help="auto | vllm | transformers (auto: vllm if installed)."),
    adapter: str = typer.Option("auto", help="auto (round-1's adapter) | none | a peft adapter dir."),
    num_samples: int = typer.Option(8, "--num-samples", "-G", help="Samples per prompt (G)."),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, help="0: off."),
    max_new_tokens: int = typer.Option(256),
    seed: int = typer.Option(0, help="Base seed; each sample's seed derives from (seed, round, prompt, idx)."),
    batch_size: int = typer.Option(16, help="Prompts per batch (and per written part file)."),
    shard: str = typer.Option("0/1", help="i/n: this worker's share of the prompts (by prompt_id)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="A read-only SQL query choosing prompt ids of "
                                          "this store instead of --dataset; a prompt that already has a group in "
                                          "the round gets -G more samples (rescue sampling)."),
    hint: Optional[str] = typer.Option(None, "--hint", help="With --prompts: re-sample them with a hint in the "
                                       "user turn, as a sample set of its own: prefix:F (the first fraction F of "
                                       "the reference solution's lines) | answer | ladder (prefix 0.25, 0.5, 0.75 "
                                       "for the prompts still unsolved)."),
):
    """Sample G completions per prompt and store them with token ids and per-token logprobs."""
    from stages.generate import GenerateConfig, run

    record = run(store, config_from(GenerateConfig, locals(), num_prompts=num_prompts or None, levels=_levels(levels)))
    c = record["counts"]
    solved = (f"; {c['solved_with_hint']} of {c['prompts']} prompts solved with the hint"
              + (f" over {c['tiers']} tiers" if c.get("tiers", 1) > 1 else "")
              + (f" ({c['no_hint']} skipped: no reference solution to take a prefix from)" if c.get("no_hint") else "")
              ) if "solved_with_hint" in c else ""
    typer.echo(f"round {round}: {c['groups_written']} groups written ({c['rollouts_written']} rollouts, "
               f"{c['tokens_written']} tokens), {c['groups_already_stored']} already stored{solved}")


@command(long_running=True, short_help="Verify a round's rollouts with math-verify.")
def score(
    store: str = StoreOpt,
    round: int = typer.Option(0, "--round", "-r"),
    workers: Optional[int] = typer.Option(None, help="Verifier worker processes (default: one per CPU this "
                                           "process may use; 2 on 2 cores measured best, docs/BENCHMARKS.md)."),
    timeout: float = typer.Option(10.0, help="Hard wall-clock limit per answer, seconds (then status=timeout)."),
    rescore: bool = typer.Option(False, help="Re-verify rollouts lacking a verdict of the current verifier version."),
    shard: str = typer.Option("0/1", help="i/n: this worker's share of the rollouts (by prompt_id, as generate)."),
    partial: bool = typer.Option(False, help="Score what is stored while the round's generate/import is running "
                                 "or unfinished (refused otherwise: the record would cover part of a round)."),
):
    """Verify the round's unscored rollouts with math-verify (worker processes, hard timeouts)."""
    from stages.score import ScoreConfig, run

    record = run(store, config_from(ScoreConfig, locals()))
    c = record["counts"]
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(c["statuses"].items())) or "nothing new"
    typer.echo(f"round {round}: scored {c['scored']} ({c['correct']} correct; {statuses}), "
               f"{c['already_scored']} already scored")


@command("import", short_help="Import completions made elsewhere as rollouts.")
def import_(
    file: str = typer.Argument(..., help="JSONL or Parquet with problem, answer, completion columns."),
    store: str = StoreOpt,
    round: int = typer.Option(0, "--round", "-r"),
    source: Optional[str] = typer.Option(None, help="Prompt source label (default: the file name)."),
    problem_key: str = typer.Option("problem"),
    answer_key: str = typer.Option("answer"),
    completion_key: str = typer.Option("completion"),
    model: str = typer.Option("imported", help="Name of the model that wrote the completions."),
    tokenizer: Optional[str] = typer.Option(None, help="Model whose vocabulary the token ids use (default: the "
                                            "store's base model): ids are checked against it, missing prompt "
                                            "ids are derived with its chat template."),
    temperature: Optional[float] = typer.Option(None, help="Temperature the completions were sampled at (a row's "
                                                "own `temperature` field must agree). Without it, rows with "
                                                "logprobs are of unknown sampling: learn refuses them unless "
                                                "--recompute-old-logprobs."),
    top_p: Optional[float] = typer.Option(None, help="Their top-p (default with --temperature: 1, no cut)."),
    top_k: Optional[int] = typer.Option(None, help="Their top-k (default with --temperature: 0, no cut)."),
    logprobs_mode: str = typer.Option("processed", help="What the logprobs are under: processed (the sampling "
                                      "distribution, temperature/top-k/top-p applied, as replay and vLLM's "
                                      "processed_logprobs store them) | raw (the model's softmax at T = 1)."),
):
    """Import completions made elsewhere as rollouts of a round (groups formed by problem)."""
    from stages.import_rollouts import ImportConfig, run

    record = run(store, config_from(ImportConfig, locals()))
    c = record["counts"]
    typer.echo(f"round {round}: imported {c['rollouts_written']} rollouts of {c['prompts']} problems "
               f"({c['groups_already_stored']} groups already stored)")
    if "note" in record:
        typer.echo(f"note: {record['note']}")


L = LearnConfig()  # the defaults below are the dataclass's: written once, there


@command(long_running=True, short_help="Train the round's LoRA adapter on stored rollouts.")
def learn(
    store: str = StoreOpt,
    round: int = typer.Option(L.round, "--round", "-r", help="Learn round: trains on its scored rollouts."),
    objective: str = typer.Option(L.objective, help=" | ".join(OBJECTIVES)),
    adapter_name: str = typer.Option(L.adapter_name, help="Another name trains a side adapter (same-data A/B)."),
    window: int = typer.Option(L.window, help="Train on the last K rounds of rollouts (whole groups)."),
    where: Optional[str] = typer.Option(L.where, help="SQL predicate over the samples view (group kept if any "
                                        "matches)."),
    recompute_old_logprobs: bool = typer.Option(L.recompute_old_logprobs, help="Recompute behaviour logprobs with "
                                                "each row's policy."),
    partial: bool = typer.Option(L.partial, help="Train on the fully scored groups of a window whose rounds are "
                                 "not all scored or still written (refused otherwise)."),
    fresh: bool = typer.Option(not L.init_from_previous, help="Start a new LoRA instead of continuing round-1's "
                               "adapter."),
    model: Optional[str] = typer.Option(L.model, help="Base model (default: the store's)."),
    device: str = typer.Option(L.device, help=f"{DEVICES} (auto: CUDA when available)."),
    dtype: str = typer.Option(L.dtype, help=" | ".join(DTYPES) + " (auto: bf16 on a GPU that has it). "
                              "LoRA weights and optimizer state stay float32."),
    nproc: int = typer.Option(1, help="Processes (one per GPU): >1 re-runs this command under torchrun."),
    lora_r: int = typer.Option(L.lora_r), lora_alpha: int = typer.Option(L.lora_alpha),
    lora_dropout: float = typer.Option(L.lora_dropout),
    target_modules: str = typer.Option(",".join(L.target_modules), help="Comma-separated module names."),
    lr: float = typer.Option(L.lr), epochs: int = typer.Option(L.epochs),
    micro_batch_size: int = typer.Option(L.micro_batch_size),
    grad_accum: int = typer.Option(L.grad_accum, help="Micro-batches per optimizer step (per process under "
                                   "torchrun); unused with --steps."),
    steps: Optional[int] = typer.Option(L.steps, help="Exactly this many optimizer steps per epoch, whatever "
                                        "the number n of planned rows: steps of ⌈n/S⌉ or ⌊n/S⌋ rows, cut "
                                        "into --micro-batch-size passes; --grad-accum is then ignored. "
                                        "Refused when n < S."),
    max_grad_norm: float = typer.Option(L.max_grad_norm),
    clip_eps: float = typer.Option(L.clip_eps), clip_eps_high: Optional[float] = typer.Option(L.clip_eps_high),
    dual_clip: Optional[float] = typer.Option(L.dual_clip, help="Dual-clip bound for negative advantages (0: off)."),
    tis_cap: Optional[float] = typer.Option(L.tis_cap, help="Truncated importance weight cap (off by default)."),
    aggregation: str = typer.Option(L.aggregation, help=" | ".join(AGGREGATIONS)),
    lens_alpha: float = typer.Option(L.lens_alpha, help="LENS loss weight of negative groups."),
    lens_d_imp: str = typer.Option(L.lens_d_imp, help=" | ".join(D_IMP_MODES)),
    lens_inv_group_size: bool = typer.Option(L.lens_inv_group_size, help="LENS: scale negative groups by 1/G."),
    w_reinforce_lambda: float = typer.Option(L.w_reinforce_lambda, help="W-REINFORCE weight of correct samples."),
    gradient_checkpointing: bool = typer.Option(L.gradient_checkpointing),
    zero_advantage: str = typer.Option(L.zero_advantage, help="skip: rows with zero advantage or weight leave the "
                                       "step plan (fewer steps, no compute) | keep: they stay in it and count in "
                                       "each step's normaliser with loss 0, as a fixed global batch (step-matched "
                                       "objectives)."),
    rescue: str = typer.Option(L.rescue, help=" | ".join(RESCUES) + ": replay puts stored correct rollouts of "
                               "the prompt into each negative group (see rescue_candidates)."),
    rescue_max: int = typer.Option(L.rescue_max, help="Replayed rows per negative group, at most."),
    rescue_sql: Optional[str] = typer.Option(L.rescue_sql, help="A query over rescue_candidates returning "
                                             "rollout_id: which rows may be replayed (default: newest policy "
                                             "first, then rollout id)."),
    behaviour_correction: str = typer.Option(L.behaviour_correction, help=" | ".join(BEHAVIOUR_CORRECTIONS)
                                             + ": how replayed rows sampled by an older policy are weighted."),
    behaviour_cap: float = typer.Option(L.behaviour_cap, help="C: tis truncates weights at C; seq-mask drops "
                                        "rows outside [1/C, C]."),
    shaping_gamma: float = typer.Option(L.shaping_gamma, help="γ of shaping's f(π) = π/(π+γ)."),
    hinted_as: str = typer.Option(L.hinted_as, help="Rows of hint sets (generate --hint): rescue (right ones "
                                  "are rescue sources of their plain prompt's negative group, scored under the "
                                  "plain prompt) | prompt (each hinted prompt is a group of its own)."),
    seed: int = typer.Option(L.seed),
    force: bool = typer.Option(L.force, help="Retrain a round whose learn is already complete."),
    report_to: str = ReportToOpt,
):
    """Train the round's LoRA adapter on stored rollouts (continues round-1's adapter by default)."""
    if nproc > 1:
        from replay.learn.distributed import exec_torchrun

        exec_torchrun(nproc)  # does not return
    from stages.learn import run

    cfg = config_from(LearnConfig, locals(), init_from_previous=not fresh, dual_clip=dual_clip or None,
                      target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
    record = run(store, cfg)
    if record.get("rank", 0) != 0:
        return  # under torchrun rank 0 alone reports
    left_out = _partial_note(record)
    if record.get("skipped"):
        done_with = (record.get("config") or {}).get("objective")
        other = (f" with objective {done_with}, not {cfg.objective}: --adapter-name NAME trains a side adapter "
                 f"with it, or") if done_with and done_with != cfg.objective else ";"
        typer.echo(f"round {round}: learn already complete ({record['adapter']}{left_out}){other} --force retrains")
        return
    c = record["counts"]
    replayed = f"; {c['replayed']} replayed into negative groups" if c.get("replayed") else ""
    typer.echo(f"round {round}: {cfg.objective} on {plural(c['samples'], 'sample')} in "
               f"{plural(c['groups'], 'group')} ({c['trained_samples']} with gradient{replayed}), "
               f"{plural(c['optimizer_steps'], 'step')} -> {record['adapter']}{left_out}")


def _partial_note(record: dict) -> str:
    """A learn run with --partial says what it left out, then and whenever it is found complete."""
    config, selection = record.get("config") or {}, record.get("selection") or {}
    skipped = selection.get("groups_skipped")
    if not config.get("partial") or not skipped:
        return ""
    return f"; --partial: {plural(skipped, 'group')} of the window left out (not fully scored then" + \
        (", or not matching --where)" if selection.get("where") else ")")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@command("round", long_running=True, short_help="One cron tick: the next round's missing stages.")
def round_(
    store: str = StoreOpt,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML with [generate] [score] [learn] tables."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting: section.key=value (repeatable)."),
    rounds: int = typer.Option(1, help="Run this many rounds in a row."),
    until: Optional[int] = typer.Option(None, "--until", help="Instead of a count: run rounds until this "
                                        "round has learned (a rerun only finishes what is missing)."),
    wait: bool = typer.Option(False, help="Wait for a running tick instead of exiting."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Live metrics: none | tensorboard | wandb "
                                            "(default: [round] report_to of the config, else none)."),
):
    """One cron tick: run the next unfinished round's missing stages (generate -> score -> learn).

    Exit codes: 0 done, or another tick holds the store lock (message says so); 1 error."""
    from .settings import load_settings
    from stages.round import EXIT_LOCKED, RoundLocked, run

    settings = load_settings(config, set_)
    if report_to is not None:
        settings["round"]["report_to"] = report_to
    try:
        results = run(store, settings, rounds=rounds, wait=wait, echo=typer.echo, until=until)
    except RoundLocked as exc:
        typer.echo(str(exc))
        raise typer.Exit(EXIT_LOCKED) from None
    done = ", ".join(str(r.round) for r in results)
    typer.echo(f"finished round(s) {done}" if results else f"nothing to do: round {until} has learned")


@command("eval", long_running=True, short_help="pass@k of a round's policy on held-out prompts.")
def eval_(
    store: str = StoreOpt,
    round: int = typer.Option(-1, "--round", "-r", help="Evaluate base + the adapter learned in this round."),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model (same as --round -1)."),
    adapter: str = typer.Option("main", "--adapter", help="Adapter name (A/B variants from learn --adapter-name)."),
    dataset: str = typer.Option("arith", help="As for generate: arith, a file, a save_to_disk directory or a hub id."),
    split: str = typer.Option("test"),
    dataset_config: Optional[str] = typer.Option(None), dataset_split: Optional[str] = typer.Option(None),
    num_prompts: Optional[int] = typer.Option(128), levels: str = typer.Option("1,2,3,4,5"),
    problem_key: Optional[str] = typer.Option(None), answer_key: Optional[str] = typer.Option(None),
    num_samples: int = typer.Option(8, "--num-samples", "-n"), max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(1.0), top_p: float = typer.Option(1.0),
    engine: str = typer.Option("auto"), seed: int = typer.Option(1234), batch_size: int = typer.Option(16),
    workers: Optional[int] = typer.Option(None), timeout: float = typer.Option(10.0),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="A read-only SQL query choosing prompt ids of "
                                          "this store instead of --dataset, e.g. \"select prompt_id from "
                                          "negative_groups where round = 0\" (view rescue_eval)."),
    report_to: str = ReportToOpt,
):
    """pass@k (k = 1, 2, 4, ..., n) of a round's policy on held-out prompts, overall and per level/subject."""
    from ..read.formats import print_table
    from stages.eval import EvalConfig, run
    from stages.generate import GenerateConfig

    gen = GenerateConfig(dataset=dataset, split=split, dataset_config=dataset_config, dataset_split=dataset_split,
                         num_prompts=num_prompts or None, levels=_levels(levels),
                         problem_key=problem_key, answer_key=answer_key, num_samples=num_samples,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, engine=engine,
                         seed=seed, batch_size=batch_size, prompts=prompts)
    rows = run(store, EvalConfig(round=-1 if base else round, adapter_name=adapter, generate=gen,
                                 workers=workers, timeout=timeout, report_to=report_to))
    import pyarrow as pa

    table = pa.Table.from_pylist([{"slice": "all" if r["group_by"] == "all" else f"{r['group_by']}={r['group_value']}",
                                   "k": r["k"],
                                   "pass@k": float(f"{r['pass_at_k']:.4f}"), "prompts": r["n_prompts"]} for r in rows])
    print_table(table, title=f"pass@k, round {rows[0]['round']} ({rows[0]['adapter_name']})")
