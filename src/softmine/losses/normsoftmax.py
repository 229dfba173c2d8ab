"""Normalised-softmax (cosine classifier) cross-entropy.

Zhai, Wu. "Classification is a Strong Baseline for Deep Metric Learning". BMVC 2019.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import EPS, check_inputs, common_float, full_precision, unit_rows


def normalized_softmax_loss(
    embeddings: Tensor, labels: Tensor, class_weights: Tensor, *, temperature: float = 0.05
) -> Tensor:
    """Cross-entropy of the logits cos(x_i, w_k) / temperature, mean over the batch.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels in 0..num_classes-1.
        class_weights: (num_classes, dim) class proxies (normalised here).
        temperature: sigma of the paper (0.05).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    if class_weights.dim() != 2 or class_weights.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"class_weights must be (num_classes, {embeddings.shape[1]}), "
            f"got {tuple(class_weights.shape)}"
        )
    with full_precision(embeddings):
        e, w = common_float(embeddings, class_weights)
        logits = unit_rows(e) @ F.normalize(w, dim=1, eps=EPS).T / temperature
        return F.cross_entropy(logits, labels.long())


class NormSoftmaxLoss(MetricLoss):
    """Normalised softmax with its own class proxies (config ``loss=normsoftmax``).

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        temperature: logit temperature (0.05 in the paper).
    """

    classification_term = True  # a cross-entropy over cosine class proxies

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
        if embedding_dim is None or int(embedding_dim) < 1:
            raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
        if not temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0 (got {temperature}); paper: 0.05")
        self.temperature = temperature
        bound = 1.0 / math.sqrt(int(embedding_dim))
        weights = torch.empty(int(num_classes), int(embedding_dim)).uniform_(-bound, bound)
        self.class_weights = nn.Parameter(weights)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return normalized_softmax_loss(
            embeddings, labels, self.class_weights, temperature=self.temperature
        )
