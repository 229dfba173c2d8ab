"""Feature trunks from torchvision and timm: an ImageNet classifier with its classifier removed."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError, DataError
from softmine.models.normalization import InputNormalize
from softmine.models.weights import is_url, load_matching_state_dict, read_state_dict


def _check_pretrained(pretrained: object) -> None:
    if not isinstance(pretrained, bool | str) and pretrained is not None:
        raise ConfigError(
            f"backbone.pretrained must be true, false or a weights name (got {pretrained!r})"
        )


def _strip_classifier(model: nn.Module) -> int:
    """Replace the model's last ``nn.Linear`` (its classifier) by Identity; returns its in_features."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return linear.in_features


def _drop_aux_heads(model: nn.Module) -> None:
    """Remove auxiliary classifiers (GoogLeNet ``aux1/aux2``, Inception-v3 ``AuxLogits``).

    With them gone the model returns a plain tensor in training mode too, and DDP
    sees no parameters without gradients.
    """
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, attr):
                setattr(model, attr, None)


POOLINGS = ("avg", "max", "avg+max")


class GlobalPool(nn.Module):
    """Global pooling of (n, c, h, w) maps to (n, c, 1, 1): average, maximum, or their sum.

    ``avg+max`` is the pooling of Proxy-Anchor's ResNet-50 (Kim et al., CVPR 2020, code
    ``net/resnet.py``: ``gap(x) + gmp(x)``), used by most recent metric-learning recipes.
    """

    def __init__(self, mode: str = "avg") -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ConfigError(f"backbone.trunk.pooling must be one of {POOLINGS} (got {mode!r})")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "avg":
            return F.adaptive_avg_pool2d(x, 1)
        if self.mode == "max":
            return F.adaptive_max_pool2d(x, 1)
        return F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def _set_pooling(model: nn.Module, arch: str, pooling: str) -> None:
    """Replace the model's global average pooling (``avgpool``) by :class:`GlobalPool`."""
    if pooling == "avg":
        return
    pool = getattr(model, "avgpool", None)
    size = getattr(pool, "output_size", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or size not in (1, (1, 1)):
        raise ConfigError(
            f"backbone.trunk.pooling={pooling} replaces a global average pooling layer "
            f"`avgpool`, which {arch} does not have; use a ResNet, GoogLeNet, Inception-v3, "
            "EfficientNet or ResNeXt, or pooling=avg"
        )
    model.avgpool = GlobalPool(pooling)


def is_weights_file(name: str) -> bool:
    """Whether a ``backbone.pretrained`` string names a file or URL rather than a weights enum."""
    return is_url(name) or "/" in name or "\\" in name or name.endswith((".pth", ".pt"))


def offline_hint(arch: str, weights: Any, error: BaseException) -> str:
    """The one line a failed download of torchvision weights gives: the file, where it goes,
    and the two ways to run without the network."""
    url = str(getattr(weights, "url", "") or "")
    name = url.rsplit("/", 1)[-1] or f"{arch}.pth"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not download the {arch} ImageNet weights {weights} ({error}); without internet "
        f"access fetch {url or name} elsewhere and either put it in {cache} (the torch hub "
        f"cache; set TORCH_HOME to move it) or give backbone.pretrained=/path/to/{name}, "
        "or train from random weights with backbone.pretrained=false"
    )


def _load_file(model: nn.Module, source: str) -> None:
    """Load a torchvision state dict from a file or URL into ``model`` (classifier included
    or not: a file without it leaves the classifier that is removed next at its init)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    classifier = (f"{linears[-1]}.",) if linears else ()
    load_matching_state_dict(model, read_state_dict(source), source=source, new_prefixes=classifier)


class TorchvisionTrunk(nn.Module):
    """Any torchvision classification model by name, with its classifier removed.

    Args:
        arch: model name in ``torchvision.models.list_models(module=torchvision.models)``,
            e.g. ``resnet18``, ``resnet50``, ``googlenet``.
        pretrained: ``True``: the ImageNet weights torchvision recommends (``DEFAULT``);
            a string: a member of the model's weights enum (e.g. ``IMAGENET1K_V1``);
            a ``.pth`` file path or ``http(s)://`` URL: a state dict of the same torchvision
            model (its classifier may be absent), for machines without internet access;
            ``False``: random init. Weights are downloaded once into the torch hub cache
            (``$TORCH_HOME/hub/checkpoints``); a failed download is one :class:`DataError`
            that names the file, the URL and both offline options (:func:`offline_hint`).
        pooling: global pooling of the last feature map: ``avg`` (the model's own),
            ``max``, or ``avg+max`` (their sum, Proxy-Anchor's ResNet-50); see :class:`GlobalPool`.
        **kwargs: passed to the torchvision model constructor.

    ``out_features`` is the input size of the removed classifier (512 for ResNet-18,
    2048 for ResNet-50, 1024 for GoogLeNet). Inputs are RGB images normalised with the
    ImageNet mean and std (the backbone configs do that with their ``input_norm``;
    GoogLeNet with pretrained weights re-maps that input internally itself).
    """

    def __init__(
        self, arch: str, pretrained: bool | str = False, pooling: str = "avg", **kwargs: Any
    ) -> None:
        super().__init__()
        import torchvision.models as tvm

        _check_pretrained(pretrained)
        if pooling not in POOLINGS:
            raise ConfigError(f"backbone.trunk.pooling must be one of {POOLINGS} (got {pooling!r})")
        names = tvm.list_models(module=tvm)
        if arch not in names:
            raise ConfigError(
                f"unknown torchvision model {arch!r}; choose one of {', '.join(names)}"
            )
        weights, weights_file = None, None
        if pretrained:
            enum = tvm.get_model_weights(arch)
            key = "DEFAULT" if pretrained is True else str(pretrained)
            if key in enum.__members__:
                weights = enum[key]
            elif is_weights_file(key):
                weights_file = key
            else:
                raise ConfigError(
                    f"{arch} has no weights {key!r}; choose true, one of "
                    f"{list(enum.__members__)}, or a .pth file path or URL"
                )
        try:
            with warnings.catch_warnings():
                # GoogLeNet warns that its default init will change; irrelevant here.
                warnings.filterwarnings("ignore", category=FutureWarning)
                model = tvm.get_model(arch, weights=weights, **kwargs)
        except (URLError, OSError) as e:
            raise DataError(offline_hint(arch, weights, e)) from e
        if weights_file is not None:
            _load_file(model, weights_file)
        _drop_aux_heads(model)
        _set_pooling(model, arch, pooling)
        self.out_features = _strip_classifier(model)
        self.arch = arch
        self.weights = weights_file if weights is None else str(weights)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class TimmTrunk(nn.Module):
    """Any timm model by name, without classifier (timm is an optional dependency).

    Args:
        name: a name in ``timm.list_models()``, e.g. ``resnet50``, ``convnext_tiny``,
            ``vit_small_patch16_224``.
        pretrained: download the model's default pretrained weights (Hugging Face hub).
        normalize_input: normalise RGB [0, 1] input with the mean and std of the model's
            own pretrained config (these differ between timm models), so the backbone
            config leaves ``input_norm`` empty.
        **kwargs: passed to ``timm.create_model``.

    ``out_features`` is the size of the pooled features timm returns with ``num_classes=0``.
    """

    def __init__(
        self, name: str, pretrained: bool = False, normalize_input: bool = True, **kwargs: Any
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ConfigError(
                "backbone=timm needs the optional package timm; install it with "
                "`pip install 'softmine[timm]'` (or `pip install timm`)"
            ) from e
        if not isinstance(pretrained, bool):
            raise ConfigError(
                f"backbone.pretrained must be true or false for timm (got {pretrained!r})"
            )
        if not timm.is_model(name):
            close = difflib.get_close_matches(str(name), timm.list_models(), n=8, cutoff=0.6)
            hint = f"similar names: {', '.join(close)}" if close else "see timm.list_models()"
            raise ConfigError(f"unknown timm model {name!r}; {hint}")
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except (URLError, OSError) as e:
            raise DataError(
                f"could not download the pretrained weights of timm model {name} ({e}); "
                "set backbone.pretrained=false or make the Hugging Face hub reachable"
            ) from e
        self.out_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.input_norm: nn.Module = nn.Identity()
        if normalize_input:
            self.input_norm = InputNormalize(
                mean=cfg.get("mean", (0.485, 0.456, 0.406)),
                std=cfg.get("std", (0.229, 0.224, 0.225)),
            )
        self.name = name
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.input_norm(x))
