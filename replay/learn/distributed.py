"""torchrun glue: which rank this process is, DDP wrapping, metric all-reduce, one writer.

Under `torchrun --nproc_per_node N -m replay learn ...` torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; every rank loads the same data and follows the same seeded plan (replay.learn.loop),
rank 0 alone writes. gloo on CPU, NCCL on CUDA (one device per local rank).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(p.device for p in module.parameters() if p.requires_grad)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)

    def reduce_metrics(self, sums: torch.Tensor, maximum: float) -> tuple[torch.Tensor, float]:
        """Sum `sums` and take the max of `maximum` over all ranks."""
        if self.world == 1:
            return sums, maximum
        import torch.distributed as dist

        device = _collective_device()
        total = sums.to(device)
        dist.all_reduce(total)
        peak = torch.tensor([maximum], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return total.cpu(), float(peak)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def rank_share_of(micro_batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of a step: every world-th one, then empty ones (zero-weight
    passes) so every rank makes ceil(len / world) forward/backward passes and none waits forever
    in the gradient all-reduce."""
    mine = micro_batches[rank::world]
    return mine + [[] for _ in range(-(-len(micro_batches) // world) - len(mine))]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_spec: str) -> tuple[Ranks, str]:
    """Join the process group when torchrun started us; returns (ranks, this rank's device spec)."""
    if not launched_by_torchrun():
        return Ranks(), device_spec
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device_spec = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device_spec


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """`replay learn ... --nproc N` -> `python -m torch.distributed.run --standalone
    --nproc_per_node N -m replay learn ...` (the same arguments, --nproc dropped)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
            "-m", "replay", *args]


def exec_torchrun(nproc: int) -> None:
    argv = torchrun_argv(nproc, sys.argv[1:])
    sys.stdout.flush()
    os.execv(argv[0], argv)
