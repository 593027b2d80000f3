"""Shared checks for replay's autograd Functions: the same values and gradients as a reference
computation, and what a call keeps for the backward pass."""

import torch


def assert_same_values_and_grads(fn, reference, leaves, upstream, rtol=1e-5, atol=1e-6):
    """fn(*leaves) against reference(*copies of leaves): outputs, then every leaf's gradient
    under the same upstream gradient (None leaves are passed through)."""
    copies = tuple(None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves)
    out, expected = fn(*leaves), reference(*copies)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(leaves, copies):
        if mine is not None and mine.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=rtol, atol=atol)


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs, leaving out
    the storages of the tensors in `exclude` (parameters: keeping them costs nothing)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
