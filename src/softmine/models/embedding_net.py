"""Embedding network: a trunk (any backbone) followed by a linear embedding head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from softmine.errors import ConfigError
from softmine.models.features import FeatureInfo


def freeze_batchnorm(module: nn.Module) -> int:
    """Freeze every BatchNorm layer inside ``module``; returns how many were frozen.

    Frozen means: affine weight and bias stop requiring gradients, and the layer is
    put in eval mode, so it normalises with its running statistics and never updates
    them. Eval mode alone does not survive a later ``module.train()``; models that
    own frozen layers re-apply :func:`set_batchnorm_eval` in their ``train`` (as
    :class:`EmbeddingNet` does). Every ``_BatchNorm`` subclass counts, including
    ``SyncBatchNorm`` and timm's ``BatchNormAct2d``.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            n += 1
    set_batchnorm_eval(module)
    return n


def set_batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer inside ``module`` in eval mode (running statistics)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _check_embedding_dim(embedding_dim: object) -> int:
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ConfigError(
            f"backbone.embedding_dim must be a positive integer (got {embedding_dim!r}); "
            "typical values are 128, 512 or 1024"
        )
    return embedding_dim


def set_batchnorm_momentum(module: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BatchNorm layer inside ``module``.

    PyTorch's ``momentum`` is the weight of the new batch: Caffe's
    ``moving_average_fraction`` m corresponds to ``1 - m`` (the authors' 0.999 -> 0.001).
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = momentum


class EmbeddingNet(nn.Module):
    """input_norm -> trunk -> dropout -> linear -> (BatchNorm1d) -> (ReLU) -> L2 normalisation.

    Named features: :meth:`forward_features` returns the embedding and a dict of
    tensors that heads of a loss can read by name (``feature_dims`` gives their
    sizes): ``trunk`` (the trunk's output), ``embedding`` (the head's output before
    L2 normalisation), and every named feature the trunk hands out itself (a trunk
    with ``forward_features(x) -> (output, dict)`` and ``feature_dims``, e.g. BN-Inception's
    ``pool5`` / ``inception_3c`` / ``inception_4e``). :attr:`feature_info` declares them
    to the training objective.

    Args:
        trunk: module mapping a batch of inputs to (n, trunk.out_features) features.
        embedding_dim: size of the embedding (the paper uses 512; the authors' code 1024).
        head_bn: BatchNorm1d after the linear layer.
        head: the linear embedding layer; False: the trunk's output is the embedding
            (``embedding_dim`` must equal its size; ``head_bn``/``head_relu`` still apply),
            as for the authors' BN-Inception, whose embedding branch is part of the trunk.
        normalize: L2-normalise the output (cosine geometry, as the losses expect).
        head_relu: ReLU after the head (and its BN), before the L2 normalisation: the
            authors' Caffe embedding ``loss2/fc/bn/sc`` is rectified in place.
        dropout: dropout probability on the trunk features (0: none).
        frozen_bn: freeze every BatchNorm layer of the trunk (eval mode and no gradients,
            also after ``model.train()``); the head's own BatchNorm still trains.
        input_norm: module applied to the raw input first, converting RGB images in
            [0, 1] to what the trunk was trained on (see
            :class:`softmine.models.InputNormalize`); None: the input goes in as it is.
        name: short name of the backbone, used in reports.
        pretrained: what the trunk was initialised from, recorded for reports; the
            trunk config reads the same key (``${..pretrained}``) and does the loading.
        bn_momentum: running-statistics momentum of every BatchNorm layer (None: PyTorch's
            0.1); see :func:`set_batchnorm_momentum`.
    """

    def __init__(
        self,
        trunk: nn.Module,
        embedding_dim: int = 128,
        head_bn: bool = False,
        normalize: bool = True,
        *,
        head_relu: bool = False,
        dropout: float = 0.0,
        frozen_bn: bool = False,
        input_norm: nn.Module | None = None,
        name: str | None = None,
        pretrained: bool | str | None = None,
        head: bool = True,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = _check_embedding_dim(embedding_dim)
        in_features = getattr(trunk, "out_features", None)
        if not isinstance(in_features, int):
            raise ConfigError(
                f"the trunk {type(trunk).__name__} must expose an integer `out_features`"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"backbone.dropout must lie in [0, 1) (got {dropout})")
        self.name, self.pretrained = name, pretrained
        self.input_norm = input_norm if input_norm is not None else nn.Identity()
        self.trunk = trunk
        self.dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        if head:
            self.head: nn.Module = nn.Linear(in_features, self.embedding_dim)
        elif in_features != self.embedding_dim:
            raise ConfigError(
                f"backbone.head=false uses the trunk's output ({in_features}-d) as the embedding: "
                f"set backbone.embedding_dim={in_features} (got {self.embedding_dim})"
            )
        else:
            self.head = nn.Identity()
        self.head_bn = nn.BatchNorm1d(self.embedding_dim) if head_bn else nn.Identity()
        self.head_relu = nn.ReLU() if head_relu else nn.Identity()
        self.normalize = normalize
        self.frozen_bn = bool(frozen_bn)
        if self.frozen_bn:
            freeze_batchnorm(self.trunk)
        if bn_momentum is not None:
            if not 0.0 < float(bn_momentum) <= 1.0:
                raise ConfigError(
                    f"backbone.bn_momentum must lie in (0, 1] or be null (got {bn_momentum}); "
                    "Caffe's moving_average_fraction m is 1 - m here (0.999 -> 0.001)"
                )
            set_batchnorm_momentum(self, float(bn_momentum))
        trunk_dims = getattr(trunk, "feature_dims", None)
        self._trunk_has_features = isinstance(trunk_dims, dict) and hasattr(
            trunk, "forward_features"
        )
        #: sizes of the named features of :meth:`forward_features`
        self.feature_dims: dict[str, int] = {
            **(dict(trunk_dims) if self._trunk_has_features else {}),
            "trunk": in_features,
            "embedding": self.embedding_dim,
        }

    #: features per frame (a video model); see :class:`~softmine.models.FeatureInfo`
    per_frame = False

    @property
    def feature_info(self) -> FeatureInfo:
        """What this model offers the objective: its named features and their widths."""
        return FeatureInfo(
            name=self.name or type(self).__name__,
            features=dict(self.feature_dims),
            per_frame=self.per_frame,
            frame_loss=self.per_frame,
        )

    def train(self, mode: bool = True) -> EmbeddingNet:
        """Switch train/eval mode; frozen trunk BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            set_batchnorm_eval(self.trunk)
        return self

    def trunk_features(self, x: Tensor) -> Tensor:
        """(n, trunk.out_features) trunk features of a raw input batch."""
        return self.trunk(self.input_norm(x))

    def embed(self, features: Tensor) -> Tensor:
        """Head applied to trunk features: (n, embedding_dim), before L2 normalisation."""
        return self.head_relu(self.head_bn(self.head(self.dropout(features))))

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(self.trunk_features(x))
        return F.normalize(z, dim=1) if self.normalize else z

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The embedding (as :meth:`forward`) and the named features (see the class doc)."""
        x = self.input_norm(x)
        if self._trunk_has_features:
            t, trunk_feats = self.trunk.forward_features(x)
            feats = dict(trunk_feats)
        else:
            t = self.trunk(x)
            feats = {}
        z = self.embed(t)
        feats["trunk"], feats["embedding"] = t, z
        return (F.normalize(z, dim=1) if self.normalize else z), feats
