"""Reading Caffe .caffemodel files without Caffe and converting them to softmine's names.

Files are written by ``tests/caffe_files.py`` in either BatchNorm layout; converted
values are compared with the arrays written (BatchNorm statistics divided by the
scale factor in float64), and the converted BatchNorm is checked against Caffe's
inference formula evaluated by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torch import nn

from softmine.commands import data as data_command
from softmine.errors import DataError
from softmine.models import load_matching_state_dict, read_state_dict
from softmine.models.caffe import (
    BN_LAYOUT_BATCHNORM,
    BN_LAYOUT_BN,
    BN_LAYOUT_BN_NO_STATS,
    caffemodel_to_state_dict,
    read_caffemodel,
)
from tests.caffe_files import (
    GOOGLENET_BN_AUX,
    GOOGLENET_BN_INCEPTION,
    Layer,
    authors_trunk,
    bn_layers,
    conv_bn_block,
    googlenet_bn_layers,
    lim0606_layer_list,
    lim0606_layers,
    random_bn,
    write_caffemodel,
)
from tests.conftest import REPO, run_forked

F32 = np.float32


def _subset(layout: str, rng: np.random.Generator):
    """A hand-made piece of lim0606's GoogLeNet-BN: stem conv, an inception double-3x3
    conv, the loss1 branch (conv, fc, classifier) and the ImageNet classifier."""
    conv1 = conv_bn_block("conv1/7x7_s2", "data", 3, 4, 7, layout, rng)
    d3a = conv_bn_block("inception_3a/double3x3a", conv1.top, 4, 5, 3, layout, rng)
    aux = conv_bn_block("loss1/conv", d3a.top, 5, 3, 1, layout, rng)
    fc = conv_bn_block("loss1/fc", aux.top, 3 * 2 * 2, 6, 0, layout, rng, kind="InnerProduct")
    cls_w = rng.normal(size=(7, 6)).astype(F32)
    cls_b = rng.normal(size=7).astype(F32)
    top_w = rng.normal(size=(8, 5)).astype(F32)
    top_b = rng.normal(size=8).astype(F32)
    layers = [
        Layer("data", "Data", (), (), ("data", "label")),
        *conv1.layers,
        *d3a.layers,
        *aux.layers,
        *fc.layers,
        Layer("loss1/classifier", "InnerProduct", [cls_w, cls_b], (fc.top,), ("loss1/classifier",)),
        Layer(
            "loss3/classifier", "InnerProduct", [top_w, top_b], ("pool5",), ("loss3/classifier",)
        ),
        Layer("loss3/loss", "SoftmaxWithLoss", (), ("loss3/classifier", "label"), ("loss3/loss",)),
    ]
    blocks = {
        "conv1_7x7_s2": conv1,
        "inception_3a_double_3x3_1": d3a,
        "loss1_conv": aux,
        "loss1_fc": fc,
    }
    linear = {"loss1_classifier": (cls_w, cls_b), "last_linear": (top_w, top_b)}
    return layers, blocks, linear


def _expected(blocks, linear) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for module, block in blocks.items():
        out[f"{module}.weight"] = block.weight
        bn = block.bn
        out[f"{module}_bn.running_mean"] = bn.mean
        out[f"{module}_bn.running_var"] = bn.var
        out[f"{module}_bn.weight"] = bn.gamma
        out[f"{module}_bn.bias"] = bn.beta
    for module, (w, b) in linear.items():
        out[f"{module}.weight"], out[f"{module}.bias"] = w, b
    return out


def _assert_state_equal(state, expected: dict[str, np.ndarray]) -> None:
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].dtype == torch.float32, key
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


# ------------------------------------------------------------------------------ reading


def test_read_gives_every_layer_with_its_type_and_blobs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layers, _, _ = _subset("batchnorm", rng)
    layers_read = read_caffemodel(write_caffemodel(tmp_path / "n.caffemodel", layers))
    assert list(layers_read) == [layer.name for layer in layers]
    for layer in layers:
        got = layers_read[layer.name]
        assert got.type == layer.type
        assert len(got) == len(layer.blobs)
        for written, read in zip(layer.blobs, got, strict=True):
            assert read.dtype == np.float32 and read.shape == written.shape
            np.testing.assert_array_equal(read, written)


def test_v1_layers_list_and_legacy_dims_are_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3)).astype(F32)
    fc = rng.normal(size=(5, 4)).astype(F32)
    bn = [rng.normal(size=(1, 4, 1, 1)).astype(F32) for _ in range(4)]
    layers = [
        Layer("conv", "Convolution", [w], ("data",), ("conv",)),
        Layer("conv/bn", "BN", bn, ("conv",), ("conv/bn",)),
        Layer("relu", "ReLU", (), ("conv/bn",), ("conv/bn",)),
        Layer("fc", "InnerProduct", [fc], ("conv/bn",), ("fc",)),
    ]
    path = write_caffemodel(tmp_path / "v1.caffemodel", layers, v1=True, legacy_dims=True)
    got = read_caffemodel(path)
    assert {n: layer.type for n, layer in got.items()} == {
        "conv": "Convolution",
        "conv/bn": "BN",
        "relu": "ReLU",
        "fc": "InnerProduct",
    }
    assert got["fc"][0].shape == (1, 1, 5, 4)  # legacy num/channels/height/width
    np.testing.assert_array_equal(got["fc"][0].reshape(5, 4), fc)
    np.testing.assert_array_equal(got["conv"][0], w)


def test_double_data_is_read_as_float32(tmp_path: Path) -> None:
    values = np.array([[0.1, -2.5], [1e-3, 3.0]], dtype=np.float64)
    path = write_caffemodel(
        tmp_path / "d.caffemodel", [Layer("fc", "InnerProduct", [values])], double=True
    )
    got = read_caffemodel(path)["fc"][0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32))


# ------------------------------------------------------------------------------ converting


@pytest.mark.parametrize("layout", ["batchnorm", "bn"])
def test_both_batchnorm_layouts_convert_to_the_written_values(tmp_path: Path, layout: str) -> None:
    layers, blocks, linear = _subset(layout, np.random.default_rng(2))
    state = caffemodel_to_state_dict(write_caffemodel(tmp_path / "m.caffemodel", layers))
    _assert_state_equal(state, _expected(blocks, linear))
    assert state.bn_layouts == {BN_LAYOUT_BATCHNORM if layout == "batchnorm" else BN_LAYOUT_BN}
    assert state.describe("conv1_7x7_s2_bn.running_mean") == (
        "Caffe layer 'conv1/7x7_s2/bn' (BatchNorm)"
        if layout == "batchnorm"
        else "Caffe layer 'conv1/7x7_s2/bn' (BN)"
    )
    if layout == "batchnorm":
        assert state.origin["conv1_7x7_s2_bn.weight"] == "conv1/7x7_s2/bn/sc"


def test_v1_legacy_and_double_files_convert_like_new_ones(tmp_path: Path) -> None:
    layers, blocks, linear = _subset("bn", np.random.default_rng(3))
    expected = _expected(blocks, linear)
    for options in (
        {"v1": True},
        {"legacy_dims": True},
        {"double": True},
        {"v1": True, "legacy_dims": True},
    ):
        path = write_caffemodel(tmp_path / "m.caffemodel", layers, **options)
        _assert_state_equal(caffemodel_to_state_dict(path), expected)


def test_batchnorm_statistics_are_divided_by_the_scale_factor(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    bn = random_bn(6, rng)
    s = 999.98  # Caffe's accumulated moving-average factor after many iterations
    stored_mean, stored_var = (bn.mean * F32(s)).astype(F32), (bn.var * F32(s)).astype(F32)
    layers = [
        Layer(
            "c/bn", "BatchNorm", [stored_mean, stored_var, np.array([s], F32)], ("c",), ("c/bn",)
        ),
        Layer("c/bn/sc", "Scale", [bn.gamma, bn.beta], ("c/bn",), ("c/bn/sc",)),
        Layer("z/bn", "BatchNorm", [stored_mean, stored_var, np.zeros(1, F32)], ("z",), ("z/bn",)),
    ]
    state = caffemodel_to_state_dict(write_caffemodel(tmp_path / "s.caffemodel", layers))
    s32 = np.float64(F32(s))  # the factor as the file stores it
    np.testing.assert_array_equal(
        state["c_bn.running_mean"].numpy(), (stored_mean / s32).astype(F32)
    )
    np.testing.assert_array_equal(state["c_bn.running_var"].numpy(), (stored_var / s32).astype(F32))
    np.testing.assert_allclose(state["c_bn.running_mean"].numpy(), bn.mean, rtol=1e-6)
    # s = 0 (a BatchNorm never run in training): Caffe uses zero statistics
    assert not state["z_bn.running_mean"].any() and not state["z_bn.running_var"].any()
    # without a Scale layer the BatchNorm has no affine part: gamma 1, beta 0
    assert (state["z_bn.weight"] == 1).all() and (state["z_bn.bias"] == 0).all()


def test_a_batchnorm_epsilon_other_than_pytorchs_is_warned_about(tmp_path: Path) -> None:
    stats = [np.zeros(2, F32), np.ones(2, F32), np.ones(1, F32)]
    default = [Layer("a/bn", "BatchNorm", stats, eps=1e-5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caffemodel_to_state_dict(write_caffemodel(tmp_path / "a.caffemodel", default))
    other = [*default, Layer("b/bn", "BatchNorm", stats, eps=1e-3)]
    with pytest.warns(UserWarning, match=r"1 BatchNorm layers .* \(e\.g\. 'b/bn' \(0\.001\)\)"):
        caffemodel_to_state_dict(write_caffemodel(tmp_path / "b.caffemodel", other))


def test_scale_pairs_with_the_batchnorm_that_wrote_its_input(tmp_path: Path) -> None:
    """ResNet-style in-place layers (bn_conv1, scale_conv1 on blob conv1), with blob names
    and, in a file without them, by order."""
    rng = np.random.default_rng(14)
    bn1, bn2 = random_bn(2, rng), random_bn(2, rng)
    w = np.ones((2, 1, 1, 1), F32)
    one = np.ones(1, F32)

    def layers(named: bool) -> list[Layer]:
        def io(bottom: str, top: str) -> dict:
            return {"bottom": (bottom,), "top": (top,)} if named else {}

        return [
            Layer("conv1", "Convolution", [w], **io("data", "conv1")),
            Layer("bn_conv1", "BatchNorm", [bn1.mean, bn1.var, one], **io("conv1", "conv1")),
            Layer("bn_side", "BatchNorm", [bn2.mean, bn2.var, one], **io("data", "side")),
            Layer("scale_side", "Scale", [bn2.gamma, bn2.beta], **io("side", "side")),
            Layer("scale_conv1", "Scale", [bn1.gamma, bn1.beta], **io("conv1", "conv1")),
        ]

    state = caffemodel_to_state_dict(write_caffemodel(tmp_path / "r.caffemodel", layers(True)))
    for module, bn in (("bn_conv1", bn1), ("bn_side", bn2)):
        np.testing.assert_array_equal(state[f"{module}.weight"].numpy(), bn.gamma)
        np.testing.assert_array_equal(state[f"{module}.bias"].numpy(), bn.beta)
        np.testing.assert_array_equal(state[f"{module}.running_mean"].numpy(), bn.mean)
    # without blob names the Scale goes with the BatchNorm just before it; here the last
    # Scale follows another Scale, so that file is refused
    path = write_caffemodel(tmp_path / "u.caffemodel", layers(False)[:4])
    state = caffemodel_to_state_dict(path)
    np.testing.assert_array_equal(state["bn_side.weight"].numpy(), bn2.gamma)
    assert (state["bn_conv1.weight"] == 1).all()
    with pytest.raises(DataError, match="'scale_conv1' \\(Scale\\) does not follow a BatchNorm"):
        caffemodel_to_state_dict(write_caffemodel(tmp_path / "v.caffemodel", layers(False)))


def test_converted_batchnorm_computes_caffes_inference_formula(tmp_path: Path) -> None:
    """Caffe: y = gamma * (x - m/s) / sqrt(v/s + eps) + beta, worked out in float64."""
    rng = np.random.default_rng(5)
    c = 3
    bn = random_bn(c, rng)
    s = F32(8.0)
    norm, _ = bn_layers("x", "x", bn, "batchnorm", scale_factor=float(s))
    state = caffemodel_to_state_dict(write_caffemodel(tmp_path / "b.caffemodel", norm))
    module = nn.BatchNorm2d(c, eps=1e-5).eval()
    module.load_state_dict({k.removeprefix("x_bn."): v for k, v in state.items()}, strict=False)
    x = rng.normal(size=(2, c, 2, 2))
    stored_m, stored_v = np.float64(bn.mean * s), np.float64(bn.var * s)
    expected = np.empty_like(x)
    for ch in range(c):
        mean, var = stored_m[ch] / s, stored_v[ch] / s
        expected[:, ch] = bn.gamma[ch] * (x[:, ch] - mean) / np.sqrt(var + 1e-5) + bn.beta[ch]
    with torch.no_grad():
        got = module(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bn_without_statistics_gets_zero_mean_unit_variance_and_one_warning(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(6)
    layers = [
        *conv_bn_block("a", "data", 2, 3, 1, "bn2", rng).layers,
        *conv_bn_block("b", "a/bn", 3, 4, 1, "bn2", rng).layers,
    ]
    path = write_caffemodel(tmp_path / "old.caffemodel", layers, v1=True)
    with pytest.warns(UserWarning, match=r"2 BN layers .* \(e\.g\. 'a/bn'\) store no mean") as rec:
        state = caffemodel_to_state_dict(path)
    assert len(rec) == 1
    assert state.bn_layouts == {BN_LAYOUT_BN_NO_STATS}
    assert (state["b_bn.running_mean"] == 0).all() and (state["b_bn.running_var"] == 1).all()
    np.testing.assert_array_equal(state["b_bn.weight"].numpy(), layers[-2].blobs[0].reshape(-1))


def test_v1_bn_numbers_of_forks_are_recognised_by_their_blobs(tmp_path: Path) -> None:
    vec = [np.ones((1, 3, 1, 1), F32), np.zeros((1, 3, 1, 1), F32)]
    deconv = np.ones((3, 2, 4, 4), F32)
    layers = [Layer("x/bn", 40, vec), Layer("y/bn", 39, vec)]
    with pytest.warns(UserWarning):
        state = caffemodel_to_state_dict(
            write_caffemodel(tmp_path / "a.caffemodel", layers, v1=True)
        )
    assert {"x_bn.weight", "y_bn.weight"} <= set(state)
    path = write_caffemodel(tmp_path / "b.caffemodel", [Layer("up", 39, [deconv])], v1=True)
    with pytest.raises(DataError, match=r"Caffe layer 'up' \(Deconvolution\)"):
        caffemodel_to_state_dict(path)


def test_inner_product_after_a_conv_map_flattens_like_torch(tmp_path: Path) -> None:
    """Caffe's InnerProduct reads the (C, H, W) blob in memory order, index (c*H + h)*W + w."""
    rng = np.random.default_rng(7)
    c, h, w, out = 2, 3, 4, 5
    weight = rng.normal(size=(out, c * h * w)).astype(F32)
    x = rng.normal(size=(c, h, w))
    expected = np.zeros(out)
    for o in range(out):
        for ci in range(c):
            for hi in range(h):
                for wi in range(w):
                    expected[o] += weight[o, (ci * h + hi) * w + wi] * x[ci, hi, wi]
    for transpose in (False, True):
        stored = weight.T.copy() if transpose else weight
        layer = Layer("loss1/fc", "InnerProduct", [stored], transpose=transpose)
        state = caffemodel_to_state_dict(write_caffemodel(tmp_path / "fc.caffemodel", [layer]))
        fc = nn.Linear(c * h * w, out, bias=False)
        fc.load_state_dict({"weight": state["loss1_fc.weight"]})
        with torch.no_grad():
            got = fc(torch.from_numpy(x).float().unsqueeze(0).flatten(1))[0].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ full GoogLeNet-BN


def _googlenet_bn_modules() -> list[str]:
    """softmine's module names for lim0606's layers, in Cadene's BN-Inception convention."""
    names = ["conv1_7x7_s2", "conv2_3x3_reduce", "conv2_3x3"]
    for name, _, c1, _, _, _, _, proj in GOOGLENET_BN_INCEPTION:
        parts = ["3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1", "double_3x3_2"]
        parts = (["1x1"] if c1 else []) + parts + (["pool_proj"] if proj else [])
        names += [f"{name}_{part}" for part in parts]
    for prefix, *_ in GOOGLENET_BN_AUX:
        names += [f"{prefix}_conv", f"{prefix}_fc"]
    return names


@pytest.fixture(scope="module", params=["batchnorm", "bn"])
def googlenet_bn(request, tmp_path_factory):
    """A full-size random GoogLeNet-BN .caffemodel in lim0606's layer names, and its layers:
    lim0606's real layer list (BatchNorm + Scale), or the same network with custom BN layers."""
    rng = np.random.default_rng(13)
    if request.param == "batchnorm":
        layers = lim0606_layers(rng)
    else:
        layers = googlenet_bn_layers(request.param, rng)
    path = tmp_path_factory.mktemp("caffe") / f"googlenet_bn_{request.param}.caffemodel"
    return write_caffemodel(path, layers), {layer.name: layer for layer in layers}


@pytest.mark.slow  # writes and reads 16 M parameters
def test_full_googlenet_bn_converts_every_layer(googlenet_bn) -> None:
    path, layers = googlenet_bn
    state = caffemodel_to_state_dict(path)
    modules = _googlenet_bn_modules()
    assert len(modules) == 69 + 2 + 2  # trunk convs, aux convs, aux fc (71 Convolution layers)
    expected_keys = {f"{m}.weight" for m in modules}
    expected_keys |= {f"{m}_bn.{p}" for m in modules for p in _BN_KEYS}
    expected_keys |= {f"{c}.{p}" for c in _CLASSIFIERS for p in ("weight", "bias")}
    assert set(state) == expected_keys
    for key, tensor in state.items():
        layer = layers[state.origin[key]]
        per_channel = layer.type in ("BatchNorm", "Scale", "BN")  # (C,) or (1, C, 1, 1)
        blobs = [b.reshape(-1).astype(np.float64) if per_channel else b for b in layer.blobs]
        if layer.type == "BatchNorm":  # statistics * s, s
            value = blobs[0 if key.endswith(".running_mean") else 1] / blobs[2][0]
        else:
            value = blobs[_BLOB_INDEX[key.rpartition(".")[2]]]
        np.testing.assert_array_equal(tensor.numpy(), value.astype(np.float32), err_msg=key)


def test_the_hand_written_network_has_lim0606s_weighted_layers() -> None:
    """googlenet_bn_layers (which also writes the custom-BN layout) against the layer list
    derived from lim0606's train_val.prototxt: the same 222 layers, types and shapes."""
    hand = googlenet_bn_layers("batchnorm", np.random.default_rng(0))
    written = [(x.name, x.type, tuple(np.shape(b) for b in x.blobs)) for x in hand if x.blobs]
    real = [(r.name, r.type, r.shapes) for r in lim0606_layer_list() if r.shapes]
    assert len(real) == 222 and written == real


# Blob index of each parameter in Convolution / InnerProduct / Scale / BN layers.
_BLOB_INDEX = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
_BN_KEYS = ("running_mean", "running_var", "weight", "bias")
_CLASSIFIERS = ("loss1_classifier", "loss2_classifier", "last_linear")


def _expected_from_caffe(model_keys, layers: dict[str, Layer]) -> dict[str, np.ndarray]:
    """What each model tensor must hold, read off the Caffe layers written (float64 division
    for BatchNorm statistics), found by the Caffe name of its module."""
    out = {}
    for key in model_keys:
        module, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        if not module.endswith("_bn"):
            out[key] = layers[_caffe_name(module)].blobs[0 if param == "weight" else 1]
            continue
        bn = layers[f"{_caffe_name(module[:-3])}/bn"]
        flat = [b.reshape(-1).astype(np.float64) for b in bn.blobs]
        if bn.type == "BN":  # scale, shift, mean, variance
            value = flat[{"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}[param]]
        elif param in ("weight", "bias"):  # the Scale layer's gamma, beta
            value = layers[f"{bn.name}/sc"].blobs[0 if param == "weight" else 1]
        else:  # BatchNorm: statistics * s, s
            value = flat[0 if param == "running_mean" else 1] / flat[2][0]
        out[key] = np.asarray(value).astype(F32)
    return out


@pytest.mark.slow  # builds BN-Inception twice and loads 16 M parameters
def test_full_googlenet_bn_loads_into_bninception(googlenet_bn) -> None:
    """Every tensor of lim0606's network, branches and classifier included, and through
    the authors' backbone config."""
    from hydra import compose, initialize_config_dir

    from softmine.config import build

    path, layers = googlenet_bn
    net = authors_trunk(path)
    own = net.state_dict()
    expected = _expected_from_caffe(own, layers)
    assert len(expected) == len(caffemodel_to_state_dict(path)) - 4  # aux classifiers skipped
    for key, value in expected.items():
        np.testing.assert_array_equal(own[key].numpy(), value, err_msg=key)

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose(
            "train", overrides=["backbone=bninception_authors", f"backbone.pretrained={path}"]
        )
    trunk = build(cfg.backbone, "backbone").trunk.state_dict()
    assert set(trunk) <= set(own) and "loss2_fc_bn.running_var" in trunk
    for key, value in _expected_from_caffe(trunk, layers).items():
        np.testing.assert_array_equal(trunk[key].numpy(), value, err_msg=key)


def test_a_file_of_the_other_inception_widths_names_the_widths_to_set(tmp_path: Path) -> None:
    from softmine.errors import ConfigError
    from softmine.models import BNInception

    proj = Layer("inception_4c/pool_proj", "Convolution", [np.zeros((96, 576, 1, 1), F32)])
    path = write_caffemodel(tmp_path / "googlenet_bn.caffemodel", [proj])
    with pytest.raises(DataError, match=r"96-channel .* set backbone\.trunk\.widths=googlenet_bn"):
        BNInception(pretrained=str(path), conv_bias=False)
    with pytest.raises(ConfigError, match="widths"):
        BNInception(widths="lim0606")


# Cadene's BN-Inception part names -> lim0606's Caffe ones (the inverse of the conversion).
_CAFFE_PARTS = {
    "double_3x3_reduce": "double3x3_reduce",
    "double_3x3_1": "double3x3a",
    "double_3x3_2": "double3x3b",
}


def _caffe_name(module: str) -> str:
    """``inception_3a_double_3x3_1`` -> ``inception_3a/double3x3a``, ``conv1_7x7_s2`` ->
    ``conv1/7x7_s2``, ``loss1_fc`` -> ``loss1/fc``, ``last_linear`` -> ``loss3/classifier``."""
    if module == "last_linear":
        return "loss3/classifier"
    head, _, part = module.partition("_")
    if head == "inception":
        block, _, part = part.partition("_")
        head = f"inception_{block}"
    return f"{head}/{_CAFFE_PARTS.get(part, part)}"


@pytest.mark.slow  # writes and loads 11 M parameters
def test_the_bninception_config_takes_a_caffemodel(tmp_path: Path) -> None:
    """``backbone.pretrained=<file>.caffemodel``: a Cadene-shaped network (conv biases)
    saved in Caffe's layout and names comes back tensor for tensor."""
    from hydra import compose, initialize_config_dir

    from softmine.config import build
    from softmine.models import BNInception

    torch.manual_seed(0)
    source = BNInception(num_classes=1000)
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    own = {k: v.numpy() for k, v in source.state_dict().items()}
    layers = [
        Layer(
            "loss3/classifier", "InnerProduct", [own["last_linear.weight"], own["last_linear.bias"]]
        )
    ]
    for key in own:
        module = key.rpartition(".")[0]
        if not key.endswith(".weight") or module == "last_linear":
            continue
        if module.endswith("_bn"):
            name = f"{_caffe_name(module[:-3])}/bn"
            s = np.ones(1, F32)
            stats = [own[f"{module}.running_mean"], own[f"{module}.running_var"], s]
            layers += [
                Layer(name, "BatchNorm", stats, (module[:-3],), (name,)),
                Layer(f"{name}/sc", "Scale", [own[key], own[f"{module}.bias"]], (name,), (name,)),
            ]
        else:
            layers.append(
                Layer(
                    _caffe_name(module),
                    "Convolution",
                    [own[key], own[f"{module}.bias"]],
                    (),
                    (module,),
                )
            )
    path = write_caffemodel(tmp_path / "bn_inception.caffemodel", layers)
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides=["backbone=bninception", f"backbone.pretrained={path}"])
    trunk = build(cfg.backbone, "backbone").trunk
    loaded = trunk.state_dict()
    for key, value in own.items():
        if key.startswith("last_linear") or key.endswith("num_batches_tracked"):
            continue
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("content", ["empty", "random", "pth", "prototxt", "truncated"])
def test_a_file_that_is_not_a_caffemodel_is_one_data_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.caffemodel"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "random":
        path.write_bytes(np.random.default_rng(8).bytes(4096))
    elif content == "pth":
        torch.save({"conv.weight": torch.ones(2, 2)}, path)
    elif content == "prototxt":
        path.write_text('name: "net"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n}\n')
    else:
        layers, _, _ = _subset("batchnorm", np.random.default_rng(9))
        full = write_caffemodel(tmp_path / "full.caffemodel", layers).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="bad.caffemodel") as info:
        caffemodel_to_state_dict(path)
    assert "\n" not in str(info.value)


def test_a_layer_type_that_cannot_be_converted_is_named(tmp_path: Path) -> None:
    layers = [
        Layer("conv", "Convolution", [np.ones((2, 1, 1, 1), F32)], ("data",), ("conv",)),
        Layer("conv/prelu", "PReLU", [np.ones(2, F32)], ("conv",), ("conv",)),
    ]
    path = write_caffemodel(tmp_path / "p.caffemodel", layers)
    with pytest.raises(DataError, match=r"Caffe layer 'conv/prelu' \(PReLU\) has weights"):
        caffemodel_to_state_dict(path)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [
                Layer("conv", "Convolution", [np.ones((2, 1, 1, 1), F32)], (), ("conv",)),
                Layer("conv/sc", "Scale", [np.ones(2, F32)], ("conv",), ("conv",)),
            ],
            r"Caffe layer 'conv/sc' \(Scale\) does not follow a BatchNorm",
        ),
        (
            [Layer("conv.1", "Convolution", [np.ones((2, 1, 1, 1), F32)])],
            r"Caffe layer 'conv\.1' \(Convolution\) has a name that cannot be",
        ),
        (
            [
                Layer("a/b", "Convolution", [np.ones((2, 1, 1, 1), F32)]),
                Layer("a_b", "Convolution", [np.ones((2, 1, 1, 1), F32)]),
            ],
            r"Caffe layer 'a_b' \(Convolution\) and the Caffe layer 'a/b' .* both convert to 'a_b.weight'",
        ),
        (
            [Layer("c/bn", "BatchNorm", [np.ones(2, F32), np.ones(2, F32)])],
            r"Caffe layer 'c/bn' \(BatchNorm\) has 2 blobs; expected 3",
        ),
    ],
)
def test_layers_that_cannot_be_mapped_are_named(tmp_path: Path, layers, message: str) -> None:
    path = write_caffemodel(tmp_path / "x.caffemodel", layers)
    with pytest.raises(DataError, match=message):
        caffemodel_to_state_dict(path)


# ------------------------------------------------------------------------------ loading


class _Piece(nn.Module):
    """The modules of the subset file, named as in softmine's BN-Inception."""

    def __init__(self, conv_bias: bool = False) -> None:
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 4, 7, bias=conv_bias)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(4)
        self.inception_3a_double_3x3_1 = nn.Conv2d(4, 5, 3, bias=conv_bias)
        self.inception_3a_double_3x3_1_bn = nn.BatchNorm2d(5)
        self.loss1_conv = nn.Conv2d(5, 3, 1, bias=conv_bias)
        self.loss1_conv_bn = nn.BatchNorm2d(3)
        self.loss1_fc = nn.Linear(12, 6, bias=False)
        self.loss1_fc_bn = nn.BatchNorm1d(6)
        self.loss1_classifier = nn.Linear(6, 7)
        self.last_linear = nn.Linear(5, 8)


def test_read_state_dict_converts_caffemodel_paths(tmp_path: Path) -> None:
    layers, blocks, linear = _subset("batchnorm", np.random.default_rng(10))
    path = write_caffemodel(tmp_path / "googlenet_bn.caffemodel", layers)
    state = read_state_dict(str(path))
    _assert_state_equal(state, _expected(blocks, linear))
    model = _Piece()
    load_matching_state_dict(model, state, source=str(path))
    np.testing.assert_array_equal(model.loss1_fc_bn.running_var.numpy(), blocks["loss1_fc"].bn.var)


def test_a_caffemodel_url_is_downloaded_once_into_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers, blocks, linear = _subset("bn", np.random.default_rng(15))
    published = write_caffemodel(tmp_path / "published.caffemodel", layers)
    downloads: list[str] = []

    def download(url: str, dst: str, progress: bool = True) -> None:
        downloads.append(url)
        shutil.copyfile(published, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://example.org/snapshots/googlenet_bn.caffemodel"
    for _ in range(2):
        _assert_state_equal(read_state_dict(url), _expected(blocks, linear))
    assert downloads == [url]
    assert (tmp_path / "hub" / "checkpoints" / "googlenet_bn.caffemodel").is_file()

    def offline(url: str, dst: str, progress: bool = True) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DataError, match=r"pretrained=/path/to/file\.caffemodel"):
        read_state_dict("https://example.org/other.caffemodel")


def test_loading_errors_name_the_caffe_layers(tmp_path: Path) -> None:
    layers, _, _ = _subset("batchnorm", np.random.default_rng(11))
    path = write_caffemodel(tmp_path / "g.caffemodel", layers)
    state = read_state_dict(str(path))
    with pytest.raises(DataError) as info:
        load_matching_state_dict(_Piece(conv_bias=True), state, source=str(path))
    msg = str(info.value)
    assert "3 missing" in msg
    assert "conv1_7x7_s2.bias (not in the Caffe layer 'conv1/7x7_s2' (Convolution))" in msg
    model = _Piece()
    model.loss1_fc = nn.Linear(10, 6, bias=False)
    del model.last_linear
    with pytest.raises(DataError) as info:
        load_matching_state_dict(model, state, source=str(path))
    msg = str(info.value)
    assert "last_linear.weight from Caffe layer 'loss3/classifier' (InnerProduct)" in msg
    assert (
        "loss1_fc.weight from Caffe layer 'loss1/fc' (InnerProduct): file (6, 12) vs model (6, 10)"
        in msg
    )
    assert "2 unexpected" in msg and "1 mis-shaped" in msg and "missing" not in msg


# ------------------------------------------------------------------------------ the command


def _convert(*args: str) -> subprocess.CompletedProcess:
    return run_forked(
        [sys.executable, "-m", "softmine", "data", "convert-caffemodel", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # a subprocess importing torch
def test_convert_command_writes_a_plain_state_dict(tmp_path: Path) -> None:
    layers, blocks, linear = _subset("bn", np.random.default_rng(12))
    path = write_caffemodel(tmp_path / "g.caffemodel", layers)
    out = tmp_path / "out" / "g.pth"
    done = _convert(str(path), str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    n_params = sum(v.size for k, v in _expected(blocks, linear).items() if "running_" not in k)
    expected = _expected(blocks, linear)
    with_weights = sum(1 for layer in layers if layer.blobs)
    assert with_weights == 10 and len(expected) == 24
    assert f"{len(layers)} Caffe layers, 10 with weights -> 24 tensors" in lines[0]
    assert f"{n_params:,} parameters" in lines[0] and "BatchNorm layout: BN;" in lines[0]
    saved = torch.load(out, weights_only=True)
    assert type(saved) is dict
    _assert_state_equal(saved, _expected(blocks, linear))


@pytest.mark.slow  # a subprocess importing torch
def test_convert_command_missing_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = _convert(str(tmp_path / "in.caffemodel"), str(tmp_path / "out.pth"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "in.caffemodel" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "out.pth").exists()


def test_convert_command_unreadable_input_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.caffemodel"
    source.write_text("not a model")
    with pytest.raises(SystemExit) as info:
        data_command.main(["convert-caffemodel", str(source), str(tmp_path / "out.pth")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "in.caffemodel" in err
    assert list(tmp_path.iterdir()) == [source]


def test_convert_command_unwritable_output_is_one_line_and_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers, _, _ = _subset("bn", np.random.default_rng(3))
    source = write_caffemodel(tmp_path / "in.caffemodel", layers)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:  # a folder that is a file: nothing can go there
        data_command.main(["convert-caffemodel", str(source), str(blocker / "out.pth")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1
    assert "choose another path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.caffemodel"]
