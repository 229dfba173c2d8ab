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
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
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

EXPORT_FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
CHECK_BATCHES = (1, 3)  # batch sizes of the check: neither is the traced one (2)
PROBE_SIZE = 320  # side of the blank image put through the test transform to find H x W


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
        _export_torchscript(net, example, out)
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
    from softmine import __version__

    meta = {
        "softmine_version": __version__,
        "input": "images: float32 (N, C, H, W) in [0, 1] after the run's test transform",
        "input_shape": "x".join(str(s) for s in example.shape[1:]),
        **{f"model_{k}": str(v) for k, v in loaded.describe().items()},
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(["embeddings"], {"images": x.numpy()})[0] for x in inputs]


def _export_torchscript(net: nn.Module, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings():  # PyTorch marks TorchScript deprecated; the format still loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        traced.save(str(out))


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
