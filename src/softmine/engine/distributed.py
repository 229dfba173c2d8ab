"""torch.distributed plumbing for ``torchrun``: process group, global batch, gathered evaluation.

Launch with ``torchrun --nproc_per_node=N -m softmine.commands.train ...``: every rank
trains on its own P x K batches (or, with ``sampler.split_across_ranks``, on its
P/N classes of each one-process batch); embeddings and labels are all-gathered
with a differentiable all-gather, so the pair loss sees the whole global batch and
the gradients equal those of one process on the concatenated batch (DDP then
averages the parameter gradients). ``trainer.sync_bn`` synchronises BatchNorm
statistics too (:mod:`softmine.engine.sync_bn`). Only rank 0 writes files.
User guide: ``docs/distributed.md``.

Under SLURM through submitit (``hydra/launcher=slurm`` with ``tasks_per_node > 1``)
each task of the job runs the training function; submitit exports no torch rank
variables, so :func:`export_submitit_ranks` sets them from the job's environment
(``submitit.helpers.TorchDistributedEnvironment``) and the tasks join the process
group there, inside the job, never on the host that submitted it.

Before evaluating, every rank takes rank 0's BatchNorm running statistics
(:func:`broadcast_buffers`): each rank updates them on its own batches, so without
this the ranks would embed their test shards with slightly different networks,
and rank 0's checkpoint would not be the network ``metrics.json`` describes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

RUN_STAMP_ENV = "SOFTMINE_RUN_STAMP"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistEnv:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()


def init_from_env() -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise).

    NCCL when CUDA is available, gloo otherwise. Rank 0 also picks the run's
    timestamp and shares it, so every rank resolves the same Hydra run folder.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistEnv()
    if dist.is_initialized():
        return DistEnv.current()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    stamp = [datetime.now().strftime("%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP_ENV] = stamp[0]
    return DistEnv.current()


def export_submitit_ranks() -> bool:
    """Inside a multi-task submitit SLURM job, export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.

    Uses ``submitit.helpers.TorchDistributedEnvironment`` (rank = ``SLURM_PROCID``,
    world = ``SLURM_NTASKS``, master = the job's first node, port derived from the
    job id unless ``MASTER_PORT`` is set). ``CUDA_VISIBLE_DEVICES`` is left alone: each
    rank uses ``cuda:LOCAL_RANK``. Returns True if it exported; a no-op (False) outside
    submitit, for a single task, or when ``torchrun`` already set the ranks.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src)


def run_stamp() -> str:
    """``<date>/<time>`` of this run, the same on every rank (the OmegaConf resolver ``run_stamp``)."""
    return os.environ.get(RUN_STAMP_ENV) or datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to this rank's part.

    Every rank computes the same loss of the gathered batch, so the summed gradient
    of a rank's slice is ``world_size`` times the true one; DDP's averaging of the
    parameter gradients divides it back. Needs the same shape on every rank (P x K
    batches guarantee it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the same sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over every rank, differentiable (``x`` itself in one process).

    The gradient reaching a rank's ``x`` is the sum of the gradients of the sum on
    every rank, the convention of :func:`gather_with_grad` and DDP. (The same as
    ``torch.distributed.nn.functional.all_reduce``, which recent torch deprecates.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the value of its mean over ranks, and the gradient of this rank's ``x``.

    For a loss term that is a mean over this rank's share of the batch (equal
    shares), the value becomes that of the whole global batch, the same on every
    rank, while DDP's averaging of the parameter gradients already gives the
    global batch's gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    mean = x.detach().clone()
    dist.all_reduce(mean, op=dist.ReduceOp.SUM)
    return x + (mean / dist.get_world_size() - x.detach())


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor without gradient (labels, say) from every rank along dim 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps ranks in step on interrupts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Items ``rank, rank + world, ...`` of ``dataset`` (the whole dataset in one process)."""
    if not env.enabled:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))


def gather_shards(parts: tuple[np.ndarray, ...], n: int, env: DistEnv) -> tuple[np.ndarray, ...]:
    """Reassemble arrays computed on :func:`shard` pieces into dataset order, on every rank."""
    if not env.enabled:
        return parts
    gathered: list[tuple[np.ndarray, ...] | None] = [None] * env.world_size
    dist.all_gather_object(gathered, parts)
    out = []
    for k in range(len(parts)):
        first = gathered[0][k]
        full = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for r, piece in enumerate(gathered):
            full[r :: env.world_size] = piece[k]
        out.append(full)
    return tuple(out)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
