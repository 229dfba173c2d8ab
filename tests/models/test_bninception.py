"""BN-Inception: state-dict compatibility with the community's converted ImageNet weights.

The reference is the architecture Cadene's ``pretrainedmodels`` package builds
(``bninception(pretrained=None)``, the network its ``bn_inception-52deb4733.pth``
file was made for). ``pretrainedmodels`` is a dev (test-only) dependency; its
``bninception.py`` is loaded by file path because the package's ``__init__`` imports
``six``, which it does not declare.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType
from urllib.error import URLError

import pytest
import torch

from softmine.errors import ConfigError, DataError
from softmine.models import BNINCEPTION_INPUT_NORM, BNINCEPTION_URL, BNInception, InputNormalize

# Published architecture figures (pretrainedmodels' BNInception with its 1000-way classifier):
# 485 state-dict entries (incl. BatchNorm counters), 11,295,240 parameters.
REFERENCE_ENTRIES = 485
REFERENCE_PARAMETERS = 11_295_240


def _reference_module() -> ModuleType:
    spec = importlib.util.find_spec("pretrainedmodels")
    if spec is None or spec.origin is None:
        pytest.skip("pretrainedmodels (dev dependency) is not installed")
    path = Path(spec.origin).parent / "models" / "bninception.py"
    mod_spec = importlib.util.spec_from_file_location("_pm_bninception", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    """pretrainedmodels' BNInception without weights, randomised BatchNorm statistics."""
    torch.manual_seed(0)
    net = _reference_module().bninception(pretrained=None).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def test_state_dict_keys_and_shapes_match_pretrainedmodels(reference):
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in BNInception(num_classes=1000).state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs


def test_architecture_size_matches_the_published_figures():
    net = BNInception(num_classes=1000)
    assert len(net.state_dict()) == REFERENCE_ENTRIES
    assert sum(p.numel() for p in net.parameters()) == REFERENCE_PARAMETERS
    trunk = BNInception()
    assert trunk.out_features == 1024 and not any(
        k.startswith("last_linear") for k in trunk.state_dict()
    )


def test_same_weights_give_the_same_features_as_pretrainedmodels(reference):
    ours = BNInception(num_classes=1000).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = reference.features(x)
        torch.testing.assert_close(ours.feature_map(x), expected, rtol=1e-4, atol=1e-4)
        logits = reference.last_linear(expected.mean(dim=(2, 3)))
        torch.testing.assert_close(ours(x), logits, rtol=1e-4, atol=1e-4)


def test_load_from_a_local_file_with_old_style_shapes(reference, tmp_path):
    """A file like the TSN/Caffe ports: BatchNorm tensors stored as (1, C), no counters."""
    state = {
        k: (v[None] if k.endswith(("_bn.weight", "_bn.running_mean")) else v)
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "bn_inception.pth"
    torch.save(state, path)
    net = BNInception(pretrained=str(path))  # no classifier: last_linear is skipped
    own = net.state_dict()
    for k, v in reference.state_dict().items():
        if k.startswith("last_linear") or k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)

    aux = BNInception(pretrained=str(path), embedding_from="inception_4e", partial_load=True)
    assert not any(k.startswith("inception_5") for k in aux.state_dict())
    torch.testing.assert_close(aux.inception_4e_3x3.weight, reference.inception_4e_3x3.weight)


def test_pretrained_true_downloads_the_published_file(reference, monkeypatch):
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return reference.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    net = BNInception(pretrained=True)
    assert calls == ["http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"]
    assert calls[0] == BNINCEPTION_URL
    torch.testing.assert_close(net.conv1_7x7_s2.weight, reference.conv1_7x7_s2.weight)
    BNInception(pretrained="https://example.org/weights/bn.pth")
    assert calls[-1] == "https://example.org/weights/bn.pth"


def test_download_failure_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DataError, match="backbone.pretrained=/path/to/file.pth"):
        BNInception(pretrained=True)


def test_bad_weight_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        BNInception(pretrained=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable"):
        BNInception(pretrained=str(tmp_path / "junk.pth"))
    other = torch.nn.Linear(3, 4).state_dict()
    torch.save(other, tmp_path / "linear.pth")
    with pytest.raises(DataError, match="unexpected.*missing"):
        BNInception(pretrained=str(tmp_path / "linear.pth"))


def test_mis_shaped_weights_are_a_data_error(reference, tmp_path):
    state = dict(reference.state_dict())
    state["conv1_7x7_s2.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DataError, match=r"mis-shaped.*conv1_7x7_s2.weight"):
        BNInception(pretrained=str(tmp_path / "bad.pth"))


def test_authors_branches_and_named_features():
    """lim0606's GoogLeNet-BN: loss1 after 3c (4x4 grid), loss2 after 4e (2x2), pool5; no conv bias."""
    torch.manual_seed(0)
    net = BNInception(
        embedding_from="inception_4e",
        features=("inception_3c", "pool5"),
        conv_bias=False,
        widths="googlenet_bn",
    ).eval()
    assert net.feature_dims == {"inception_3c": 1024, "inception_4e": 1024, "pool5": 1024}
    assert net.out_features == 1024
    assert not any(k.endswith(".bias") and "_bn" not in k for k in net.state_dict())
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # train_val.prototxt: loss1/conv 576->128, loss1/fc 128*4*4->1024; loss2/conv 1024->128, fc 512->1024
    assert shapes["loss1_conv.weight"] == (128, 576, 1, 1)
    assert shapes["loss1_fc.weight"] == (1024, 2048)
    assert shapes["loss2_conv.weight"] == (128, 1024, 1, 1)
    assert shapes["loss2_fc.weight"] == (1024, 512)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out, feats = net.forward_features(x)
        torch.testing.assert_close(out, feats["inception_4e"])
        torch.testing.assert_close(net(x), out)
        # pool5 is the global average of inception_5b; the branches end in a ReLU
        torch.testing.assert_close(feats["pool5"], net.feature_map(x).mean(dim=(2, 3)))
    assert (feats["inception_3c"] >= 0).all() and (feats["inception_4e"] >= 0).all()
    with pytest.raises(ValueError, match="at least 96"):
        net(torch.rand(1, 3, 64, 64))
    only_4e = BNInception(embedding_from="inception_4e_aux")  # the old name still works
    assert only_4e.feature_dims == {"inception_4e": 1024}
    assert not any(k.startswith(("inception_5", "loss1_")) for k in only_4e.state_dict())


def test_conv_biases_fold_into_batchnorm_exactly(reference, tmp_path):
    """Cadene's file (conv biases, no branches) into the bias-free authors' net: same outputs."""
    torch.save(reference.state_dict(), tmp_path / "cadene.pth")
    ours = BNInception(pretrained=str(tmp_path / "cadene.pth"), conv_bias=False).double()
    ref = copy.deepcopy(reference).double()
    x = torch.rand(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        for mode in (False, True):  # eval: shifted running means; train: the batch mean absorbs b
            ours.train(mode)
            ref.train(mode)
            torch.testing.assert_close(ours.feature_map(x), ref.features(x), rtol=1e-6, atol=1e-6)


def test_cadene_weights_have_no_branches_an_error_unless_partial_load(reference, tmp_path, caplog):
    """Cadene's port has no loss1/loss2 branches: strict by default, naming them (loss2 is
    the embedding); partial_load=True loads the rest and warns, listing what stayed random."""
    torch.save(reference.state_dict(), tmp_path / "cadene.pth")
    kwargs = {
        "pretrained": str(tmp_path / "cadene.pth"),
        "embedding_from": "inception_4e",
        "features": ("inception_3c", "pool5"),
        "conv_bias": False,
    }
    with pytest.raises(DataError) as info:
        BNInception(**kwargs)
    msg = str(info.value)
    assert "auxiliary branch loss1 (Caffe loss1/conv, loss1/fc" in msg
    assert (
        "auxiliary branch loss2 (Caffe loss2/conv, loss2/fc and their BatchNorm layers, the embedding)"
        in msg
    )
    assert "backbone.trunk.partial_load=true" in msg and "\n" not in msg
    with caplog.at_level("WARNING"):
        net = BNInception(**kwargs, partial_load=True)
    assert "loss1_conv, loss1_conv_bn, loss1_fc, loss1_fc_bn" in caplog.text
    assert "loss2_conv, loss2_conv_bn, loss2_fc, loss2_fc_bn" in caplog.text
    assert "random" in caplog.text
    torch.testing.assert_close(net.inception_5b_1x1.weight, reference.inception_5b_1x1.weight)


def test_config_errors():
    with pytest.raises(ConfigError, match="embedding_from"):
        BNInception(embedding_from="pool4")
    with pytest.raises(ConfigError, match="pretrained"):
        BNInception(pretrained=2.5)
    with pytest.raises(ConfigError, match="pool5"):
        BNInception(num_classes=1000, embedding_from="inception_4e_aux")
    with pytest.raises(ConfigError, match="features"):
        BNInception(features=("inception_4d",))


def test_input_convention_matches_pretrainedmodels_transform():
    """pretrainedmodels' TransformImage: RGB [0,1] -> BGR -> x255 -> minus (104, 117, 128)."""
    norm = InputNormalize(**BNINCEPTION_INPUT_NORM)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    expected = x[:, [2, 1, 0]] * 255 - torch.tensor([104.0, 117.0, 128.0]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-4)
