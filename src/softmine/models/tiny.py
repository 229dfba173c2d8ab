"""A small CNN trunk for tiny images (the embedded 8x8 digits sets)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from softmine.errors import ConfigError

POOLS = ("global", "grid")


class TinyCNN(nn.Module):
    """Three 3x3 conv blocks (a 2x2 max-pool after the second), then a pooling.

    ``pool="global"`` averages the last feature map to one vector
    (``out_features = 2 * width``): it keeps *what* the image shows but not *where*, so
    an image and the same image with its left and right halves swapped look alike to it.
    ``pool="grid"`` averages the map over a ``grid`` of cells and keeps them in order
    (``out_features = 2 * width * rows * cols``): the layout survives into the embedding
    head, which is what ``digits_pairs`` needs, whose class is the *ordered* pair
    (left digit, right digit).

    Args:
        in_channels: image channels (1 for digits).
        width: channels of the first block; later blocks use ``2 * width``.
        pool: ``global`` | ``grid``.
        grid: (rows, cols) of the ``grid`` pooling (``digits_pairs``' 4 x 8 map -> 2 x 4 cells).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        pool: str = "global",
        grid: Sequence[int] = (2, 4),
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"backbone.trunk.pool must be one of {POOLS}, got {pool!r}")
        rows, cols = (int(v) for v in grid)
        if pool == "grid" and (rows < 1 or cols < 1):
            raise ConfigError(f"backbone.trunk.grid must be two sizes >= 1, got {list(grid)}")
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
        )
        cells = 1 if pool == "global" else rows * cols
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1 if pool == "global" else (rows, cols)),
            nn.Flatten(),
        )
        self.out_features = w2 * cells

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x))
