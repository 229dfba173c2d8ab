"""BN-Inception (GoogLeNet V2), the paper's backbone, with ImageNet weights from the Caffe port.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (https://arxiv.org/abs/1502.03167).

Module names (hence state-dict keys) and shapes follow the community's converted
ImageNet weights ``bn_inception-52deb4733.pth`` published with Cadene's
``pretrainedmodels`` package, so that file loads as it is: ``conv1_7x7_s2``,
``inception_3a_1x1_bn``, ``inception_4e_double_3x3_2``, ``last_linear`` ... Every
convolution is followed by BatchNorm and ReLU; in Cadene's port it has a bias.

The authors of the OSM + CAA paper fine-tuned another GoogLeNet-BN, lim0606's
(``train_val.prototxt`` of github.com/lim0606/caffe-googlenet-bn): convolutions without
bias (``conv_bias=False``), 96-channel pool projections in ``inception_4c`` and ``4d``
(``widths="googlenet_bn"``), and two auxiliary branches after ``inception_3c`` and
``inception_4e`` (``features=``, Caffe ``loss1/*`` and ``loss2/*``); its ``.caffemodel``
loads through :func:`softmine.models.weights.read_state_dict`.

Input convention of those weights: **BGR, 0..255, minus the mean pixel
(104, 117, 128), std 1**, 224 x 224. Feed RGB [0, 1] images through
:data:`BNINCEPTION_INPUT_NORM` (``configs/backbone/bninception.yaml`` does).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError, DataError
from softmine.models.weights import load_matching_state_dict, read_state_dict

log = logging.getLogger(__name__)

BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"

#: ``InputNormalize`` arguments for the converted Caffe weights (BGR, 0..255, minus mean pixel).
BNINCEPTION_INPUT_NORM: dict[str, Any] = {
    "mean": (104.0, 117.0, 128.0),
    "std": (1.0, 1.0, 1.0),
    "scale": 255.0,
    "channel_order": "bgr",
}

#: Named features the trunk can hand out (``features=``, ``embedding_from=``): ``pool5`` is the
#: global average of ``inception_5b``; ``inception_3c`` and ``inception_4e`` are the outputs of the
#: auxiliary branches GoogLeNet-BN attaches after those modules (the Caffe ``loss1/*`` and
#: ``loss2/*`` layers up to their ``fc/bn`` + ReLU).
FEATURES = ("pool5", "inception_3c", "inception_4e")
#: Accepted for ``embedding_from``: the old name of the authors' ``inception_4e`` branch.
_ALIASES = {"inception_4e_aux": "inception_4e"}
#: Caffe-name prefix of each auxiliary branch (lim0606's and the authors' prototxts).
BRANCH_PREFIX = {"inception_3c": "loss1", "inception_4e": "loss2"}
#: Spatial grid of each branch after its 5x5/3 average pool, for 224 x 224 inputs.
BRANCH_GRID = {"inception_3c": 4, "inception_4e": 2}


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
# lim0606's GoogLeNet-BN (caffe-googlenet-bn train_val.prototxt, also the authors' train.prototxt):
# 96-channel pool projections in 4c and 4d (Cadene's port: 128), so 576 channels enter 4d and
# 4e and 1024 enter 5a.
_GOOGLENET_BN_BLOCKS = (
    _Block("inception_3a", 192, 64, (64, 64), (64, 96, 96), "avg", 32),
    _Block("inception_3b", 256, 64, (64, 96), (64, 96, 96), "avg", 64),
    _Block("inception_3c", 320, None, (128, 160), (64, 96, 96), "max", None, stride=2),
    _Block("inception_4a", 576, 224, (64, 96), (96, 128, 128), "avg", 128),
    _Block("inception_4b", 576, 192, (96, 128), (96, 128, 128), "avg", 128),
    _Block("inception_4c", 576, 160, (128, 160), (128, 160, 160), "avg", 96),
    _Block("inception_4d", 576, 96, (128, 192), (160, 192, 192), "avg", 96),
    _Block("inception_4e", 576, None, (128, 192), (192, 256, 256), "max", None, stride=2),
    _Block("inception_5a", 1024, 352, (192, 320), (160, 224, 224), "avg", 128),
    _Block("inception_5b", 1024, 352, (192, 320), (192, 224, 224), "max", 128),
)
#: Inception module widths by name (``widths=``): Cadene's port or lim0606's GoogLeNet-BN.
WIDTHS = {"pretrainedmodels": _BLOCKS, "googlenet_bn": _GOOGLENET_BN_BLOCKS}

BRANCH_CHANNELS = 128  # the 1x1 convolution of each auxiliary branch
FEATURE_DIM = 1024  # pool5 width, and the width of the branches' fc layers in GoogLeNet-BN


class BNInception(nn.Module):
    """BN-Inception as an ImageNet classifier or as a feature trunk with named features.

    Args:
        pretrained: ``False``/``None``: random init; ``True``: the converted ImageNet
            weights from :data:`BNINCEPTION_URL` (downloaded once into the torch hub
            cache); a string: a local ``.pth`` / ``.caffemodel`` file or an ``http(s)://``
            URL of one (see :func:`softmine.models.weights.read_state_dict`).
        num_classes: 0 (default): no classifier, ``forward`` returns features of size
            ``out_features``; 1000: the ImageNet classifier ``last_linear`` on pool5
            (``forward`` returns logits).
        embedding_from: which named feature ``forward`` returns: ``pool5`` (the paper's
            feature, 1024-d) or ``inception_4e`` (the authors' released code: the branch
            after ``inception_4e``, whose output is their embedding ``loss2/fc/bn/sc``).
        features: further named features to compute, handed out by
            :meth:`forward_features` (heads of a loss attach to them): any of
            :data:`FEATURES`. ``pool5`` keeps ``inception_5a/5b``; without it (and with
            ``embedding_from=inception_4e``) they are not built.
        conv_bias: convolutions with a bias (Cadene's port) or without (lim0606's
            GoogLeNet-BN, which the authors fine-tuned; each is followed by BatchNorm, so
            a bias only shifts the BN input: loading a file with biases into a model
            without folds each bias into its BN running mean, exactly).
        branch_dim: width of the ``fc`` layer of the ``inception_4e`` branch (1024 in
            GoogLeNet-BN); the ``inception_3c`` branch keeps 1024.
        widths: inception module widths (:data:`WIDTHS`): ``pretrainedmodels`` (Cadene's
            port) or ``googlenet_bn`` (lim0606's network, which the authors fine-tuned:
            96-channel pool projections in 4c and 4d instead of 128).
        partial_load: what to do when ``pretrained`` lacks layers the network has (an
            auxiliary branch, as in Cadene's port; the ``Scale`` (gamma, beta) of a Caffe
            ``BatchNorm``; any other module): ``False`` (default) stops with a
            :class:`~softmine.errors.DataError` naming them; ``True`` loads the rest and
            leaves them at their initialisation, with a warning listing them.

    Auxiliary branch after module X (``inception_3c``: Caffe ``loss1/*``; ``inception_4e``:
    ``loss2/*``): 5x5/3 average pool (ceil mode, as Caffe) -> 1x1 conv 128 -> BN -> ReLU ->
    fc (no bias) -> BN -> ReLU. On 224 x 224 inputs the pooled grid is 4 x 4 (3c) and
    2 x 2 (4e); smaller inputs (>= 96 px) are brought to that grid by adaptive average
    pooling so the fc layers keep their ImageNet shapes (tests use this; at 224 it is
    the identity).

    ``out_features``: the size of ``embedding_from`` (1024 / ``branch_dim``).
    """

    def __init__(
        self,
        pretrained: bool | str | None = False,
        num_classes: int = 0,
        embedding_from: str = "pool5",
        features: Sequence[str] = (),
        conv_bias: bool = True,
        branch_dim: int = FEATURE_DIM,
        widths: str = "pretrainedmodels",
        partial_load: bool = False,
    ) -> None:
        super().__init__()
        embedding_from = _ALIASES.get(embedding_from, embedding_from)
        wanted = [embedding_from, *features]
        bad = [f for f in wanted if f not in FEATURES]
        if bad:
            raise ConfigError(
                f"backbone.trunk.embedding_from / features must be among {FEATURES} (got {bad[0]!r})"
            )
        if num_classes and embedding_from != "pool5":
            raise ConfigError(
                "the ImageNet classifier (num_classes > 0) needs embedding_from=pool5"
            )
        if widths not in WIDTHS:
            raise ConfigError(
                f"backbone.trunk.widths must be one of {tuple(WIDTHS)} (got {widths!r})"
            )
        if isinstance(branch_dim, bool) or int(branch_dim) < 1:
            raise ConfigError(f"backbone.trunk.branch_dim must be >= 1 (got {branch_dim!r})")
        self.embedding_from = embedding_from
        self.features = tuple(dict.fromkeys(wanted))
        self.num_classes = int(num_classes)
        self.conv_bias = bool(conv_bias)
        if not isinstance(partial_load, bool):
            raise ConfigError(
                f"backbone.trunk.partial_load must be true or false (got {partial_load!r})"
            )
        self.partial_load = partial_load

        self._conv_bn("conv1_7x7_s2", 3, 64, 7, stride=2)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self._conv_bn("conv2_3x3_reduce", 64, 64, 1)
        self._conv_bn("conv2_3x3", 64, 192, 3)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        needs_5 = "pool5" in self.features or self.num_classes > 0
        last = (
            "inception_5b"
            if needs_5
            else "inception_4e"
            if "inception_4e" in wanted
            else "inception_3c"
        )
        self.blocks: list[_Block] = []
        for block in WIDTHS[widths]:
            self._add_block(block)
            self.blocks.append(block)
            if block.name == last:
                break
        c_out = {b.name: b.c_out for b in self.blocks}
        self.feature_dims: dict[str, int] = {}
        for name in ("inception_3c", "inception_4e"):
            if name in self.features:
                width = int(branch_dim) if name == "inception_4e" else FEATURE_DIM
                self._add_branch(name, c_out[name], width)
                self.feature_dims[name] = width
        if needs_5:
            self.feature_dims["pool5"] = c_out["inception_5b"]
        self.out_features = self.feature_dims.get(embedding_from, FEATURE_DIM)
        if self.num_classes:
            self.last_linear = nn.Linear(c_out["inception_5b"], self.num_classes)

        if not isinstance(pretrained, bool | str) and pretrained is not None:
            raise ConfigError(
                f"backbone.pretrained must be true, false, a file path or a URL (got {pretrained!r})"
            )
        if pretrained:
            self.load_pretrained(BNINCEPTION_URL if pretrained is True else pretrained)

    def _conv_bn(self, name: str, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=self.conv_bias)
        setattr(self, name, conv)
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

    def _add_branch(self, after: str, c_in: int, width: int) -> None:
        """The auxiliary branch after module ``after`` (Caffe ``lossK/conv``, ``lossK/fc`` + BN)."""
        p, grid = BRANCH_PREFIX[after], BRANCH_GRID[after]
        self._conv_bn(f"{p}_conv", c_in, BRANCH_CHANNELS, 1)
        setattr(self, f"{p}_fc", nn.Linear(BRANCH_CHANNELS * grid * grid, width, bias=False))
        setattr(self, f"{p}_fc_bn", nn.BatchNorm1d(width))

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

    def _branch(self, after: str, m: Tensor) -> Tensor:
        p, grid = BRANCH_PREFIX[after], BRANCH_GRID[after]
        if min(m.shape[-2:]) < 3:
            raise ValueError(
                f"the {after} branch needs inputs of at least 96 x 96 (got a {after} map of "
                f"{tuple(m.shape[-2:])}; its 5x5/3 pool needs 3 x 3)"
            )
        a = F.avg_pool2d(m, 5, stride=3, ceil_mode=True)
        if a.shape[-2:] != (grid, grid):
            a = F.adaptive_avg_pool2d(a, grid)
        a = self._cbr(f"{p}_conv", a).flatten(1)
        fc: nn.Linear = getattr(self, f"{p}_fc")
        bn: nn.BatchNorm1d = getattr(self, f"{p}_fc_bn")
        return F.relu(bn(fc(a)), inplace=True)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.pool1_3x3_s2(self._cbr("conv1_7x7_s2", x))
        x = self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x))
        return self.pool2_3x3_s2(x)

    def feature_map(self, x: Tensor) -> Tensor:
        """Output map of the last inception module built (5b, or 4e / 3c without pool5)."""
        x = self._stem(x)
        for b in self.blocks:
            x = self._block(b, x)
        return x

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(n, 3, H, W) normalised images -> (output of :meth:`forward`, every feature in
        ``self.features`` by name, each (n, dim))."""
        out: dict[str, Tensor] = {}
        x = self._stem(x)
        for b in self.blocks:
            x = self._block(b, x)
            if b.name in BRANCH_PREFIX and b.name in self.features:
                out[b.name] = self._branch(b.name, x)
        if "pool5" in self.feature_dims:
            out["pool5"] = x.mean(dim=(2, 3))
        if self.num_classes:
            return self.last_linear(out["pool5"]), out
        return out[self.embedding_from], out

    def forward(self, x: Tensor) -> Tensor:
        """(n, 3, H, W) normalised images -> (n, out_features) features, or logits."""
        return self.forward_features(x)[0]

    def load_pretrained(self, source: str) -> None:
        """Load converted ImageNet weights (Cadene's ``.pth``, lim0606's ``.caffemodel``, ...).

        Keys the model lacks on purpose are skipped (``last_linear`` without a
        classifier, ``inception_5*`` without pool5, the ImageNet auxiliary classifiers,
        branches not built). Conv biases in the file of a bias-free model are folded
        into the following BN's running mean. Layers the network has and the file
        lacks (a whole auxiliary branch, as in Cadene's port; a Caffe ``BatchNorm``
        without its ``Scale``, whose gamma and beta would silently be 1 and 0; any
        other module) are a :class:`~softmine.errors.DataError` naming them, unless
        ``partial_load``: then they keep their initialisation and one warning lists
        them. Anything unexpected or mis-shaped is a :class:`~softmine.errors.DataError`.
        """
        state = read_state_dict(source)
        self._check_widths(state, source)
        if not self.conv_bias:
            state = fold_conv_biases(state)
        skip = ["loss1_classifier.", "loss2_classifier."]
        if not self.num_classes:
            skip.append("last_linear.")
        built_blocks = {b.name for b in self.blocks}
        skip += [f"{b.name}_" for b in _BLOCKS if b.name not in built_blocks]
        skip += [f"{p}_" for n, p in BRANCH_PREFIX.items() if n not in self.feature_dims]
        built = [BRANCH_PREFIX[n] for n in self.feature_dims if n in BRANCH_PREFIX]
        absent = [p for p in built if not any(k.startswith(f"{p}_") for k in state)]
        own = self.state_dict()
        unscaled = set(getattr(state, "bn_without_scale", ()))  # a converted .caffemodel's
        no_scale = sorted(
            (key.removesuffix(".weight"), layer)
            for key, layer in getattr(state, "origin", {}).items()
            if layer in unscaled and key.endswith(".weight") and key in own
        )
        if (absent or no_scale) and not self.partial_load:
            raise DataError(self._incomplete(source, absent, no_scale))
        new = tuple(f"{p}_" for p in absent)
        missing = load_matching_state_dict(
            self,
            state,
            source=source,
            skip_prefixes=tuple(skip),
            new_prefixes=new,
            allow_missing=self.partial_load,
        )
        if absent or no_scale or missing:
            self._warn_partial(source, absent, no_scale, missing)

    def _branch_what(self, prefix: str) -> str:
        """``the auxiliary branch loss2 (Caffe loss2/conv, loss2/fc + BatchNorm; the embedding)``."""
        role = ", the embedding" if BRANCH_PREFIX.get(self.embedding_from) == prefix else ""
        return (
            f"the auxiliary branch {prefix} (Caffe {prefix}/conv, {prefix}/fc and their "
            f"BatchNorm layers{role})"
        )

    def _incomplete(self, source: str, absent: list[str], no_scale: list[tuple[str, str]]) -> str:
        """The one-line error for weights that lack branches or BatchNorm Scale layers."""
        parts = [self._branch_what(p) for p in absent]
        if no_scale:
            names = ", ".join(repr(layer) for _, layer in no_scale[:5])
            more = f" and {len(no_scale) - 5} more" if len(no_scale) > 5 else ""
            parts.append(
                f"the Scale layer (gamma, beta) of {len(no_scale)} BatchNorm layer(s): {names}{more}"
            )
        return (
            f"the weights in {source} lack {'; and '.join(parts)}; use a file that has them "
            "(lim0606's googlenet_bn caffemodel has every layer) or set "
            "backbone.trunk.partial_load=true to start them from their initialisation"
        )

    def _warn_partial(
        self,
        source: str,
        absent: list[str],
        no_scale: list[tuple[str, str]],
        missing: list[str],
    ) -> None:
        """One warning listing every module ``partial_load`` left at its initialisation."""
        parts = []
        for p in absent:
            modules = sorted(
                {k.partition(".")[0] for k in self.state_dict() if k.startswith(f"{p}_")}
            )
            parts.append(f"{self._branch_what(p)}: random ({', '.join(modules)})")
        if no_scale:
            bns = ", ".join(f"{m} ({layer!r})" for m, layer in no_scale)
            parts.append(f"gamma 1 and beta 0 of the BatchNorm layers without a Scale layer: {bns}")
        if missing:
            modules = sorted({k.rpartition(".")[0] for k in missing})
            parts.append(f"further modules at their initialisation: {', '.join(modules)}")
        log.warning(
            "backbone.trunk.partial_load: %s lacks layers of the network, which keep their "
            "initialisation: %s",
            source,
            "; ".join(parts),
        )

    def _check_widths(self, state: dict[str, Tensor], source: str) -> None:
        """A file of the other inception widths is one error that names the ``widths`` to set."""
        proj = state.get("inception_4c_pool_proj.weight")
        ours = getattr(self, "inception_4c_pool_proj", None)
        if proj is None or ours is None or proj.shape[0] == ours.out_channels:
            return
        fits = [
            name
            for name, blocks in WIDTHS.items()
            if any(b.name == "inception_4c" and b.proj == proj.shape[0] for b in blocks)
        ]
        hint = f"set backbone.trunk.widths={fits[0]}" if fits else "the file is another network"
        raise DataError(
            f"the weights in {source} have {proj.shape[0]}-channel pool projections in "
            f"inception_4c, the model {ours.out_channels}: {hint}"
        )


def fold_conv_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop conv biases, moving each into the running mean of the BatchNorm that follows it.

    BN(conv(x) + b) = BN'(conv(x)) with BN' = BN whose running mean is lowered by b: in
    training the batch mean absorbs b exactly, in eval mode the shifted mean does.
    """
    out = copy.copy(state)  # the same mapping type: a converted .caffemodel keeps its origins
    for key in [k for k in state if k.endswith(".bias") and f"{k[:-5]}_bn.running_mean" in state]:
        bn_mean = f"{key[:-5]}_bn.running_mean"
        out[bn_mean] = state[bn_mean] - state[key].reshape(state[bn_mean].shape)
        del out[key]
    return out
