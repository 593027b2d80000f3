"""The pure core of `replay`: tensors/arrays in, tensors/arrays plus a metrics dict out.

advantages  group kinds, GRPO, LENS, NSR/PSR/W-REINFORCE advantages over a flat batch (torch)
loss        token-level PPO clipped surrogate with dual clip and loss aggregation (torch)
logprobs    sampled-token logprobs on the sampling distribution (final logits, T, top-k/top-p), chunked (torch)
behaviour   the behaviour correction of replayed rows: truncated / masked importance weights (torch)
sampling    which distribution a stored logprob is under, from the row's settings; refusals (pure Python)
passk       unbiased pass@k (numpy only)

Nothing is imported here, so `replay.core.passk` stays usable without torch; the names below are
plain strings for the same reason: the CLI lists and checks them without loading torch.
"""

OBJECTIVES = ("grpo", "lens", "nsr", "psr", "w_reinforce")  # advantages.compute_advantages dispatches on them
D_IMP_MODES = ("confidence", "off", "sequence")  # LENS's importance term (advantages.lens_advantages)
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")  # loss.policy_loss
BEHAVIOUR_CORRECTIONS = ("tis", "seq-mask", "none", "shaping")  # behaviour.behaviour_weights, loss.policy_loss
RESCUES = ("none", "replay")  # learn --rescue: what joins a negative group (replay.learn.rescue)
