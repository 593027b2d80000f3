"""Generation engines behind one contract (engines.base). Engine modules import heavy stacks
(torch, vLLM), so they load only when make_engine asks for them."""

from __future__ import annotations

import importlib

from .base import Completion, Engine, FinishReason, LogprobsMode, SamplingSettings

# name -> "module:Class"; built with Class.load(model_ref, lora=..., **options).
ENGINES = {
    "transformers": "replay.engines.hf_engine:HFEngine",
    "vllm": "replay.engines.vllm_engine:VLLMEngine",
}


def make_engine(name: str, model_ref, *, lora: str | None = None, **options) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: use one of {', '.join(sorted(ENGINES))}")
    module_name, class_name = ENGINES[name].split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class.load(model_ref, lora=lora, **options)


__all__ = ["Completion", "Engine", "ENGINES", "FinishReason", "LogprobsMode", "SamplingSettings",
           "make_engine"]
