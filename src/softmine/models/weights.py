"""Reading pretrained weights from a file or URL and loading them with clear errors.

``.pth`` checkpoints are read with ``torch.load``; Caffe ``.caffemodel`` files are
converted on the fly by :mod:`softmine.models.caffe`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from softmine.errors import DataError
from softmine.models.caffe import CaffeStateDict, caffemodel_to_state_dict

_WRAPPER_KEYS = ("state_dict", "model")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_state_dict(source: str) -> dict[str, Tensor]:
    """A state dict from a local file or an ``http(s)://`` URL (cached by torch.hub).

    Checkpoint wrappers (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped
    and a DataParallel ``module.`` prefix is stripped. A ``*.caffemodel`` file (or URL,
    downloaded once into the torch hub cache) is converted with
    :func:`~softmine.models.caffe.caffemodel_to_state_dict`; the result remembers each
    key's Caffe layer, for the errors of :func:`load_matching_state_dict`.
    """
    source = str(source)
    is_caffe = source.lower().endswith(".caffemodel")
    try:
        if is_url(source) and not is_caffe:
            obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        else:
            path = _download_cached(source) if is_url(source) else Path(source).expanduser()
            if not path.is_file():
                raise DataError(
                    f"pretrained weights file {str(path)!r} does not exist; give an existing "
                    ".pth or .caffemodel file, a URL, or backbone.pretrained=true for the "
                    "default weights"
                )
            if is_caffe:
                return caffemodel_to_state_dict(path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (URLError, OSError) as e:
        kind = "caffemodel" if is_caffe else "pth"
        raise DataError(
            f"could not fetch pretrained weights from {source} ({e}); without internet access, "
            f"download the file elsewhere and set backbone.pretrained=/path/to/file.{kind}, "
            "or train from scratch with backbone.pretrained=false"
        ) from e
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # not a checkpoint file
        raise DataError(
            f"{source} is not a readable PyTorch weights file ({e}); Caffe weights are read "
            "from files named *.caffemodel"
        ) from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DataError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _download_cached(url: str) -> Path:
    """The file at ``url`` in the torch hub cache (``<hub dir>/checkpoints``), fetched once."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)  # via a temporary file
    return path


def load_matching_state_dict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str = "weights",
    skip_prefixes: tuple[str, ...] = (),
    new_prefixes: tuple[str, ...] = (),
    allow_missing: bool = False,
) -> list[str]:
    """Copy ``state`` into ``model``, requiring every key and shape to match.

    Args:
        skip_prefixes: keys of ``state`` the model does not have on purpose (a dropped
            classifier, unbuilt modules); ignored.
        new_prefixes: keys of the model that ``state`` cannot have (new layers); they
            keep their initialisation.
        allow_missing: keys of the model that ``state`` lacks keep their initialisation
            instead of being an error (a partial load; the caller says so).

    Returns the model's keys that ``state`` lacked (beyond ``new_prefixes``), which kept
    their initialisation: empty unless ``allow_missing``.

    BatchNorm ``num_batches_tracked`` counters may be absent (files from old PyTorch),
    and a tensor stored with extra singleton dimensions, e.g. BatchNorm statistics
    saved as (1, C) instead of (C,), is reshaped, since its values are the same.
    Anything else missing, unexpected or mis-shaped raises a :class:`DataError` that
    names the offending keys (with their Caffe layers for a converted ``.caffemodel``).
    """
    own = model.state_dict()
    to_load: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: dict[str, str] = {}  # key -> "file (..) vs model (..)"
    for k, v in state.items():
        if k.startswith(skip_prefixes):
            continue
        if k not in own:
            unexpected.append(k)
            continue
        target = own[k].shape
        if v.shape != target:
            if v.numel() == own[k].numel() and v.squeeze().shape == own[k].squeeze().shape:
                v = v.reshape(target)
            else:
                mismatched[k] = f"file {tuple(v.shape)} vs model {tuple(target)}"
                continue
        to_load[k] = v
    missing = [
        k
        for k in own
        if k not in to_load
        and k not in mismatched
        and not k.startswith(new_prefixes)
        and not k.endswith("num_batches_tracked")
    ]
    if unexpected or (missing and not allow_missing) or mismatched:
        parts = []
        for what, keys in (
            ("unexpected", unexpected),
            ("missing", [] if allow_missing else missing),
            ("mis-shaped", list(mismatched)),
        ):
            if keys:
                examples = [
                    _label(state, k, what, mismatched.get(k)) for k in _one_per_module(keys)
                ]
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(examples)})")
        raise DataError(
            f"the weights in {source} do not fit {type(model).__name__}: {'; '.join(parts)}; "
            "check that the file holds weights of this architecture"
        )
    model.load_state_dict(to_load, strict=False)
    return missing


def _one_per_module(keys: list[str], n: int = 3) -> list[str]:
    """The first ``n`` keys of distinct modules (a layer's weight, bias, statistics count once)."""
    seen: dict[str, str] = {}
    for k in keys:
        seen.setdefault(k.rpartition(".")[0], k)
        if len(seen) == n:
            break
    return list(seen.values())


def _label(state: Mapping[str, Tensor], key: str, what: str, shapes: str | None) -> str:
    """``key`` (+ its shapes), with the Caffe layer it came from, or for a missing key the
    Caffe layer of its module, when ``state`` was converted from a ``.caffemodel``."""
    shapes = "" if shapes is None else f": {shapes}"
    if not isinstance(state, CaffeStateDict):
        return f"{key}{shapes}"
    origin = state.describe(key)
    if what != "missing":
        return f"{key} from {origin}{shapes}"
    return f"{key} (not in the {origin})" if origin else f"{key} (no Caffe layer gives it)"
