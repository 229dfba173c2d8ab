"""Embedding head, frozen BatchNorm, input normalisation, torchvision/timm trunks, backbone configs."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from softmine.config import build
from softmine.errors import ConfigError, DataError
from softmine.models import (
    EmbeddingNet,
    InputNormalize,
    TimmTrunk,
    TinyCNN,
    TorchvisionTrunk,
    VideoEmbeddingNet,
    freeze_batchnorm,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGE_BACKBONES = [
    "tiny",
    "bninception",
    "bninception_authors",
    "resnet18",
    "resnet50",
    "googlenet",
    "timm",
]
VIDEO_BACKBONES = ["video_bninception", "video_resnet50"]


def tiny_net(**kw) -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(TinyCNN(in_channels=3, width=4), **kw)


# ---------------------------------------------------------------- embedding head


@pytest.mark.parametrize("dim", [128, 512, 1024])
def test_embedding_shape_and_unit_norm(dim):
    net = tiny_net(embedding_dim=dim)
    z = net(torch.rand(5, 3, 8, 8))
    assert z.shape == (5, dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_unnormalised_output_is_the_linear_head_of_the_trunk_features():
    net = tiny_net(embedding_dim=16, normalize=False).eval()
    x = torch.rand(3, 3, 8, 8)
    feats = net.trunk(x)
    expected = feats @ net.head.weight.T + net.head.bias
    torch.testing.assert_close(net(x), expected)
    assert not torch.allclose(net(x).norm(dim=1), torch.ones(3))


def test_head_bn_and_relu():
    net = tiny_net(embedding_dim=32, head_bn=True, head_relu=True, normalize=False)
    assert isinstance(net.head_bn, nn.BatchNorm1d)
    z = net(torch.rand(6, 3, 8, 8))
    assert (z >= 0).all() and (z == 0).any()
    # training-mode BatchNorm1d then ReLU: per-dimension batch mean of the pre-ReLU is 0
    pre = net.head_bn(net.head(net.trunk(torch.rand(6, 3, 8, 8))))
    torch.testing.assert_close(pre.mean(0), torch.zeros(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, -4, 12.5, True, None, "512"])
def test_bad_embedding_dim_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="embedding_dim"):
        EmbeddingNet(TinyCNN(), embedding_dim=bad)


def test_trunk_without_out_features_is_a_config_error():
    with pytest.raises(ConfigError, match="out_features"):
        EmbeddingNet(nn.Flatten(), embedding_dim=8)


def test_bad_dropout_is_a_config_error():
    with pytest.raises(ConfigError, match="dropout"):
        tiny_net(dropout=1.5)


# ---------------------------------------------------------------- frozen BatchNorm


def _trunk_bns(net: EmbeddingNet) -> list[nn.BatchNorm2d]:
    return [m for m in net.trunk.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_bn_stays_frozen_and_gets_no_gradient():
    net = tiny_net(embedding_dim=8, head_bn=True, frozen_bn=True)
    bns = _trunk_bns(net)
    assert len(bns) == 3
    for bn in bns:  # non-trivial statistics, so that a frozen layer is distinguishable
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    head_mean = net.head_bn.running_mean.clone()

    net.train()
    assert net.training and all(not bn.training for bn in bns)
    assert net.head_bn.training  # the new head's BatchNorm still trains
    x = torch.rand(4, 3, 8, 8)
    net(x).pow(2).sum().backward()

    for bn, (m, v) in zip(bns, before, strict=True):
        torch.testing.assert_close(bn.running_mean, m, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, v, rtol=0, atol=0)
        assert not bn.weight.requires_grad and bn.weight.grad is None and bn.bias.grad is None
    assert not torch.equal(net.head_bn.running_mean, head_mean)
    convs = [m for m in net.trunk.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.grad is not None for c in convs)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert not any(id(bn.weight) in trainable or id(bn.bias) in trainable for bn in bns)

    # in training mode the trunk normalises with the running statistics: same as eval
    with torch.no_grad():
        train_feats = net.trunk(x)
        net.eval()
        torch.testing.assert_close(net.trunk(x), train_feats)


def test_frozen_bn_trunk_matches_a_hand_computed_batchnorm():
    net = tiny_net(embedding_dim=8, frozen_bn=True).train()
    conv, bn = net.trunk.features[0][0], net.trunk.features[0][1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float32)
    c = conv(x).double()
    shape = (1, -1, 1, 1)
    expected = (c - bn.running_mean.double().view(shape)) / torch.sqrt(
        bn.running_var.double().view(shape) + bn.eps
    ) * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    torch.testing.assert_close(bn(conv(x)).double(), expected, rtol=1e-5, atol=1e-5)


def test_freeze_batchnorm_on_a_torchvision_trunk():
    trunk = TorchvisionTrunk("resnet18")
    assert freeze_batchnorm(trunk) == 20  # resnet18: stem + 2 per block x 8 + 3 downsample
    assert all(
        not p.requires_grad
        for m in trunk.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )


# ---------------------------------------------------------------- input normalisation


def test_bninception_input_convention_by_hand():
    norm = InputNormalize(mean=[104, 117, 128], std=[1, 1, 1], scale=255, channel_order="bgr")
    x = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, 2, 2)
    # BGR order: (0.6, 0.4, 0.2) * 255 - (104, 117, 128) = (49, -15, -77)
    expected = torch.tensor([49.0, -15.0, -77.0]).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-4)


def test_imagenet_normalisation_and_uint8_input():
    norm = InputNormalize()
    x8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x = x8.double() / 255
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x - mean) / std
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x8).double(), expected, rtol=1e-5, atol=1e-5)
    clips = x.float()[None].expand(3, 2, 3, 4, 4)  # (B, T, C, H, W) works too
    torch.testing.assert_close(norm(clips)[1].double(), expected, rtol=1e-5, atol=1e-5)


def test_input_normalisation_errors():
    with pytest.raises(ValueError, match="channels"):
        InputNormalize()(torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="channel_order"):
        InputNormalize(channel_order="gbr")
    with pytest.raises(ConfigError, match="std"):
        InputNormalize(std=[0, 1, 1])
    with pytest.raises(ConfigError, match="equal length"):
        InputNormalize(mean=[0.5, 0.5], std=[1, 1, 1])


def test_input_norm_runs_inside_the_model():
    norm = InputNormalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    net = tiny_net(embedding_dim=8, input_norm=norm).eval()
    x = torch.rand(2, 3, 8, 8)
    z = F.normalize(net.head(net.trunk((x - 0.5) / 0.25)), dim=1)
    torch.testing.assert_close(net(x), z)


# ---------------------------------------------------------------- torchvision trunks


@pytest.mark.parametrize(
    ("arch", "dim"), [("resnet18", 512), ("resnet50", 2048), ("googlenet", 1024)]
)
def test_torchvision_trunk_features(arch, dim):
    torch.manual_seed(0)
    trunk = TorchvisionTrunk(arch).train()  # googlenet: no aux outputs in training mode either
    f = trunk(torch.rand(2, 3, 64, 64))
    assert isinstance(f, torch.Tensor) and f.shape == (2, dim) == (2, trunk.out_features)


def test_torchvision_pretrained_uses_the_weights_enum_download(monkeypatch):
    import torchvision.models as tvm
    import torchvision.models._api as api

    torch.manual_seed(1)
    reference = tvm.resnet18().state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return reference

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    trunk = TorchvisionTrunk("resnet18", pretrained=True)
    assert urls == [tvm.ResNet18_Weights.DEFAULT.url]
    torch.testing.assert_close(trunk.model.conv1.weight, reference["conv1.weight"])
    trunk = TorchvisionTrunk("resnet18", pretrained="IMAGENET1K_V1")
    assert urls[-1] == tvm.ResNet18_Weights.IMAGENET1K_V1.url


def test_torchvision_download_failure_is_a_data_error(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(DataError, match="pretrained=false"):
        TorchvisionTrunk("resnet18", pretrained=True)


def test_offline_message_names_the_file_the_cache_and_both_ways_out(monkeypatch, tmp_path):
    """No network (or a cache miss offline): one line with the weights file, where the torch hub
    cache looks for it (TORCH_HOME), the backbone.pretrained=<file> key and pretrained=false."""
    import torchvision.models as tvm
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DataError) as e:
        TorchvisionTrunk("resnet50", pretrained=True)
    message = str(e.value)
    url = tvm.ResNet50_Weights.DEFAULT.url
    assert "\n" not in message
    assert url in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message
    assert f"backbone.pretrained=/path/to/{url.rsplit('/', 1)[-1]}" in message
    assert "backbone.pretrained=false" in message


def test_a_local_weights_file_loads_as_the_published_ones(tmp_path):
    """backbone.pretrained=<file.pth>: a torchvision state dict (with or without its
    classifier) is loaded without any download."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    reference = tvm.resnet18(weights=None).state_dict()
    full = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference, full)
    trunk = TorchvisionTrunk("resnet18", pretrained=str(full))
    torch.testing.assert_close(trunk.model.conv1.weight, reference["conv1.weight"])
    assert trunk.weights == str(full)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in reference.items() if not k.startswith("fc.")}, headless)
    trunk = TorchvisionTrunk("resnet18", pretrained=str(headless))
    torch.testing.assert_close(trunk.model.layer4[1].bn2.weight, reference["layer4.1.bn2.weight"])
    with pytest.raises(DataError, match="does not exist"):
        TorchvisionTrunk("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(DataError, match="do not fit"):
        TorchvisionTrunk("resnet50", pretrained=str(full))


def test_torchvision_errors():
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet19'"):
        TorchvisionTrunk("resnet19")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        TorchvisionTrunk("resnet18", pretrained="IMAGENET21K")
    with pytest.raises(ConfigError, match="pretrained"):
        TorchvisionTrunk("resnet18", pretrained=3)


# ---------------------------------------------------------------- timm


def test_timm_missing_is_a_config_error_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'softmine\[timm\]'"):
        TimmTrunk("resnet18")


def test_timm_unknown_name():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="unknown timm model 'resnet18xx'.*resnet18"):
        TimmTrunk("resnet18xx")


def test_timm_trunk_features_and_own_normalisation():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    trunk = TimmTrunk("resnet18").eval()
    x = torch.rand(2, 3, 64, 64)
    assert trunk(x).shape == (2, 512) and trunk.out_features == 512
    mean = torch.tensor(trunk.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(trunk.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(trunk(x), trunk.model((x - mean) / std), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- configs


def compose_backbone(name: str, *overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("train", overrides=[f"backbone={name}", *overrides]).backbone


@pytest.mark.parametrize("name", IMAGE_BACKBONES + VIDEO_BACKBONES)
def test_every_backbone_config_has_the_contract_keys(name):
    cfg = compose_backbone(name)
    assert isinstance(cfg.embedding_dim, int) and cfg.embedding_dim > 0
    assert "pretrained" in cfg and "name" in cfg and "input_norm" in cfg and "frozen_bn" in cfg


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "timm", "bninception"])
def test_backbone_configs_build_and_embed(name):
    if name == "timm":
        pytest.importorskip("timm")
    cfg = compose_backbone(name, "backbone.pretrained=false", "backbone.embedding_dim=128")
    torch.manual_seed(0)
    net = build(cfg, "backbone").eval()
    assert type(net) is EmbeddingNet and net.embedding_dim == 128 and net.pretrained is False
    z = net(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


def test_backbone_name_selects_the_torchvision_model():
    cfg = compose_backbone("resnet18", "backbone.name=resnet34", "backbone.pretrained=false")
    assert cfg.trunk.arch == "resnet34"
    trunk = build(cfg.trunk, "backbone.trunk")
    assert trunk.arch == "resnet34" and len(trunk.model.layer1) == 3  # resnet18 has 2 blocks


def test_backbone_name_selects_the_timm_model():
    pytest.importorskip("timm")
    cfg = compose_backbone(
        "timm", "backbone.name=mobilenetv3_small_050", "backbone.pretrained=false"
    )
    trunk = build(cfg.trunk, "backbone.trunk")
    assert trunk.name == "mobilenetv3_small_050" and trunk(torch.rand(1, 3, 64, 64)).shape == (
        1,
        trunk.out_features,
    )


def test_video_config_builds_a_video_model():
    cfg = compose_backbone("video_resnet50", "backbone.pretrained=false", "backbone.num_classes=3")
    assert cfg.name == "resnet50" and cfg.trunk.arch == "resnet50"
    net = build(cfg, "backbone")
    assert isinstance(net, VideoEmbeddingNet) and net.frame_classifier.out_features == 3


@pytest.mark.parametrize("pooling", ["avg", "max", "avg+max"])
def test_torchvision_trunk_pooling_by_hand(pooling: str) -> None:
    torch.manual_seed(0)
    trunk = TorchvisionTrunk("resnet18", pooling=pooling).eval()
    x = torch.rand(2, 3, 64, 64)
    m = trunk.model
    with torch.no_grad():
        maps = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        want = {
            "avg": maps.mean(dim=(2, 3)),
            "max": maps.amax(dim=(2, 3)),
            "avg+max": maps.mean(dim=(2, 3)) + maps.amax(dim=(2, 3)),
        }[pooling]
        torch.testing.assert_close(trunk(x), want)
    assert trunk.out_features == 512


@pytest.mark.slow
def test_pooling_needs_a_global_average_pool() -> None:
    with pytest.raises(ConfigError, match="avgpool"):
        TorchvisionTrunk("vgg11", pooling="avg+max")
    with pytest.raises(ConfigError, match="pooling"):
        TorchvisionTrunk("resnet18", pooling="mean")
