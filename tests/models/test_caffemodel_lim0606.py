"""lim0606's GoogLeNet-BN, from its real layer list: every weighted layer maps, nothing falls back.

The ``.caffemodel`` files here are written from ``tests/fixtures/googlenet_bn_layers.tsv``, the
layer list derived from lim0606's ``train_val.prototxt`` (the ImageNet network the authors
fine-tuned; see that file's header). Expected tensors are worked out from the Caffe layers
written, by the naming table of docs/pretrained-weights.md, not by softmine's converter.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from softmine.config import build
from softmine.errors import DataError
from softmine.models.caffe import caffemodel_to_state_dict
from tests.caffe_files import (
    Layer,
    authors_trunk,
    lim0606_layer_list,
    lim0606_layers,
    write_caffemodel,
)
from tests.conftest import REPO, compose

F32 = np.float32
# docs/pretrained-weights.md: lim0606's part names -> Cadene's
_PARTS = {"double3x3_reduce": "double_3x3_reduce", "double3x3a": "double_3x3_1"}
_PARTS |= {"double3x3b": "double_3x3_2"}
_AUX_CLASSIFIERS = ("loss1_classifier.", "loss2_classifier.")  # converted, never loaded


def _module(caffe_name: str) -> str:
    if caffe_name == "loss3/classifier":
        return "last_linear"
    return "_".join(_PARTS.get(part, part) for part in caffe_name.split("/"))


def _expected(layers: list[Layer]) -> dict[str, np.ndarray]:
    """Model key -> the values Caffe's layers hold for it (BatchNorm statistics / s in float64)."""
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        b = [np.asarray(x) for x in layer.blobs]
        if not b:
            continue
        if layer.type in ("Convolution", "InnerProduct"):
            out[f"{_module(layer.name)}.weight"] = b[0]
            if len(b) == 2:
                out[f"{_module(layer.name)}.bias"] = b[1]
        elif layer.type == "BatchNorm":  # X/bn: mean * s, variance * s, s
            module = _module(layer.name)  # X_bn
            s = np.float64(b[2][0])
            out[f"{module}.running_mean"] = (b[0].astype(np.float64) / s).astype(F32)
            out[f"{module}.running_var"] = (b[1].astype(np.float64) / s).astype(F32)
        elif layer.type == "Scale":  # X/bn/sc: gamma, beta of X_bn
            module = _module(layer.name.removesuffix("/sc"))
            out[f"{module}.weight"], out[f"{module}.bias"] = b[0], b[1]
        else:
            raise AssertionError(f"{layer.name}: {layer.type} has weights")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lim0606")


@pytest.fixture(scope="module")
def full(folder: Path) -> tuple[Path, list[Layer]]:
    """A full-size random GoogLeNet-BN .caffemodel of the real layer list, and its layers."""
    layers = lim0606_layers(np.random.default_rng(0))
    return write_caffemodel(folder / "googlenet_bn.caffemodel", layers), layers


def _authors_backbone(path: Path, *overrides: str) -> torch.nn.Module:
    """The backbone of experiment=authors_cub, its weights from ``path``."""
    cfg = compose(["experiment=authors_cub", f"backbone.pretrained={path}", *overrides])
    return build(cfg.backbone, "backbone")


def _authors_experiments() -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / "experiment").glob("authors_*.yaml"))


def test_the_layer_list_has_lim0606s_222_weighted_layers() -> None:
    rows = lim0606_layer_list()
    weighted = [r for r in rows if r.shapes]
    assert len(weighted) == 222
    assert Counter(r.type for r in weighted) == {
        "Convolution": 71,  # 3 stem + 64 in the ten inception modules + 2 branch convs
        "BatchNorm": 73,  # one after each convolution and each branch fc
        "Scale": 73,
        "InnerProduct": 5,  # loss1/fc, loss2/fc and the three ImageNet classifiers
    }
    shapes = {r.name: r.shapes for r in weighted}
    assert shapes["conv1/7x7_s2"] == ((64, 3, 7, 7),)  # bias_term: false
    assert shapes["inception_4c/pool_proj"] == ((96, 576, 1, 1),)  # lim0606's 96, not 128
    assert shapes["loss1/fc"] == ((1024, 128 * 4 * 4),)  # 14 x 14 -> 5x5/3 pool -> 4 x 4
    assert shapes["loss2/fc"] == ((1024, 128 * 2 * 2),)  # 7 x 7 -> 2 x 2
    assert shapes["loss3/classifier"] == ((1000, 1024), (1000,))
    assert shapes["loss2/fc/bn"] == ((1024,), (1024,), (1,))
    # every BatchNorm is read by a Scale (gamma, beta) that follows it
    for i, row in enumerate(rows):
        if row.type == "BatchNorm":
            nxt = rows[i + 1]
            assert nxt.type == "Scale" and nxt.bottom == row.top and len(nxt.shapes) == 2


@pytest.mark.slow
def test_every_weighted_layer_converts_and_loads(full: tuple[Path, list[Layer]]) -> None:
    """All 222 layers give tensors; all but the two ImageNet auxiliary classifiers land in
    the network, and every tensor of the network comes from the file."""
    path, layers = full
    state = caffemodel_to_state_dict(path)
    weighted = {layer.name for layer in layers if layer.blobs}
    assert state.converted_layers == len(weighted) == 222
    assert set(state.origin.values()) == weighted  # no layer left unconverted
    assert state.bn_without_scale == []
    expected = _expected(layers)
    assert set(state) == set(expected)

    net = authors_trunk(path)
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(own) == {k for k in expected if not k.startswith(_AUX_CLASSIFIERS)}
    for key, value in own.items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)


def test_the_authors_backbone_loads_the_full_file(full: tuple[Path, list[Layer]]) -> None:
    path, layers = full
    expected = _expected(layers)
    trunk = _authors_backbone(path).trunk.state_dict()
    trunk = {k: v for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    assert set(trunk) == {
        k for k in expected if not k.startswith((*_AUX_CLASSIFIERS, "last_linear."))
    }
    for key, value in trunk.items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)


@pytest.mark.parametrize("experiment", _authors_experiments())
def test_every_authors_experiment_loads_its_weights_strictly(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert cfg.backbone.trunk.partial_load is False


@pytest.mark.parametrize(("branch", "role"), [("loss1", ""), ("loss2", ", the embedding")])
@pytest.mark.slow
def test_a_missing_branch_is_an_error_naming_it_unless_partial_load(
    folder: Path,
    full: tuple[Path, list[Layer]],
    caplog: pytest.LogCaptureFixture,
    branch: str,
    role: str,
) -> None:
    _, layers = full
    kept = [layer for layer in layers if not layer.name.startswith(f"{branch}/")]
    # conv and fc, each with BatchNorm, Scale and ReLU; the classifier and its loss
    assert len(layers) - len(kept) == 10
    path = write_caffemodel(folder / f"no_{branch}.caffemodel", kept)
    with pytest.raises(DataError) as info:
        _authors_backbone(path)
    msg = str(info.value)
    assert f"lack the auxiliary branch {branch} (Caffe {branch}/conv, {branch}/fc" in msg
    assert f"BatchNorm layers{role})" in msg and "backbone.trunk.partial_load=true" in msg
    assert "\n" not in msg

    with caplog.at_level(logging.WARNING, logger="softmine.models.bninception"):
        trunk = _authors_backbone(path, "backbone.trunk.partial_load=true").trunk
    assert f"{branch}_conv, {branch}_conv_bn, {branch}_fc, {branch}_fc_bn" in caplog.text
    assert "random" in caplog.text
    expected = _expected(kept)
    for key, value in trunk.state_dict().items():
        if key in expected:
            np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
        elif not key.endswith("num_batches_tracked"):
            assert key.startswith(f"{branch}_"), key  # only the branch kept its initialisation


@pytest.mark.slow
def test_a_batchnorm_without_its_scale_is_an_error_unless_partial_load(
    folder: Path, full: tuple[Path, list[Layer]], caplog: pytest.LogCaptureFixture
) -> None:
    _, layers = full
    gone = {"inception_4a/1x1/bn/sc", "loss2/fc/bn/sc"}
    path = write_caffemodel(
        folder / "no_scale.caffemodel", [layer for layer in layers if layer.name not in gone]
    )
    assert caffemodel_to_state_dict(path).bn_without_scale == [
        "inception_4a/1x1/bn",
        "loss2/fc/bn",
    ]
    with pytest.raises(DataError) as info:
        _authors_backbone(path)
    msg = str(info.value)
    assert (
        "the Scale layer (gamma, beta) of 2 BatchNorm layer(s): 'inception_4a/1x1/bn', "
        "'loss2/fc/bn'" in msg
    )
    assert "backbone.trunk.partial_load=true" in msg

    with caplog.at_level(logging.WARNING, logger="softmine.models.bninception"):
        trunk = _authors_backbone(path, "backbone.trunk.partial_load=true").trunk
    assert "inception_4a_1x1_bn ('inception_4a/1x1/bn')" in caplog.text
    assert "loss2_fc_bn ('loss2/fc/bn')" in caplog.text
    for module in ("inception_4a_1x1_bn", "loss2_fc_bn"):
        bn = getattr(trunk, module)
        assert (bn.weight == 1).all() and (bn.bias == 0).all()
    expected = _expected(layers)
    np.testing.assert_array_equal(
        trunk.loss2_fc_bn.running_var.numpy(), expected["loss2_fc_bn.running_var"]
    )
