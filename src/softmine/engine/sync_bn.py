"""Synchronised BatchNorm (``trainer.sync_bn``): training statistics of the batch of all ranks.

Under ``torchrun`` each rank normalises its own share of the batch, so a plain
BatchNorm layer computes its mean and variance over 1/N of the images that one
process would see. :func:`convert_sync_batchnorm` swaps every BatchNorm layer for
one whose statistics are those of the whole global batch: ``torch.nn.SyncBatchNorm``
on CUDA, and :class:`CpuSyncBatchNorm` elsewhere (torch's refuses CPU tensors).
Parameters and buffers keep their names, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from softmine.engine.distributed import DistEnv, all_reduce_with_grad
from softmine.errors import ConfigError

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of every rank, on any device and process-group backend.

    In training mode under torch.distributed the per-channel sum, sum of squares
    and count of this rank's input are summed over ranks with a differentiable
    all_reduce, giving the mean and biased variance of the global batch; gradients
    flow back to every rank's input (summed over ranks, as DDP expects). The sums
    are taken around the running mean (the same on every rank) to keep the
    variance accurate when the mean is large. The running statistics are updated
    as ``nn.BatchNorm`` does (momentum, or the cumulative average when momentum is
    None; unbiased variance). In eval mode, or in one process, it is plain BatchNorm.
    Accepts (n, C), (n, C, L), (n, C, H, W) and (n, C, D, H, W) input.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and DistEnv.current().enabled):
            return super().forward(input)
        self._check_input_dim(input)
        c = self.num_features
        shape = (1, c) + (1,) * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        if self.running_mean is not None:
            shift = self.running_mean.detach().to(x.dtype)
        else:
            shift = x.new_zeros(c)
        centred = x - shift.view(shape)
        count = x.new_full((1,), x.numel() // c)
        total = all_reduce_with_grad(
            torch.cat((centred.sum(dims), centred.square().sum(dims), count))
        )
        n = total[-1]
        if float(n) <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.shape}"
            )
        mean_c = total[:c] / n
        var = (total[c : 2 * c] / n - mean_c.square()).clamp_min(0.0)
        mean = mean_c + shift
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            with torch.no_grad():
                unbiased = var * (n / (n - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised across ranks (unchanged in one process).

    Uses ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` elsewhere. The
    new layers take over the old ones' parameter and buffer objects (an optimizer
    built before the conversion keeps working) and their train/eval mode. Call it
    before wrapping the model in DDP. Only ``nn.BatchNorm1d/2d/3d`` are converted:
    a BatchNorm subclass with extra behaviour (timm's ``BatchNormAct2d``, say) is an error,
    since replacing it would drop that behaviour.
    """
    if not DistEnv.current().enabled:
        return module
    layer = nn.SyncBatchNorm if device.type == "cuda" else CpuSyncBatchNorm
    return _convert(module, layer)


def _convert(module: nn.Module, layer: type[_BatchNorm]) -> nn.Module:
    if isinstance(module, _BatchNorm) and type(module) in PLAIN_BATCHNORMS:
        new = layer(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        return new.train(module.training)
    if isinstance(module, _BatchNorm) and not isinstance(
        module, (CpuSyncBatchNorm, nn.SyncBatchNorm)
    ):
        raise ConfigError(
            f"trainer.sync_bn=true cannot synchronise the {type(module).__name__} layers of "
            "this model (only torch's BatchNorm1d/2d/3d are converted); set trainer.sync_bn=false"
        )
    for name, child in module.named_children():
        module.add_module(name, _convert(child, layer))
    return module
