"""Caffe ``.caffemodel`` weights, read without Caffe and renamed for softmine's BN-Inception.

A ``.caffemodel`` is a binary protobuf ``NetParameter``: a list of layers, each with a
name, a type and its parameter blobs. The few message types needed to read it are
built here at run time from ``descriptor_pb2`` with the field numbers of Caffe's
``src/caffe/proto/caffe.proto``; every other field of the file (layer settings,
learning rates, data sources) is skipped as an unknown field. No Caffe and no
compiled ``caffe_pb2`` are needed, only the ``protobuf`` package.

Read: the new ``layer`` list and the old V1 ``layers`` list, blob shapes given as
``shape`` or as the legacy num/channels/height/width, values in ``data`` (float) or
``double_data``. Converted: ``Convolution``, ``InnerProduct`` and BatchNorm in two
layouts: Caffe's own ``BatchNorm`` layer (mean * s, variance * s, s) with the ``Scale``
layer after it (gamma, beta), and the older custom ``BN`` layer (scale, shift and, when
stored, mean and variance) of ChenglongChen's ``batch_normalization``, lim0606's early
``caffe-dev`` fork and the authors' Caffe fork. Layers without blobs (ReLU, pooling,
concat, data, losses) carry nothing to convert and are passed over.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from torch import Tensor

from softmine.errors import DataError, StorageError

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "softmine_caffe"

# (field name, field number, type, repeated, message type name, packed) for each message,
# with the numbers of Caffe's caffe.proto. Only what the conversion reads is declared.
_SCHEMA: dict[str, list[tuple[str, int, int, bool, str | None, bool]]] = {
    "BlobShape": [("dim", 1, _F.TYPE_INT64, True, None, True)],
    "BlobProto": [
        ("num", 1, _F.TYPE_INT32, False, None, False),
        ("channels", 2, _F.TYPE_INT32, False, None, False),
        ("height", 3, _F.TYPE_INT32, False, None, False),
        ("width", 4, _F.TYPE_INT32, False, None, False),
        ("data", 5, _F.TYPE_FLOAT, True, None, True),
        ("shape", 7, _F.TYPE_MESSAGE, False, "BlobShape", False),
        ("double_data", 8, _F.TYPE_DOUBLE, True, None, True),
    ],
    "InnerProductParameter": [("transpose", 6, _F.TYPE_BOOL, False, None, False)],
    "BatchNormParameter": [("eps", 3, _F.TYPE_FLOAT, False, None, False)],
    "LayerParameter": [
        ("name", 1, _F.TYPE_STRING, False, None, False),
        ("type", 2, _F.TYPE_STRING, False, None, False),
        ("bottom", 3, _F.TYPE_STRING, True, None, False),
        ("top", 4, _F.TYPE_STRING, True, None, False),
        ("blobs", 7, _F.TYPE_MESSAGE, True, "BlobProto", False),
        ("inner_product_param", 117, _F.TYPE_MESSAGE, False, "InnerProductParameter", False),
        ("batch_norm_param", 139, _F.TYPE_MESSAGE, False, "BatchNormParameter", False),
    ],
    # The V1 layer type is an enum in caffe.proto; read as int32 (the same varint on
    # the wire) so that type numbers of Caffe forks, unknown to the enum, survive.
    "V1LayerParameter": [
        ("v0_layer", 1, _F.TYPE_BYTES, False, None, False),
        ("bottom", 2, _F.TYPE_STRING, True, None, False),
        ("top", 3, _F.TYPE_STRING, True, None, False),
        ("name", 4, _F.TYPE_STRING, False, None, False),
        ("type", 5, _F.TYPE_INT32, False, None, False),
        ("blobs", 6, _F.TYPE_MESSAGE, True, "BlobProto", False),
    ],
    "NetParameter": [
        ("name", 1, _F.TYPE_STRING, False, None, False),
        ("layers", 2, _F.TYPE_MESSAGE, True, "V1LayerParameter", False),
        ("layer", 100, _F.TYPE_MESSAGE, True, "LayerParameter", False),
    ],
}

# V1LayerParameter.LayerType numbers of BVLC Caffe -> the type names Caffe upgraded them to.
V1_LAYER_TYPES: dict[int, str] = {
    0: "NONE",
    1: "Accuracy",
    2: "BNLL",
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    7: "EuclideanLoss",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    16: "MultinomialLogisticLoss",
    17: "Pooling",
    18: "ReLU",
    19: "Sigmoid",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    23: "TanH",
    24: "WindowData",
    25: "Eltwise",
    26: "Power",
    27: "SigmoidCrossEntropyLoss",
    28: "HingeLoss",
    29: "MemoryData",
    30: "ArgMax",
    31: "Threshold",
    32: "DummyData",
    33: "Slice",
    34: "MVN",
    35: "AbsVal",
    36: "Silence",
    37: "ContrastiveLoss",
    38: "Exp",
    39: "Deconvolution",
}
# ChenglongChen's batch_normalization fork numbers its BN layer 39, which BVLC later gave
# to Deconvolution; other forks (lim0606's caffe-dev) used numbers past BVLC's table. A V1
# layer of either number whose blobs look like BN's is read as BN.
_V1_BN_NUMBER = 39


class CaffeMessages(NamedTuple):
    """The message classes built from :data:`_SCHEMA` (also used by the tests to write files)."""

    net: type[Message]
    layer: type[Message]
    v1_layer: type[Message]
    blob: type[Message]
    blob_shape: type[Message]


@functools.cache
def caffe_messages() -> CaffeMessages:
    """Message classes for the subset of ``caffe.proto`` read here, built once."""
    file = descriptor_pb2.FileDescriptorProto(
        name="softmine_caffe_subset.proto", package=_PACKAGE, syntax="proto2"
    )
    for message_name, fields in _SCHEMA.items():
        message = file.message_type.add(name=message_name)
        for name, number, ftype, repeated, type_name, packed in fields:
            field = message.field.add(
                name=name,
                number=number,
                type=ftype,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name is not None:
                field.type_name = f".{_PACKAGE}.{type_name}"
            if packed:
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())

    def cls(name: str) -> type[Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))

    return CaffeMessages(
        net=cls("NetParameter"),
        layer=cls("LayerParameter"),
        v1_layer=cls("V1LayerParameter"),
        blob=cls("BlobProto"),
        blob_shape=cls("BlobShape"),
    )


class CaffeLayer(list[np.ndarray]):
    """The blobs of one Caffe layer (float32 arrays in their Caffe shapes), with its type.

    A ``list[np.ndarray]`` so that ``read_caffemodel(p)[name][0]`` is a layer's first
    blob; ``.type`` is its Caffe type (``Convolution``, ``BatchNorm``, ``BN``, ...),
    ``.bottom`` / ``.top`` its input and output blob names, ``.transpose`` whether an
    ``InnerProduct`` stores its weight as (in, out), ``.eps`` a ``BatchNorm``'s epsilon
    when the file sets one (Caffe's default is 1e-5, as PyTorch's).
    """

    def __init__(
        self,
        blobs: Iterable[np.ndarray],
        type: str,
        bottom: tuple[str, ...] = (),
        top: tuple[str, ...] = (),
        transpose: bool = False,
        eps: float | None = None,
    ) -> None:
        super().__init__(blobs)
        self.type = type
        self.bottom = bottom
        self.top = top
        self.transpose = transpose
        self.eps = eps


def _blob_array(blob: Any, where: str) -> np.ndarray:
    """One BlobProto -> a float32 array in its shape (``shape``, else num/channels/height/width)."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if len(blob.data):
        values = np.array(blob.data, dtype=np.float32)
    else:
        values = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    if any(d < 0 for d in shape) or int(np.prod(shape)) != values.size:
        raise DataError(
            f"{where} holds {values.size} values but its shape is {shape}; "
            "the file is damaged or was cut short"
        )
    return values.reshape(shape)


def _looks_like_bn(blobs: list[np.ndarray]) -> bool:
    """2 or 4 blobs, all (1, C, 1, 1) with one C: the scale/shift[/mean/var] of a BN layer."""
    return len(blobs) in (2, 4) and all(
        b.ndim == 4 and b.shape[0] == b.shape[2] == b.shape[3] == 1 and b.shape == blobs[0].shape
        for b in blobs
    )


def _v1_type(number: int, blobs: list[np.ndarray]) -> str:
    if (number == _V1_BN_NUMBER or number not in V1_LAYER_TYPES) and _looks_like_bn(blobs):
        return "BN"
    return V1_LAYER_TYPES.get(number, f"V1 type {number} (not a standard Caffe layer type)")


def _what_else(raw: bytes) -> str:
    """A guess at what a file that does not parse as a NetParameter is, for the error."""
    if raw.startswith(b"PK"):
        return "a zip archive, like a PyTorch .pth file (give it under a .pth name)"
    try:
        text = raw[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "not a Caffe NetParameter (its protobuf data is malformed, damaged or cut short)"
    if "layer" in text:
        return "a text file, like a .prototxt network definition (which holds no weights)"
    return "a text file, not a binary Caffe NetParameter"


def _parse(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the Caffe model {str(path)!r} ({e.strerror or e})") from e
    net = caffe_messages().net()
    problem = "an empty file" if not raw else ""
    if raw:
        try:
            net.ParseFromString(raw)
        except (DecodeError, RuntimeError, ValueError):
            problem = _what_else(raw)
        else:
            if not (len(net.layer) or len(net.layers)):
                problem = "a protobuf message without Caffe layers"
    if problem:
        raise DataError(
            f"{str(path)!r} is {problem}; give the binary .caffemodel weights file written by Caffe"
        )
    return net


def read_caffemodel(path: str | Path) -> dict[str, CaffeLayer]:
    """Layer name -> its blobs (float32 arrays in their Caffe shapes), in the file's order.

    Each value is a :class:`CaffeLayer`, a list of the layer's blobs that also carries
    its Caffe ``type``. Both the new ``layer`` and the V1 ``layers`` lists are read; a
    layer listed twice (train and test copies) is kept once, with its blobs.
    A file that is not a NetParameter raises one :class:`DataError`.
    """
    path = Path(path).expanduser()
    net = _parse(path)
    layers: dict[str, CaffeLayer] = {}
    for v1 in net.layers:
        if v1.HasField("v0_layer"):
            raise DataError(
                f"{str(path)!r} is in Caffe's V0 format (2014); upgrade it with Caffe's "
                "tools/upgrade_net_proto_binary and convert the upgraded file"
            )
        blobs = [_blob_array(b, f"blob {i} of layer {v1.name!r}") for i, b in enumerate(v1.blobs)]
        _add(
            layers,
            v1.name,
            CaffeLayer(blobs, _v1_type(v1.type, blobs), tuple(v1.bottom), tuple(v1.top)),
        )
    for layer in net.layer:
        blobs = [
            _blob_array(b, f"blob {i} of layer {layer.name!r}") for i, b in enumerate(layer.blobs)
        ]
        transpose = layer.type == "InnerProduct" and layer.inner_product_param.transpose
        eps = layer.batch_norm_param.eps if layer.batch_norm_param.HasField("eps") else None
        bottom, top = tuple(layer.bottom), tuple(layer.top)
        _add(layers, layer.name, CaffeLayer(blobs, layer.type, bottom, top, transpose, eps))
    return layers


def _add(layers: dict[str, CaffeLayer], name: str, layer: CaffeLayer) -> None:
    old = layers.get(name)
    if old is not None and len(old) and len(layer):
        raise DataError(
            f"the Caffe model has two layers named {name!r} with weights; "
            "layer names must be unique"
        )
    if old is None or not len(old):
        layers[name] = layer


# ------------------------------------------------------------------------------ converting

CAFFE_BN_EPS = 1e-5  # BatchNormParameter.eps default, as torch.nn.BatchNorm2d's
BN_LAYOUT_BATCHNORM = "BatchNorm+Scale"
BN_LAYOUT_BN = "BN"
BN_LAYOUT_BN_NO_STATS = "BN without statistics"

# Caffe layer name -> softmine module name, where the general rule (below) does not give it.
_SPECIAL_NAMES = {"loss3/classifier": "last_linear"}
# Name parts of lim0606's prototxt -> those of Cadene's pretrainedmodels port.
_PART_NAMES = {
    "double3x3_reduce": "double_3x3_reduce",
    "double3x3a": "double_3x3_1",
    "double3x3b": "double_3x3_2",
}


def softmine_name(caffe_name: str, caffe_type: str = "") -> str:
    """The module name of a Caffe layer: ``/`` -> ``_`` and BN-Inception's part names.

    ``inception_3a/double3x3a`` -> ``inception_3a_double_3x3_1``, ``conv1/7x7_s2/bn`` ->
    ``conv1_7x7_s2_bn``, ``loss1/fc`` -> ``loss1_fc``, ``loss3/classifier`` -> ``last_linear``.
    """
    name = _SPECIAL_NAMES.get(caffe_name)
    if name is None:
        name = "_".join(_PART_NAMES.get(part, part) for part in caffe_name.split("/"))
    if not name or "." in name:
        raise DataError(
            f"the Caffe layer {caffe_name!r} ({caffe_type}) has a name that cannot be a "
            "PyTorch module name (empty or containing '.'); rename it in Caffe first"
        )
    return name


class CaffeStateDict(dict[str, Tensor]):
    """A state dict converted from a ``.caffemodel`` that remembers where each key came from.

    ``origin[key]`` is the name of the Caffe layer a tensor came from and
    ``layer_types[name]`` that layer's type, so that loading errors can name them
    (:meth:`describe`); ``bn_layouts`` lists the BatchNorm layouts found
    (:data:`BN_LAYOUT_BATCHNORM`, :data:`BN_LAYOUT_BN`, :data:`BN_LAYOUT_BN_NO_STATS`);
    ``caffe_layers`` counts the file's layers, ``converted_layers`` those with weights;
    ``bn_without_scale`` names the ``BatchNorm`` layers no ``Scale`` layer followed (their
    modules hold gamma 1 and beta 0: exact for a network without them, a gap for one
    that had them, which a loader decides). Save it with ``torch.save(dict(state), ...)``:
    a plain dict loads anywhere.
    """

    def __init__(self) -> None:
        super().__init__()
        self.origin: dict[str, str] = {}
        self.layer_types: dict[str, str] = {}
        self.bn_layouts: set[str] = set()
        self.caffe_layers = 0
        self.converted_layers = 0
        self.bn_without_scale: list[str] = []

    def put(
        self, key: str, value: np.ndarray, name: str, layer: CaffeLayer, *, replace: bool = False
    ) -> None:
        """Store ``value`` as float32 under ``key``, from the layer ``name``; two layers
        giving one key is a :class:`DataError` (``replace``: a Scale completing its BatchNorm)."""
        if key in self and not replace:
            raise DataError(
                f"the {_describe(name, layer)} and the {self.describe(key)} both convert to "
                f"{key!r}; rename one of them in Caffe"
            )
        self[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        self.origin[key] = name
        self.layer_types[name] = layer.type

    def describe(self, key: str) -> str | None:
        """``Caffe layer 'name' (Type)`` of ``key``, else of another key of its module."""
        name = self.origin.get(key)
        if name is None:
            module = key.rpartition(".")[0]
            name = next((n for k, n in self.origin.items() if k.rpartition(".")[0] == module), None)
        return None if name is None else f"Caffe layer {name!r} ({self.layer_types[name]})"


def _describe(name: str, layer: CaffeLayer) -> str:
    return f"Caffe layer {name!r} ({layer.type})"


def _vector(blob: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    """A per-channel blob (C,), (1, C) or (1, C, 1, 1) as a (C,) vector."""
    if sum(d != 1 for d in blob.shape) > 1 or (channels is not None and blob.size != channels):
        expected = "one value per channel" if channels is None else f"{channels} values"
        raise DataError(f"{what} has shape {blob.shape}; expected {expected}")
    return blob.reshape(-1)


def _check_blob_count(name: str, layer: CaffeLayer, counts: tuple[int, ...], what: str) -> None:
    if len(layer) not in counts:
        raise DataError(f"the {_describe(name, layer)} has {len(layer)} blobs; expected {what}")


def _convert_weighted(state: CaffeStateDict, name: str, layer: CaffeLayer) -> None:
    """Convolution / InnerProduct -> ``<module>.weight`` (+ ``.bias`` when the file has one)."""
    where = _describe(name, layer)
    _check_blob_count(name, layer, (1, 2), "1 or 2 (weight, optional bias)")
    module = softmine_name(name, layer.type)
    weight = layer[0]
    if layer.type == "InnerProduct":
        # Caffe flattens (C, H, W) row-major like torch.flatten, so its (out, in) matrix
        # needs no permutation; legacy files store it as (1, 1, out, in).
        if weight.ndim < 2 or any(d != 1 for d in weight.shape[:-2]):
            raise DataError(f"the {where} has a weight of shape {weight.shape}; expected (out, in)")
        weight = weight.reshape(weight.shape[-2:])
        if layer.transpose:
            weight = weight.T
    state.put(f"{module}.weight", weight, name, layer)
    if len(layer) == 2:
        bias = _vector(layer[1], weight.shape[0], f"the bias of the {where}")
        state.put(f"{module}.bias", bias, name, layer)


def _convert_batchnorm(state: CaffeStateDict, name: str, layer: CaffeLayer) -> str:
    """Caffe BatchNorm (mean * s, variance * s, s) -> statistics divided by s (s = 0 gives
    zeros, as in Caffe), weight 1 and bias 0 until its Scale layer comes; returns the module."""
    where = _describe(name, layer)
    _check_blob_count(name, layer, (3,), "3 (mean * s, variance * s, scale factor s)")
    module = softmine_name(name, layer.type)
    mean = _vector(layer[0], None, f"the mean of the {where}")
    var = _vector(layer[1], mean.size, f"the variance of the {where}")
    s = float(_vector(layer[2], 1, f"the scale factor of the {where}")[0])
    if s == 0:
        mean, var = np.zeros_like(mean), np.zeros_like(var)
    state.put(f"{module}.running_mean", mean.astype(np.float64) / (s or 1.0), name, layer)
    state.put(f"{module}.running_var", var.astype(np.float64) / (s or 1.0), name, layer)
    state.put(f"{module}.weight", np.ones_like(mean), name, layer)
    state.put(f"{module}.bias", np.zeros_like(mean), name, layer)
    state.bn_layouts.add(BN_LAYOUT_BATCHNORM)
    return module


def _convert_scale(state: CaffeStateDict, name: str, layer: CaffeLayer, module: str) -> None:
    """Scale after a BatchNorm: gamma and (when stored) beta of that BatchNorm's module."""
    where = _describe(name, layer)
    _check_blob_count(name, layer, (1, 2), "1 or 2 (gamma, optional beta)")
    channels = state[f"{module}.running_mean"].numel()
    gamma = _vector(layer[0], channels, f"the gamma of the {where}")
    beta = _vector(layer[1], channels, f"the beta of the {where}") if len(layer) == 2 else None
    state.put(f"{module}.weight", gamma, name, layer, replace=True)
    state.put(
        f"{module}.bias", np.zeros_like(gamma) if beta is None else beta, name, layer, replace=True
    )


def _convert_bn(state: CaffeStateDict, name: str, layer: CaffeLayer) -> bool:
    """Custom BN layer (scale, shift[, mean, variance], each (1, C, 1, 1)); False when it
    stores no statistics (then mean 0 and variance 1)."""
    where = _describe(name, layer)
    _check_blob_count(name, layer, (2, 4), "2 (scale, shift) or 4 (scale, shift, mean, variance)")
    module = softmine_name(name, layer.type)
    scale = _vector(layer[0], None, f"the scale of the {where}")
    shift = _vector(layer[1], scale.size, f"the shift of the {where}")
    has_stats = len(layer) == 4
    if has_stats:
        mean = _vector(layer[2], scale.size, f"the mean of the {where}")
        var = _vector(layer[3], scale.size, f"the variance of the {where}")
    else:
        mean, var = np.zeros_like(scale), np.ones_like(scale)
    state.put(f"{module}.running_mean", mean, name, layer)
    state.put(f"{module}.running_var", var, name, layer)
    state.put(f"{module}.weight", scale, name, layer)
    state.put(f"{module}.bias", shift, name, layer)
    state.bn_layouts.add(BN_LAYOUT_BN if has_stats else BN_LAYOUT_BN_NO_STATS)
    return has_stats


def caffemodel_to_state_dict(path: str | Path) -> CaffeStateDict:
    """The weights of a ``.caffemodel`` as a state dict with softmine's BN-Inception names.

    Convolutions and fully connected layers give ``<module>.weight`` (and ``.bias`` when
    the file has one). BatchNorm gives ``<module>.running_mean/.running_var/.weight/.bias``
    from either layout: ``BatchNorm`` (statistics divided by its scale factor) with the
    ``Scale`` layer that takes its output (gamma, beta; no Scale means 1 and 0, and the
    layer is listed in ``bn_without_scale``), or the
    custom ``BN`` layer (scale, shift, mean, variance). ``BN`` layers storing only scale
    and shift get mean 0 and variance 1 with one warning: those statistics must be
    re-estimated on training images before the network is evaluated.
    Module names: see :func:`softmine_name`. A layer with weights whose type cannot be
    converted is a :class:`DataError` naming the layer and its type.
    """
    layers = read_caffemodel(path)
    state = CaffeStateDict()
    state.caffe_layers = len(layers)
    producer: dict[str, str] = {}  # blob name -> the layer that last wrote it
    batchnorms: dict[str, str] = {}  # BatchNorm layer -> its module, until its Scale comes
    previous: str | None = None  # the last layer with weights
    no_stats: list[str] = []
    other_eps: list[str] = []
    for name, layer in layers.items():
        if len(layer):
            state.converted_layers += 1
            if layer.type in ("Convolution", "InnerProduct"):
                _convert_weighted(state, name, layer)
            elif layer.type == "BatchNorm":
                batchnorms[name] = _convert_batchnorm(state, name, layer)
                if layer.eps is not None and np.float32(layer.eps) != np.float32(CAFFE_BN_EPS):
                    other_eps.append(f"{name!r} ({layer.eps:.3g})")
            elif layer.type == "Scale":
                # its input's writer, or in files that do not name blobs the layer before
                source = producer.get(layer.bottom[0]) if layer.bottom else previous
                if source not in batchnorms:
                    raise DataError(
                        f"the {_describe(name, layer)} does not follow a BatchNorm layer; "
                        "softmine converts Scale only as the gamma/beta of the BatchNorm before it"
                    )
                _convert_scale(state, name, layer, batchnorms.pop(source))
            elif layer.type == "BN":
                if not _convert_bn(state, name, layer):
                    no_stats.append(name)
            else:
                raise DataError(
                    f"the {_describe(name, layer)} has weights but softmine cannot convert "
                    "that layer type; it converts Convolution, InnerProduct, BatchNorm (+ Scale) "
                    "and BN layers"
                )
            previous = name
        for top in layer.top:
            producer[top] = name
    state.bn_without_scale = list(batchnorms)
    if no_stats:
        warnings.warn(
            f"{len(no_stats)} BN layers of {str(path)!r} (e.g. {no_stats[0]!r}) store no mean "
            "and variance; they are set to 0 and 1: re-estimate them on training images "
            "(e.g. torch.optim.swa_utils.update_bn) or fine-tune before evaluating",
            stacklevel=2,
        )
    if other_eps:
        warnings.warn(
            f"{len(other_eps)} BatchNorm layers of {str(path)!r} set an epsilon other than "
            f"{CAFFE_BN_EPS:g} (e.g. {other_eps[0]}); build the network's BatchNorm with that eps "
            "to reproduce Caffe's outputs exactly",
            stacklevel=2,
        )
    return state


def conversion_summary(state: CaffeStateDict, source: Path, out: Path) -> str:
    """One line: layers, tensors, parameters (statistics excluded), BatchNorm layout, where."""
    params = sum(
        v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var"))
    )
    layouts = ", ".join(sorted(state.bn_layouts)) or "none"
    return (
        f"{source.name}: {state.caffe_layers} Caffe layers, {state.converted_layers} with weights"
        f" -> {len(state)} tensors, {params:,} parameters; BatchNorm layout: {layouts}; "
        f"written to {out}"
    )


def convert_caffemodel(source: str | Path, out: str | Path) -> CaffeStateDict:
    """Convert ``source`` (a ``.caffemodel``) and save it to ``out`` as a plain ``{name: tensor}``
    dict (``torch.save``), through a temporary file and a rename so that an existing ``out`` is
    never left half-written. What ``softmine-data convert-caffemodel`` does; returns the state."""
    from softmine.runs.atomic import write_atomic

    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_file():
        raise DataError(f"Caffe model {str(source)!r} does not exist; give a .caffemodel file")
    state = caffemodel_to_state_dict(source)
    plain = dict(state)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda f: torch.save(plain, f))
    except (OSError, StorageError) as e:  # a full disk, a read-only folder, a file in the way
        cause = e.__cause__ if isinstance(e, StorageError) else e
        why = getattr(cause, "strerror", None) or cause or e
        raise DataError(f"cannot write {str(out)!r} ({why}); choose another path") from e
    return state
