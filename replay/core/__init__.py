"""The pure core of `replay`: tensors/arrays in, tensors/arrays plus a metrics dict out.

advantages  group kinds, GRPO, LENS, NSR/PSR/W-REINFORCE advantages over a flat batch (torch)
loss        token-level PPO clipped surrogate with dual clip and loss aggregation (torch)
logprobs    sampled-token logprobs on the sampling distribution (final logits, T, top-k/top-p), chunked (torch)
sampling    which distribution a stored logprob is under, from the row's settings; refusals (pure Python)
passk       unbiased pass@k (numpy only)

Nothing is imported here, so `replay.core.passk` stays usable without torch.
"""
