"""Export the embedding network to ONNX or TorchScript, and check the file against PyTorch.

The exported network is the whole :class:`~softmine.models.EmbeddingNet`: input
normalisation, trunk and head (L2-normalised output when the run normalises); for
a video model, its frame network (one image = a one-frame tracklet). Its
input is ``images``: float32 (N, C, H, W) in [0, 1], RGB (or grayscale for 1-channel
models), already through the run's test transform (resize and crop to H x W);
N is dynamic, H and W are fixed at the size the run tested on. Its output is
``embeddings``: (N, D) float32.

After writing the file it is loaded back (onnxruntime, or ``torch.jit.load``) and
run on random inputs of batch sizes 1 and 3; the largest absolute difference from
PyTorch is reported and must stay within ``tolerance``.

Both formats carry the preprocessing a serving stack must reproduce, as JSON
(:func:`preprocessing`): the ONNX file in its metadata (``metadata_props`` key
``preprocessing``), the TorchScript file as the extra file ``preprocessing.json``
(``torch.jit.load(path, _extra_files={"preprocessing.json": ""})``). It is read from
the run's own test transform and the network's input normalisation, not restated.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from softmine.errors import ConfigError, SoftmineError
from softmine.inference.image_files import to_uint8_tensor
from softmine.inference.model import LoadedModel
from softmine.models import InputNormalize

EXPORT_FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
CHECK_BATCHES = (1, 3)  # batch sizes of the check: neither is the traced one (2)
PROBE_SIZE = 320  # side of the blank image put through the test transform to find H x W
PREPROCESSING_KEY = "preprocessing"  # ONNX metadata key of the preprocessing JSON
PREPROCESSING_FILE = "preprocessing.json"  # its TorchScript extra file
METADATA_FILE = "softmine.json"  # TorchScript extra file of what the ONNX metadata also holds
#: Transforms that change the type of an image, not its values (left out of the steps).
TYPE_ONLY = {"ToImage", "PILToTensor", "ToPureTensor", "Identity"}


class ExportMismatchError(SoftmineError):
    """The exported file does not reproduce PyTorch's embeddings within the tolerance."""


@dataclass
class ExportReport:
    """Where the file went, the input shape of one image (C, H, W), and the check's max abs difference."""

    path: Path
    format: str
    input_shape: tuple[int, int, int]
    max_abs_diff: float


def input_shape(loaded: LoadedModel, size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one input image: ``size`` if given, else what the run's test transform makes.

    Without a test transform (images used as stored, e.g. digits), the shape of the
    first test item of the run's dataset.
    """
    c = loaded.channels
    if size is not None:
        h, w = (int(v) for v in size)
        if h < 1 or w < 1:
            raise ConfigError(f"--input-size must be two positive integers (got {size})")
        return c, h, w
    if loaded.transform is not None:
        blank = Image.new("L" if c == 1 else "RGB", (PROBE_SIZE, PROBE_SIZE))
        shape = tuple(to_uint8_tensor(loaded.transform(blank)).shape)
        if len(shape) == 3:
            return int(shape[0]), int(shape[1]), int(shape[2])
    try:
        from softmine.inference.extract import run_split, split_names

        split = split_names(loaded.config)[0]
        first = run_split(loaded, split)[0][0]
        if isinstance(first, torch.Tensor) and first.dim() == 3:
            return int(first.shape[0]), int(first.shape[1]), int(first.shape[2])
    except (SoftmineError, IndexError, OSError):
        pass
    raise ConfigError(
        "cannot tell the input size of this model (no resize in its test transform and its "
        "dataset is not here); give it with --input-size H W"
    )


def export_model(
    loaded: LoadedModel,
    fmt: str,
    out: str | Path,
    *,
    input_size: tuple[int, int] | None = None,
    tolerance: float = 1e-4,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Write the network of ``loaded`` to ``out`` as ``onnx`` or ``torchscript`` and check it."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {EXPORT_FORMATS} (got {fmt!r})")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-o {out}: cannot create its folder ({e.strerror or e})") from None
    shape = input_shape(loaded, input_size)
    net = copy.deepcopy(loaded.embedder).cpu().eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand((2, *shape), generator=gen)
    checks = [torch.rand((n, *shape), generator=gen) for n in CHECK_BATCHES]
    with torch.no_grad():
        want = [net(x).numpy() for x in checks]
    if fmt == "onnx":
        _export_onnx(net, example, out, opset, loaded)
        got = _run_onnx(out, checks)
    else:
        _export_torchscript(net, example, out, _metadata(loaded, shape))
        got = _run_torchscript(out, checks)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    if not diff <= tolerance:
        raise ExportMismatchError(
            f"the exported {out} differs from PyTorch by up to {diff:.3g} (> tolerance {tolerance:g}) "
            "on random inputs; the file is kept for inspection, do not ship it"
        )
    return ExportReport(out, fmt, shape, diff)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f"--format onnx needs the package {module}; pip install 'softmine[export]'"
        ) from None


def _export_onnx(
    net: nn.Module, example: torch.Tensor, out: Path, opset: int | None, loaded: LoadedModel
) -> None:
    onnx = _require("onnx")
    _require("onnxscript")
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": int(opset)}
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            torch.onnx.export(
                net,
                (example,),
                str(out),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
                **kwargs,
            )
    except (
        Exception
    ) as e:  # the exporter raises many types; one line, the traceback under SOFTMINE_DEBUG
        raise SoftmineError(
            f"ONNX export failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
            "try --format torchscript, or set SOFTMINE_DEBUG=1 for the traceback"
        ) from e
    model = onnx.load(str(out))
    for key, value in _metadata(loaded, tuple(example.shape[1:])).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))


def _metadata(loaded: LoadedModel, shape: tuple[int, ...]) -> dict[str, str]:
    """The strings both formats carry: softmine's version, the input, the model, the preprocessing."""
    from softmine import __version__

    c, h, w = (int(v) for v in shape)
    return {
        "softmine_version": __version__,
        "input": "images: float32 (N, C, H, W) in [0, 1] after the run's test transform",
        "input_shape": f"{c}x{h}x{w}",
        **{f"model_{k}": str(v) for k, v in loaded.describe().items()},
        PREPROCESSING_KEY: json.dumps(preprocessing(loaded, (c, h, w))),
    }


def preprocessing(loaded: LoadedModel, shape: tuple[int, int, int]) -> dict[str, Any]:
    """What a serving stack does to an image file before the exported network, and what the
    network then does itself, read from the run's test transform and its input normalisation.

    Keys: ``image_mode`` (decode to ``RGB``, or ``L`` for 1-channel networks); ``steps``
    (the test transform, in order: ``resize`` with ``size`` as torchvision means it, one
    number = the shorter side, and ``interpolation``, ``center_crop``, ...; empty when the
    run used its images as stored); the summary ``resize``, ``resize_mode``
    (``shorter_side`` | ``exact``), ``interpolation`` and ``crop`` ([H, W] or None);
    ``input`` (the file's input: name, dtype, layout, shape, ``channel_order``,
    ``value_range`` [0, 1]); ``normalization`` (done inside the network, so not to be
    applied again: ``channel_order`` the trunk sees, ``value_range`` it scales to,
    ``mean`` and ``std`` in that channel order; None when the network takes its input
    as it is).
    """
    c, h, w = shape
    steps = transform_steps(loaded.transform)
    sized = [s["size"] for s in steps if s["op"] == "center_crop" or s.get("mode") == "exact"]
    if sized and sized[-1] != [h, w]:  # --input-size changed what the network takes
        steps.append(
            {
                "op": "resize",
                "size": [h, w],
                "mode": "exact",
                "interpolation": "bilinear",
                "antialias": True,
                "max_size": None,
                "note": "--input-size of the export",
            }
        )
    resize = next((s for s in steps if s["op"] == "resize"), None)
    crop = next((s for s in steps if s["op"] == "center_crop"), None)
    norms = [m for m in loaded.model.modules() if isinstance(m, InputNormalize)]
    order = "gray" if c == 1 else "RGB"
    return {
        "image_mode": "L" if c == 1 else "RGB",
        "steps": steps,
        "resize": None if resize is None else resize["size"],
        "resize_mode": None if resize is None else resize["mode"],
        "interpolation": None if resize is None else resize["interpolation"],
        "crop": None if crop is None else crop["size"],
        "input": {
            "name": "images",
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["N", c, h, w],
            "channel_order": order,
            "value_range": [0.0, 1.0],
        },
        "normalization": _normalization(norms[0], c) if norms else None,
    }


def _normalization(norm: InputNormalize, channels: int) -> dict[str, Any]:
    """What ``norm`` does, in the terms of a serving stack's config: y = (x * scale - mean) / std."""
    std = (norm.scale / norm.a).flatten()
    mean = (-norm.b * (norm.scale / norm.a)).flatten()
    return {
        "in_model": True,
        "channel_order": "gray" if channels == 1 else norm.channel_order.upper(),
        "value_range": [0.0, norm.scale],
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
    }


def transform_steps(transform: Any) -> list[dict[str, Any]]:
    """The steps of a test transform (a torchvision ``Compose`` or one transform) as plain dicts;
    type conversions that keep the values (``ToImage``, ...) are left out."""
    if transform is None:
        return []
    inner = getattr(transform, "transforms", None)  # Compose: a list (a ListConfig from Hydra)
    if isinstance(inner, Sequence) and not isinstance(inner, str):
        return [step for t in inner for step in transform_steps(t)]
    name = type(transform).__name__
    if name in TYPE_ONLY:
        return []
    if name == "Resize":
        size = [int(v) for v in _as_list(transform.size)]
        return [
            {
                "op": "resize",
                "size": size[0] if len(size) == 1 else size,
                "mode": "shorter_side" if len(size) == 1 else "exact",
                "interpolation": _interpolation(transform.interpolation),
                "antialias": bool(getattr(transform, "antialias", True)),
                "max_size": getattr(transform, "max_size", None),
            }
        ]
    if name == "CenterCrop":
        size = [int(v) for v in _as_list(transform.size)]
        return [{"op": "center_crop", "size": size * 2 if len(size) == 1 else size}]
    if name == "Normalize":
        return [{"op": "normalize", "mean": list(transform.mean), "std": list(transform.std)}]
    if isinstance(transform, InputNormalize):
        return [{"op": "normalize", **_normalization(transform, transform.channels)}]
    if name in ("ToDtype", "ConvertImageDtype", "ToTensor"):
        return [{"op": "to_float", "scale_to_unit": bool(getattr(transform, "scale", True))}]
    return [{"op": name, "repr": repr(transform)}]


def _as_list(size: Any) -> list[Any]:
    return list(size) if isinstance(size, Sequence) else [size]


def _interpolation(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(["embeddings"], {"images": x.numpy()})[0] for x in inputs]


def _export_torchscript(
    net: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]
) -> None:
    """The traced network, with the preprocessing and the rest of ``meta`` as extra files."""
    meta = dict(meta)
    extra = {PREPROCESSING_FILE: meta.pop(PREPROCESSING_KEY), METADATA_FILE: json.dumps(meta)}
    with warnings.catch_warnings():  # PyTorch marks TorchScript deprecated; the format still loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files=extra)


def _run_torchscript(path: Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [module(x).numpy() for x in inputs]


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporter's progress lines and warnings (the check below reports the outcome)."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield
