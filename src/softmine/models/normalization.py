"""Input normalisation: RGB images in [0, 1] -> the input convention a trunk was trained with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from softmine.errors import ConfigError

CHANNEL_ORDERS = ("rgb", "bgr")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalize(nn.Module):
    """``y = (reorder(x) * scale - mean) / std`` per channel, channels at dim -3.

    The input is an RGB image batch in [0, 1] (what ``ToTensor`` gives), of shape
    (..., C, H, W): one image, a batch or a batch of clips. Integer tensors (uint8
    images in 0..255) are accepted and divided by 255 first. ``mean`` and ``std``
    are given in the *output* channel order, after the reordering.

    Examples:
        torchvision / timm ImageNet models: ``mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225)``.
        BN-Inception (Caffe port): ``channel_order="bgr", scale=255,
        mean=(104, 117, 128), std=(1, 1, 1)``, i.e. BGR in 0..255 minus the mean pixel.

    Args:
        mean: per-channel value subtracted after scaling.
        std: per-channel divisor.
        scale: multiplies the [0, 1] input first (255 for 0..255 models).
        channel_order: ``rgb`` keeps the channels, ``bgr`` reverses them.

    Usable both as the ``input_norm`` of :class:`~softmine.models.EmbeddingNet` (runs
    on the model's device) and as the last transform of a dataset.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale: float = 1.0,
        channel_order: str = "rgb",
    ) -> None:
        super().__init__()
        if channel_order not in CHANNEL_ORDERS:
            raise ConfigError(
                f"input_norm.channel_order must be one of {CHANNEL_ORDERS} (got {channel_order!r})"
            )
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape:
            raise ConfigError(
                f"input_norm.mean and input_norm.std must be lists of equal length "
                f"(got {list(mean)} and {list(std)})"
            )
        if not bool((std_t > 0).all()):
            raise ConfigError(f"input_norm.std must be > 0 (got {list(std)})")
        self.channels = mean_t.numel()
        self.channel_order = channel_order
        self.scale = float(scale)
        # y = x * a + b with a = scale / std, b = -mean / std (one fused multiply-add)
        self.register_buffer("a", (self.scale / std_t).view(-1, 1, 1), persistent=False)
        self.register_buffer("b", (-mean_t / std_t).view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ValueError(
                f"input_norm expects images (..., {self.channels}, H, W) with channels at "
                f"dim -3, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.float() / 255.0
        if self.channel_order == "bgr":
            x = x.flip(-3)
        return torch.addcmul(self.b.to(x.dtype), x, self.a.to(x.dtype))

    def extra_repr(self) -> str:
        mean = (-self.b / self.a * self.scale).flatten().tolist()
        return f"channel_order={self.channel_order}, scale={self.scale}, mean={[round(m, 4) for m in mean]}"
