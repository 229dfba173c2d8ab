"""A small CNN trunk for tiny images (the embedded 8x8 digits set)."""

from __future__ import annotations

from torch import Tensor, nn


class TinyCNN(nn.Module):
    """Three 3x3 conv blocks and global average pooling; ``out_features = 2 * width``.

    Args:
        in_channels: image channels (1 for digits).
        width: channels of the first block; later blocks use ``2 * width``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w2 = 2 * width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, w2),
            nn.MaxPool2d(2),
            block(w2, w2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = w2

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)
