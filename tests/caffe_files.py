"""Writing small ``.caffemodel`` files for the tests (nothing in softmine writes them).

Files are encoded with the message classes ``softmine.models.caffe`` builds from
Caffe's field numbers; with the same fields set, the bytes equal those of classes
compiled from Caffe's own ``caffe.proto`` (checked once with ``protoc``-generated
``caffe_pb2``, see ``docs/pretrained-weights.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from softmine.models.caffe import V1_LAYER_TYPES, caffe_messages

# V1 type numbers by name; BN is the number of ChenglongChen's batch_normalization fork.
V1_NUMBERS = {name: number for number, name in V1_LAYER_TYPES.items()} | {"BN": 39}


@dataclass
class Layer:
    """One Caffe layer: name, type (a V1 type number may be given as an int) and blobs."""

    name: str
    type: str | int
    blobs: Sequence[np.ndarray] = ()
    bottom: Sequence[str] = ()
    top: Sequence[str] = ()
    transpose: bool = False  # InnerProduct weight stored as (in, out); new format only


def _fill_blob(blob, array: np.ndarray, *, legacy_dims: bool, double: bool) -> None:
    if legacy_dims:
        if array.ndim > 4:
            raise ValueError("legacy num/channels/height/width holds at most 4 dimensions")
        dims = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.dim.extend(array.shape)
    values = array.reshape(-1)
    if double:
        blob.double_data.extend(values.astype(np.float64).tolist())
    else:
        blob.data.extend(values.astype(np.float32).tolist())


def caffemodel_bytes(
    layers: Sequence[Layer],
    *,
    v1: bool = False,
    legacy_dims: bool = False,
    double: bool = False,
    name: str = "test_net",
) -> bytes:
    """A serialized NetParameter with ``layers`` in the ``layer`` (or V1 ``layers``) list."""
    net = caffe_messages().net(name=name)
    for spec in layers:
        if v1:
            number = spec.type if isinstance(spec.type, int) else V1_NUMBERS[spec.type]
            msg = net.layers.add(name=spec.name, type=number)
        else:
            msg = net.layer.add(name=spec.name, type=str(spec.type))
            if spec.transpose:
                msg.inner_product_param.transpose = True
        msg.bottom.extend(spec.bottom)
        msg.top.extend(spec.top)
        for array in spec.blobs:
            _fill_blob(msg.blobs.add(), np.asarray(array), legacy_dims=legacy_dims, double=double)
    return net.SerializeToString()


def write_caffemodel(path: Path, layers: Sequence[Layer], **options) -> Path:
    """Write :func:`caffemodel_bytes` to ``path``; returns ``path``."""
    path.write_bytes(caffemodel_bytes(layers, **options))
    return path


@dataclass
class BatchNormValues:
    """What a converted BatchNorm must hold: statistics and affine parameters, float32."""

    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class Block:
    """Caffe layers of a convolution/fc + BatchNorm (+ ReLU) and the values written."""

    layers: list[Layer]
    weight: np.ndarray
    bn: BatchNormValues
    top: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def random_bn(channels: int, rng: np.random.Generator) -> BatchNormValues:
    f32 = np.float32
    return BatchNormValues(
        mean=rng.normal(size=channels).astype(f32),
        var=rng.uniform(0.5, 2.0, size=channels).astype(f32),
        gamma=rng.uniform(0.5, 1.5, size=channels).astype(f32),
        beta=rng.normal(scale=0.1, size=channels).astype(f32),
    )


def bn_layers(
    name: str,
    bottom: str,
    bn: BatchNormValues,
    layout: str,
    *,
    scale_factor: float = 4.0,
) -> tuple[list[Layer], str]:
    """BatchNorm layers after the blob ``bottom``; returns them and their output blob.

    ``layout``: ``batchnorm`` (Caffe's BatchNorm ``<name>/bn`` storing mean * s,
    variance * s and s, then Scale ``<name>/bn/sc``, as lim0606's train_val.prototxt),
    ``bn`` (custom BN ``<name>/bn``: scale, shift, mean, variance as (1, C, 1, 1)) or
    ``bn2`` (custom BN with scale and shift only).
    """
    c = bn.mean.size
    if layout == "batchnorm":
        s = np.float32(scale_factor)
        stats = [bn.mean * s, bn.var * s, np.array([s], dtype=np.float32)]
        return [
            Layer(f"{name}/bn", "BatchNorm", stats, (bottom,), (f"{name}/bn",)),
            Layer(
                f"{name}/bn/sc", "Scale", [bn.gamma, bn.beta], (f"{name}/bn",), (f"{name}/bn/sc",)
            ),
            Layer(f"{name}/bn/sc/relu", "ReLU", (), (f"{name}/bn/sc",), (f"{name}/bn/sc",)),
        ], f"{name}/bn/sc"
    vectors = [bn.gamma, bn.beta] if layout == "bn2" else [bn.gamma, bn.beta, bn.mean, bn.var]
    return [
        Layer(
            f"{name}/bn", "BN", [v.reshape(1, c, 1, 1) for v in vectors], (bottom,), (f"{name}/bn",)
        ),
        Layer(f"{name}/relu", "ReLU", (), (f"{name}/bn",), (f"{name}/bn",)),
    ], f"{name}/bn"


def conv_bn_block(
    name: str,
    bottom: str,
    c_in: int,
    c_out: int,
    kernel: int,
    layout: str,
    rng: np.random.Generator,
    *,
    kind: str = "Convolution",
) -> Block:
    """A bias-free Convolution (or InnerProduct) ``name`` followed by BatchNorm in ``layout``."""
    shape = (c_out, c_in, kernel, kernel) if kind == "Convolution" else (c_out, c_in)
    weight = rng.normal(scale=0.1, size=shape).astype(np.float32)
    bn = random_bn(c_out, rng)
    norm, top = bn_layers(name, name, bn, layout)
    layers = [Layer(name, kind, [weight], (bottom,), (name,)), *norm]
    return Block(layers, weight, bn, top)
