"""The stage commands' flags and the stage configs do not drift apart: every config field is a flag
of the same name and default (or is listed below with the reason it is not), and every flag reaches
the config. A new LearnConfig field without a `replay learn` flag fails here, and so does a flag
whose default disagrees with the dataclass."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from replay.cli import app
from replay.learn.config import LearnConfig
from stages.generate import GenerateConfig
from stages.import_rollouts import ImportConfig
from stages.score import ScoreConfig

COMMON = {"store", "quiet", "verbose", "report_to"}  # every stage command's, not a config field
CASES = {
    # command: (config, {field: (flag, flag default from the field default)}, fields with no flag, flags with no field)
    "learn": (LearnConfig,
              {"init_from_previous": ("fresh", lambda v: not v), "target_modules": ("target_modules", ",".join),
               "report_to": ("report_to", None)},
              set(), {"nproc"}),
    "generate": (GenerateConfig, {"levels": ("levels", lambda v: ",".join(map(str, v)))},
                 {"instruction", "stage", "prompts_from"},  # TOML [generate] only; eval's; eval's
                 set()),
    "score": (ScoreConfig, {}, {"stage", "chunk_size"}, set()),  # manifest name; a write-size knob
    "import": (ImportConfig, {}, set(), {"file"}),  # `file` is the argument
}


def params(command: str) -> dict:
    return {p.name: p.default for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("command", sorted(CASES))
def test_every_config_field_is_a_flag_with_its_default(command):
    config, renamed, no_flag, extra_flags = CASES[command]
    flags = params(command)
    defaults = config()
    for field in dataclasses.fields(config):
        if field.name in no_flag:
            continue
        flag, convert = renamed.get(field.name, (field.name, None))
        assert flag in flags, f"{config.__name__}.{field.name} has no --{flag.replace('_', '-')} flag"
        want = getattr(defaults, field.name)
        if flag == "report_to" or (flag == "file" and command == "import"):
            continue
        assert flags[flag] == (convert(want) if convert else want), f"--{flag} default"
    fields = {f.name for f in dataclasses.fields(config)}
    reached = {renamed.get(f, (f,))[0] for f in fields}
    stray = set(flags) - reached - COMMON - extra_flags
    assert not stray, f"flags of `replay {command}` that no config field receives: {stray}"


def test_learn_flags_reach_the_config(monkeypatch, tmp_path):
    """Every flag's value lands in LearnConfig (none dropped by the command): set each to a
    non-default value and compare the config `run` receives."""
    seen = {}
    monkeypatch.setattr("stages.learn.run", lambda store, cfg: seen.setdefault("cfg", cfg) and {"skipped": True,
                                                                                               "adapter": "x"})
    from typer.testing import CliRunner

    args = ["learn", "--store", str(tmp_path), "--round", "3", "--objective", "nsr", "--adapter-name", "side",
            "--window", "2", "--where", "true", "--recompute-old-logprobs", "--partial", "--fresh", "--model", "m",
            "--device", "cpu", "--dtype", "bfloat16", "--lora-r", "8", "--lora-alpha", "4", "--lora-dropout", "0.1",
            "--target-modules", "q_proj, v_proj", "--lr", "0.5", "--epochs", "2", "--micro-batch-size", "3",
            "--grad-accum", "5", "--steps", "6", "--max-grad-norm", "2", "--clip-eps", "0.3", "--clip-eps-high", "0.4",
            "--dual-clip", "0", "--tis-cap", "2", "--aggregation", "token-mean", "--lens-alpha", "0.5",
            "--lens-d-imp", "off", "--no-lens-inv-group-size", "--w-reinforce-lambda", "0.2",
            "--gradient-checkpointing", "--zero-advantage", "keep", "--rescue", "replay", "--rescue-max", "3",
            "--rescue-sql", "select rollout_id from rescue_candidates", "--behaviour-correction", "seq-mask",
            "--behaviour-cap", "3", "--shaping-gamma", "0.5", "--hinted-as", "prompt", "--seed", "7", "--force",
            "--report-to", "tensorboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg == LearnConfig(round=3, objective="nsr", adapter_name="side", window=2, where="true",
                              recompute_old_logprobs=True, partial=True, init_from_previous=False, model="m", device="cpu",
                              dtype="bfloat16", lora_r=8, lora_alpha=4, lora_dropout=0.1,
                              target_modules=("q_proj", "v_proj"), lr=0.5, epochs=2, micro_batch_size=3,
                              grad_accum=5, steps=6, max_grad_norm=2.0, clip_eps=0.3, clip_eps_high=0.4, dual_clip=None,
                              tis_cap=2.0, aggregation="token-mean", lens_alpha=0.5, lens_d_imp="off",
                              lens_inv_group_size=False, w_reinforce_lambda=0.2, gradient_checkpointing=True,
                              zero_advantage="keep", rescue="replay", rescue_max=3,
                              rescue_sql="select rollout_id from rescue_candidates",
                              behaviour_correction="seq-mask", behaviour_cap=3.0, shaping_gamma=0.5,
                              hinted_as="prompt", seed=7,
                              force=True, report_to="tensorboard")
    # every field was set away from its default above: a flag the command dropped would show here
    changed = {f.name for f in dataclasses.fields(LearnConfig) if getattr(cfg, f.name) != getattr(LearnConfig(), f.name)}
    assert changed == {f.name for f in dataclasses.fields(LearnConfig)}


@pytest.mark.parametrize("command, module, args, expected", [
    ("generate", "stages.generate",
     ["--round", "2", "--dataset", "d.jsonl", "--num-prompts", "0", "--split", "test", "--dataset-config", "c",
      "--dataset-split", "s", "--problem-key", "q", "--answer-key", "a", "--levels", "2,3", "--model", "m",
      "--engine", "transformers", "--adapter", "none", "-G", "3", "--temperature", "0.5", "--top-p", "0.9",
      "--top-k", "5", "--max-new-tokens", "9", "--seed", "4", "--batch-size", "2", "--shard", "1/2",
      "--prompts", "select 1", "--hint", "answer"],
     GenerateConfig(round=2, dataset="d.jsonl", num_prompts=None, split="test", dataset_config="c",
                    dataset_split="s", problem_key="q", answer_key="a", levels=(2, 3), model="m",
                    engine="transformers", adapter="none", num_samples=3, temperature=0.5, top_p=0.9, top_k=5,
                    max_new_tokens=9, seed=4, batch_size=2, shard="1/2", prompts="select 1", hint="answer")),
    ("score", "stages.score", ["--round", "3", "--workers", "5", "--timeout", "2", "--rescore", "--shard", "0/3",
                               "--partial"],
     ScoreConfig(round=3, workers=5, timeout=2.0, rescore=True, shard="0/3", partial=True)),
    ("import", "stages.import_rollouts",
     ["f.jsonl", "--round", "1", "--source", "s", "--problem-key", "p", "--answer-key", "a",
      "--completion-key", "c", "--model", "m", "--tokenizer", "t", "--temperature", "0.7", "--top-p", "0.8",
      "--top-k", "5", "--logprobs-mode", "raw"],
     ImportConfig(round=1, file="f.jsonl", source="s", problem_key="p", answer_key="a", completion_key="c",
                  model="m", tokenizer="t", temperature=0.7, top_p=0.8, top_k=5, logprobs_mode="raw")),
])
def test_stage_flags_reach_their_config(monkeypatch, tmp_path, command, module, args, expected):
    from typer.testing import CliRunner

    seen = {}

    def fake_run(store, cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)  # the command's summary line needs counts a fake run does not have

    monkeypatch.setattr(f"{module}.run", fake_run)
    CliRunner().invoke(app, [command, "--store", str(tmp_path), *args])
    assert seen["cfg"] == expected
