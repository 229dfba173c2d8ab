"""BN-Inception (GoogLeNet V2), the paper's backbone, with ImageNet weights from the Caffe port.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (https://arxiv.org/abs/1502.03167).

Module names (hence state-dict keys) and shapes follow the community's converted
ImageNet weights ``bn_inception-52deb4733.pth`` published with Cadene's
``pretrainedmodels`` package, so that file loads as it is: ``conv1_7x7_s2``,
``inception_3a_1x1_bn``, ``inception_4e_double_3x3_2``, ``last_linear`` ... Every
convolution has a bias and is followed by BatchNorm and ReLU.

Input convention of those weights: **BGR, 0..255, minus the mean pixel
(104, 117, 128), std 1**, 224 x 224. Feed RGB [0, 1] images through
:data:`BNINCEPTION_INPUT_NORM` (``configs/backbone/bninception.yaml`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.models.weights import load_matching_state_dict, read_state_dict

BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"

#: ``InputNormalize`` arguments for the converted Caffe weights (BGR, 0..255, minus mean pixel).
BNINCEPTION_INPUT_NORM: dict[str, Any] = {
    "mean": (104.0, 117.0, 128.0),
    "std": (1.0, 1.0, 1.0),
    "scale": 255.0,
    "channel_order": "bgr",
}

EMBEDDING_FROM = ("pool5", "inception_4e_aux")


@dataclass(frozen=True)
class _Block:
    """One inception module: which branches it has and their widths.

    ``c1x1``: 1x1 branch width (None: no such branch).
    ``c3x3``: (reduce, out) of the 1x1 -> 3x3 branch.
    ``d3x3``: (reduce, out1, out2) of the 1x1 -> 3x3 -> 3x3 branch.
    ``pool``: ``avg`` | ``max``; ``proj``: 1x1 projection after the pool (None: none).
    ``stride``: 2 for the grid-reduction modules 3c and 4e (3x3 convs and pool), else 1.
    """

    name: str
    c_in: int
    c1x1: int | None
    c3x3: tuple[int, int]
    d3x3: tuple[int, int, int]
    pool: str
    proj: int | None
    stride: int = 1

    @property
    def c_out(self) -> int:
        pooled = self.proj if self.proj is not None else self.c_in
        return (self.c1x1 or 0) + self.c3x3[1] + self.d3x3[2] + pooled


_BLOCKS = (
    _Block("inception_3a", 192, 64, (64, 64), (64, 96, 96), "avg", 32),
    _Block("inception_3b", 256, 64, (64, 96), (64, 96, 96), "avg", 64),
    _Block("inception_3c", 320, None, (128, 160), (64, 96, 96), "max", None, stride=2),
    _Block("inception_4a", 576, 224, (64, 96), (96, 128, 128), "avg", 128),
    _Block("inception_4b", 576, 192, (96, 128), (96, 128, 128), "avg", 128),
    _Block("inception_4c", 576, 160, (128, 160), (128, 160, 160), "avg", 128),
    _Block("inception_4d", 608, 96, (128, 192), (160, 192, 192), "avg", 128),
    _Block("inception_4e", 608, None, (128, 192), (192, 256, 256), "max", None, stride=2),
    _Block("inception_5a", 1056, 352, (192, 320), (160, 224, 224), "avg", 128),
    _Block("inception_5b", 1024, 352, (192, 320), (192, 224, 224), "max", 128),
)

AUX_CHANNELS = 128
AUX_GRID = 2


class BNInception(nn.Module):
    """BN-Inception as an ImageNet classifier or as a feature trunk.

    Args:
        pretrained: ``False``/``None``: random init; ``True``: the converted ImageNet
            weights from :data:`BNINCEPTION_URL` (downloaded once into the torch hub
            cache); a string: a local ``.pth`` file or an ``http(s)://`` URL of them.
        num_classes: 0 (default): no classifier, ``forward`` returns features of size
            ``out_features``; 1000: the ImageNet classifier ``last_linear`` (the full
            network of the converted weights; ``forward`` returns logits).
        embedding_from: ``pool5``: global average of ``inception_5b`` (1024-d, the
            paper's feature). ``inception_4e_aux``: the authors' Caffe code, whose
            embedding comes from the auxiliary branch after ``inception_4e``: 5x5/3
            average pool -> 1x1 conv (128) -> BN -> ReLU, flattened over a 2x2 grid
            (512-d; the embedding head on top gives their 1024-d ``loss2/fc``). The
            5a/5b modules are not built then. That branch is new (random init); it
            needs inputs of at least 96 px (224 as in the paper).

    ``out_features``: 1024 (``pool5``) or 512 (``inception_4e_aux``).
    """

    def __init__(
        self,
        pretrained: bool | str | None = False,
        num_classes: int = 0,
        embedding_from: str = "pool5",
    ) -> None:
        super().__init__()
        if embedding_from not in EMBEDDING_FROM:
            raise ConfigError(
                f"backbone.trunk.embedding_from must be one of {EMBEDDING_FROM} "
                f"(got {embedding_from!r})"
            )
        if num_classes and embedding_from != "pool5":
            raise ConfigError(
                "the ImageNet classifier (num_classes > 0) needs embedding_from=pool5"
            )
        self.embedding_from = embedding_from
        self.num_classes = int(num_classes)

        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(64)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2_3x3_reduce = nn.Conv2d(64, 64, 1)
        self.conv2_3x3_reduce_bn = nn.BatchNorm2d(64)
        self.conv2_3x3 = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2_3x3_bn = nn.BatchNorm2d(192)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        last = "inception_5b" if embedding_from == "pool5" else "inception_4e"
        self.blocks: list[_Block] = []
        for block in _BLOCKS:
            self._add_block(block)
            self.blocks.append(block)
            if block.name == last:
                break

        if embedding_from == "pool5":
            self.out_features = self.blocks[-1].c_out
        else:
            self.aux_pool = nn.AvgPool2d(5, stride=3, ceil_mode=True)
            self.aux_conv = nn.Conv2d(self.blocks[-1].c_out, AUX_CHANNELS, 1, bias=False)
            self.aux_conv_bn = nn.BatchNorm2d(AUX_CHANNELS)
            self.aux_grid = nn.AdaptiveAvgPool2d(AUX_GRID)
            self.out_features = AUX_CHANNELS * AUX_GRID * AUX_GRID
        if self.num_classes:
            self.last_linear = nn.Linear(self.out_features, self.num_classes)

        if not isinstance(pretrained, bool | str) and pretrained is not None:
            raise ConfigError(
                f"backbone.pretrained must be true, false, a file path or a URL (got {pretrained!r})"
            )
        if pretrained:
            self.load_pretrained(BNINCEPTION_URL if pretrained is True else pretrained)

    def _conv_bn(self, name: str, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        setattr(self, name, nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(c_out))

    def _add_block(self, b: _Block) -> None:
        n = b.name
        if b.c1x1 is not None:
            self._conv_bn(f"{n}_1x1", b.c_in, b.c1x1, 1)
        self._conv_bn(f"{n}_3x3_reduce", b.c_in, b.c3x3[0], 1)
        self._conv_bn(f"{n}_3x3", b.c3x3[0], b.c3x3[1], 3, b.stride)
        self._conv_bn(f"{n}_double_3x3_reduce", b.c_in, b.d3x3[0], 1)
        self._conv_bn(f"{n}_double_3x3_1", b.d3x3[0], b.d3x3[1], 3)
        self._conv_bn(f"{n}_double_3x3_2", b.d3x3[1], b.d3x3[2], 3, b.stride)
        if b.pool == "max":
            pad = 1 if b.stride == 1 else 0
            pool: nn.Module = nn.MaxPool2d(3, stride=b.stride, padding=pad, ceil_mode=True)
        else:
            pool = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        setattr(self, f"{n}_pool", pool)
        if b.proj is not None:
            self._conv_bn(f"{n}_pool_proj", b.c_in, b.proj, 1)

    def _cbr(self, name: str, x: Tensor) -> Tensor:
        """conv -> BN -> ReLU of the layer called ``name``."""
        conv: Callable[[Tensor], Tensor] = getattr(self, name)
        bn: Callable[[Tensor], Tensor] = getattr(self, f"{name}_bn")
        return F.relu(bn(conv(x)), inplace=True)

    def _block(self, b: _Block, x: Tensor) -> Tensor:
        n = b.name
        outs = []
        if b.c1x1 is not None:
            outs.append(self._cbr(f"{n}_1x1", x))
        outs.append(self._cbr(f"{n}_3x3", self._cbr(f"{n}_3x3_reduce", x)))
        d = self._cbr(f"{n}_double_3x3_reduce", x)
        outs.append(self._cbr(f"{n}_double_3x3_2", self._cbr(f"{n}_double_3x3_1", d)))
        p = getattr(self, f"{n}_pool")(x)
        outs.append(self._cbr(f"{n}_pool_proj", p) if b.proj is not None else p)
        return torch.cat(outs, 1)

    def feature_map(self, x: Tensor) -> Tensor:
        """Output map of the last inception module built (5b, or 4e with the aux branch)."""
        x = self.pool1_3x3_s2(self._cbr("conv1_7x7_s2", x))
        x = self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x))
        x = self.pool2_3x3_s2(x)
        for b in self.blocks:
            x = self._block(b, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(n, 3, H, W) normalised images -> (n, out_features) features, or logits."""
        m = self.feature_map(x)
        if self.embedding_from == "pool5":
            f = m.mean(dim=(2, 3))
        else:
            if min(m.shape[-2:]) < 3:
                raise ValueError(
                    "embedding_from=inception_4e_aux needs inputs of at least 96 x 96 "
                    f"(got an inception_4e map of {tuple(m.shape[-2:])}, its pool needs 3 x 3)"
                )
            a = F.relu(self.aux_conv_bn(self.aux_conv(self.aux_pool(m))), inplace=True)
            f = self.aux_grid(a).flatten(1)
        return self.last_linear(f) if self.num_classes else f

    def load_pretrained(self, source: str) -> None:
        """Load the converted ImageNet weights from a file path or URL.

        Keys the model lacks (``last_linear`` without a classifier, ``inception_5*``
        with the aux branch) are skipped; the model's new layers (aux branch) keep
        their initialisation; anything else missing or mis-shaped is a
        :class:`~softmine.errors.DataError`.
        """
        skip = ["last_linear."] if not self.num_classes else []
        if self.embedding_from != "pool5":
            skip += ["inception_5a_", "inception_5b_"]
        load_matching_state_dict(
            self,
            read_state_dict(source),
            source=source,
            skip_prefixes=tuple(skip),
            new_prefixes=("aux_",),
        )
