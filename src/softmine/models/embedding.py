"""Embedding network: a trunk (any backbone) followed by a linear embedding head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError


class EmbeddingNet(nn.Module):
    """trunk -> (dropout) -> linear -> (BatchNorm1d) -> L2 normalisation.

    Args:
        trunk: module mapping a batch of inputs to (n, trunk.out_features) features.
        embedding_dim: size of the embedding (the paper uses 512 / 1024).
        head_bn: BatchNorm1d after the linear layer.
        normalize: L2-normalise the output (cosine geometry, as the losses expect).
    """

    def __init__(
        self,
        trunk: nn.Module,
        embedding_dim: int = 128,
        head_bn: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if embedding_dim is None or int(embedding_dim) <= 0:
            raise ConfigError(
                f"backbone.embedding_dim must be a positive integer (got {embedding_dim})"
            )
        in_features = getattr(trunk, "out_features", None)
        if not isinstance(in_features, int):
            raise ConfigError(
                f"the trunk {type(trunk).__name__} must expose an integer `out_features`"
            )
        self.trunk = trunk
        self.embedding_dim = int(embedding_dim)
        self.head = nn.Linear(in_features, self.embedding_dim)
        self.head_bn = nn.BatchNorm1d(self.embedding_dim) if head_bn else nn.Identity()
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        z = self.head_bn(self.head(self.trunk(x)))
        return F.normalize(z, dim=1) if self.normalize else z
