"""The learner, one module per concern (stages/learn.py is the top-to-bottom shell):

config       LearnConfig: every `replay learn` setting, typed, validated
selection    SQL -> LearnSample rows: whole scored groups, `--where` as data, the sampling rule
policy       the LoRA policy (load/save through replay.models) and its sampled-token logprobs
loop         train(model, samples, advantages, cfg): micro-batches, accumulation, metrics rows
distributed  torchrun glue: which rank does what, all-reduce, one writer
"""
