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
    eps: float | None = None  # BatchNorm epsilon (batch_norm_param.eps); new format only


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
            if spec.eps is not None:
                msg.batch_norm_param.eps = spec.eps
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


# ------------------------------------------------------------ lim0606's GoogLeNet-BN

# Transcribed from lim0606/caffe-googlenet-bn train_val.prototxt (public): per inception
# module (name, input channels, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3,
# pool projection); None: no such branch (3c and 4e reduce the grid instead).
GOOGLENET_BN_INCEPTION = (
    ("inception_3a", 192, 64, 64, 64, 64, 96, 32),
    ("inception_3b", 256, 64, 64, 96, 64, 96, 64),
    ("inception_3c", 320, None, 128, 160, 64, 96, None),
    ("inception_4a", 576, 224, 64, 96, 96, 128, 128),
    ("inception_4b", 576, 192, 96, 128, 96, 128, 128),
    ("inception_4c", 576, 160, 128, 160, 128, 160, 96),
    ("inception_4d", 576, 96, 128, 192, 160, 192, 96),
    ("inception_4e", 576, None, 128, 192, 192, 256, None),
    ("inception_5a", 1024, 352, 192, 320, 160, 224, 128),
    ("inception_5b", 1024, 352, 192, 320, 192, 224, 128),
)
# Auxiliary classifiers: (prefix, after module, its channels, fc input = 128 x pooled grid).
# 5x5/3 average pooling of the 14 x 14 map after 3c gives 4 x 4, of the 7 x 7 after 4e 2 x 2.
GOOGLENET_BN_AUX = (
    ("loss1", "inception_3c", 576, 128 * 4 * 4),
    ("loss2", "inception_4e", 1024, 128 * 2 * 2),
)


def googlenet_bn_layers(
    layout: str, rng: np.random.Generator, *, classes: int = 1000
) -> list[Layer]:
    """Every layer of lim0606's GoogLeNet-BN (train_val.prototxt names, order and blob
    names), random weights, BatchNorm in ``layout`` (see :func:`bn_layers`)."""
    layers: list[Layer] = [Layer("data", "Data", (), (), ("data", "label"))]

    def conv(
        name: str, bottom: str, c_in: int, c_out: int, k: int, kind: str = "Convolution"
    ) -> str:
        shape = (c_out, c_in, k, k) if kind == "Convolution" else (c_out, c_in)
        weight = rng.normal(scale=0.05, size=shape).astype(np.float32)
        layers.append(Layer(name, kind, [weight], (bottom,), (name,)))
        norm, top = bn_layers(name, name, random_bn(c_out, rng), layout, scale_factor=999.98)
        layers.extend(norm)
        return top

    def pool(name: str, bottom: str) -> str:
        layers.append(Layer(name, "Pooling", (), (bottom,), (name,)))
        return name

    def classifier(name: str, bottom: str, c_in: int) -> None:
        w = rng.normal(scale=0.05, size=(classes, c_in)).astype(np.float32)
        b = rng.normal(scale=0.05, size=classes).astype(np.float32)
        layers.append(Layer(name, "InnerProduct", [w, b], (bottom,), (name,)))

    x = conv("conv1/7x7_s2", "data", 3, 64, 7)
    x = pool("pool1/3x3_s2", x)
    x = conv("conv2/3x3_reduce", x, 64, 64, 1)
    x = conv("conv2/3x3", x, 64, 192, 3)
    x = pool("pool2/3x3_s2", x)
    aux = {after: (prefix, fc_in) for prefix, after, _, fc_in in GOOGLENET_BN_AUX}
    for name, c_in, c1, r3, c3, rd, cd, proj in GOOGLENET_BN_INCEPTION:
        outs = []
        if c1 is not None:
            outs.append(conv(f"{name}/1x1", x, c_in, c1, 1))
        outs.append(conv(f"{name}/3x3", conv(f"{name}/3x3_reduce", x, c_in, r3, 1), r3, c3, 3))
        d = conv(f"{name}/double3x3a", conv(f"{name}/double3x3_reduce", x, c_in, rd, 1), rd, cd, 3)
        outs.append(conv(f"{name}/double3x3b", d, cd, cd, 3))
        p = pool(f"{name}/pool", x)
        outs.append(conv(f"{name}/pool_proj", p, c_in, proj, 1) if proj is not None else p)
        layers.append(Layer(f"{name}/output", "Concat", (), tuple(outs), (f"{name}/output",)))
        x = f"{name}/output"
        if name in aux:
            prefix, fc_in = aux[name]
            c_out = sum(o for o in (c1, c3, cd, proj) if o is not None) + (0 if proj else c_in)
            a = pool(f"pool{name[-2]}/5x5_s3", x)
            a = conv(f"{prefix}/conv", a, c_out, 128, 1)
            a = conv(f"{prefix}/fc", a, fc_in, 1024, 0, kind="InnerProduct")
            classifier(f"{prefix}/classifier", a, 1024)
    x = pool("pool5/7x7_s1", x)
    classifier("loss3/classifier", x, 1024)
    return layers


# ------------------------------------- lim0606's GoogLeNet-BN, from its real layer list

#: The TRAIN-phase layers of lim0606's train_val.prototxt (names, types, blob names and
#: parameter shapes), derived once by tests/fixtures/derive_googlenet_bn_layers.py.
LIM0606_LAYER_LIST = Path(__file__).parent / "fixtures" / "googlenet_bn_layers.tsv"


@dataclass(frozen=True)
class ListedLayer:
    """One row of :data:`LIM0606_LAYER_LIST`."""

    name: str
    type: str
    bottom: tuple[str, ...]
    top: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def lim0606_layer_list() -> list[ListedLayer]:
    """The rows of :data:`LIM0606_LAYER_LIST`, in the prototxt's order."""
    rows = []
    for line in LIM0606_LAYER_LIST.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, kind, bottom, top, shapes = line.split("\t")

        def names(field: str) -> tuple[str, ...]:
            return () if field == "-" else tuple(field.split(","))

        dims = (
            ()
            if shapes == "-"
            else tuple(tuple(int(d) for d in s.split("x")) for s in shapes.split(";"))
        )
        rows.append(ListedLayer(name, kind, names(bottom), names(top), dims))
    return rows


def lim0606_layers(
    rng: np.random.Generator, *, drop: Sequence[str] = (), scale_factor: float = 999.98
) -> list[Layer]:
    """Layers of lim0606's GoogLeNet-BN with random values in the listed shapes, minus the
    layers named in ``drop`` (a name ending in ``/`` drops every layer under it).

    BatchNorm blobs hold mean * s, variance * s (variance in [0.5, 2]) and s; Scale
    gamma in [0.5, 1.5]; everything else normal with scale 0.05.
    """
    prefixes = tuple(d for d in drop if d.endswith("/"))
    layers = []
    for row in lim0606_layer_list():
        if row.name in drop or row.name.startswith(prefixes):
            continue
        if row.type == "BatchNorm":
            (c,), _, _ = row.shapes
            s = np.float32(scale_factor)
            blobs = [
                (rng.normal(size=c) * s).astype(np.float32),
                (rng.uniform(0.5, 2.0, size=c) * s).astype(np.float32),
                np.array([s], dtype=np.float32),
            ]
        elif row.type == "Scale":
            blobs = [rng.uniform(0.5, 1.5, size=row.shapes[0]).astype(np.float32)]
            blobs += [
                rng.normal(scale=0.1, size=shape).astype(np.float32) for shape in row.shapes[1:]
            ]
        else:
            blobs = [rng.normal(scale=0.05, size=shape).astype(np.float32) for shape in row.shapes]
        layers.append(Layer(row.name, row.type, blobs, row.bottom, row.top))
    return layers


def authors_trunk(path: Path, **options):
    """lim0606's GoogLeNet-BN as the authors' backbone builds it (no conv biases, their
    widths, the branches after inception_3c and inception_4e), loading the file ``path``."""
    from softmine.models import BNInception

    return BNInception(
        pretrained=str(path),
        num_classes=1000,
        features=("inception_3c", "inception_4e"),
        conv_bias=False,
        widths="googlenet_bn",
        **options,
    )
