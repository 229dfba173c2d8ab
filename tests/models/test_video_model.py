"""Video model: temporal pooling modes and class-aware frame attention against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from softmine.config import build
from softmine.errors import ConfigError
from softmine.models import EmbeddingNet, TinyCNN, VideoEmbeddingNet, frame_attention, temporal_pool

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def loop_pool(frames: torch.Tensor, mode: str, attention=None, mask=None) -> torch.Tensor:
    """float64 reference: one clip and one dimension at a time."""
    b, t, d = frames.shape
    out = torch.zeros(b, d, dtype=torch.float64)
    for i in range(b):
        keep = [s for s in range(t) if mask is None or bool(mask[i, s])]
        for k in range(d):
            vals = [float(frames[i, s, k]) for s in keep]
            if mode == "mean":
                out[i, k] = sum(vals) / len(vals)
            elif mode == "max":
                out[i, k] = max(vals)
            else:
                a = [float(attention[i, s]) for s in keep]
                out[i, k] = sum(ai * v for ai, v in zip(a, vals, strict=True)) / sum(a)
    return out


@pytest.mark.parametrize("mode", ["mean", "max", "attention"])
@pytest.mark.parametrize("masked", [False, True])
def test_temporal_pool_matches_a_loop(mode, masked):
    torch.manual_seed(0)
    frames = torch.randn(3, 5, 4)
    attention = torch.rand(3, 5) + 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    mask = mask if masked else None
    got = temporal_pool(frames, mode, attention if mode == "attention" else None, mask)
    torch.testing.assert_close(
        got.double(), loop_pool(frames, mode, attention, mask), rtol=1e-6, atol=1e-6
    )


def test_frame_attention_by_hand():
    # frame 0 scores (1, 2, 1) -> softmax (1/4, 1/2, 1/4); frame 1 scores (1, 1, 2) -> (1/4, 1/4, 1/2)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]]))
    labels = torch.tensor([1])
    p_true = [0.5, 0.25]
    gauss = [math.exp(-((p - 1.0) ** 2) / (2 * 0.68**2)) for p in p_true]
    torch.testing.assert_close(frame_attention(logits, labels).squeeze(0), torch.tensor(gauss))
    torch.testing.assert_close(
        frame_attention(logits, labels, form="prob").squeeze(0), torch.tensor(p_true)
    )
    # without labels (test time): the largest class probability, 1/2 for both frames
    torch.testing.assert_close(
        frame_attention(logits, None, form="prob").squeeze(0), torch.tensor([0.5, 0.5])
    )


def test_pooling_errors():
    with pytest.raises(ConfigError, match="temporal pooling"):
        temporal_pool(torch.zeros(1, 2, 3), "median")
    with pytest.raises(ValueError, match="attention"):
        temporal_pool(torch.zeros(1, 2, 3), "attention")
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        temporal_pool(torch.zeros(2, 3), "mean")
    with pytest.raises(ValueError, match="labels"):
        frame_attention(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long))


def video_net(**kw) -> VideoEmbeddingNet:
    torch.manual_seed(0)
    kw.setdefault("frozen_bn", True)  # batch-independent frame features, so a loop can check them
    return VideoEmbeddingNet(TinyCNN(in_channels=3, width=4), embedding_dim=6, **kw)


def frame_by_frame(net: VideoEmbeddingNet, clips: torch.Tensor) -> torch.Tensor:
    """Frame embeddings (before L2 norm) from the image network, one frame at a time."""
    image_net = EmbeddingNet(net.trunk, embedding_dim=6, normalize=False, frozen_bn=net.frozen_bn)
    image_net.head = net.head
    image_net.train(net.training)
    b, t = clips.shape[:2]
    rows = [[image_net(clips[i, s][None])[0] for s in range(t)] for i in range(b)]
    return torch.stack([torch.stack(r) for r in rows])


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_video_embedding_pools_the_image_embeddings(mode):
    net = video_net(pooling=mode, eval_pooling=mode)
    clips = torch.rand(2, 3, 3, 8, 8)
    for training in (True, False):
        net.train(training)
        with torch.no_grad():
            f = frame_by_frame(net, clips)
            expected = F.normalize(loop_pool(f, mode), dim=1)
            torch.testing.assert_close(net(clips).double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_pooling_in_training_uses_the_true_class_probability():
    net = video_net(pooling="attention", num_classes=4).train()
    clips, labels = torch.rand(2, 3, 3, 8, 8), torch.tensor([2, 0])
    out, details = net(clips, labels, return_details=True)
    with torch.no_grad():
        f = frame_by_frame(net, clips)
        w_clf, b_clf = net.frame_classifier.weight, net.frame_classifier.bias
        a = torch.zeros(2, 3)
        for i in range(2):
            for s in range(3):
                p = (f[i, s] @ w_clf.T + b_clf).double().softmax(0)[labels[i]]
                a[i, s] = math.exp(-((float(p) - 1) ** 2) / (2 * 0.68**2))
        expected = F.normalize(loop_pool(f, "attention", a), dim=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(details["frame_weights"], a / a.sum(1, keepdim=True))
    assert details["frame_logits"].shape == (2, 3, 4)
    torch.testing.assert_close(details["frame_embeddings"].norm(dim=2), torch.ones(2, 3))


def test_eval_pooling_is_mean_by_default_and_attention_uses_the_max_probability():
    net = video_net(pooling="attention", num_classes=4).eval()
    clips = torch.rand(2, 3, 3, 8, 8)
    with torch.no_grad():
        f = frame_by_frame(net, clips)
        expected = F.normalize(loop_pool(f, "mean"), dim=1)
        torch.testing.assert_close(net(clips).double(), expected, rtol=1e-5, atol=1e-5)
        net.eval_pooling = "attention"
        p = net.frame_classifier(f).double().softmax(-1).amax(-1)
        a = torch.exp(-((p - 1) ** 2) / (2 * 0.68**2))
        expected = F.normalize(loop_pool(f, "attention", a), dim=1)
        torch.testing.assert_close(net(clips).double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_is_detached_and_the_frame_loss_trains_the_classifier():
    net = video_net(pooling="attention", num_classes=4).train()
    clips, labels = torch.rand(2, 3, 3, 8, 8), torch.tensor([1, 3])
    out, details = net(clips, labels, return_details=True)
    out.sum().backward(retain_graph=True)
    assert net.frame_classifier.weight.grad is None
    assert net.head.weight.grad is not None
    loss = net.frame_loss(details, labels)
    logits = details["frame_logits"].detach().double()
    by_hand = -sum(logits[i, s].log_softmax(0)[labels[i]] for i in range(2) for s in range(3)) / 6
    torch.testing.assert_close(loss.double(), by_hand, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert net.frame_classifier.weight.grad is not None


def test_external_class_vectors_drive_the_attention():
    net = video_net(pooling="attention").train()  # no own classifier
    vectors = torch.randn(5, 6)
    clips, labels = torch.rand(2, 4, 3, 8, 8), torch.tensor([4, 1])
    out, details = net(clips, labels, classifier=lambda f: f @ vectors.T, return_details=True)
    with torch.no_grad():
        f = frame_by_frame(net, clips)
        p = (f @ vectors.T).double().softmax(-1).gather(-1, labels.view(2, 1, 1).expand(2, 4, 1))
        a = torch.exp(-((p.squeeze(-1) - 1) ** 2) / (2 * 0.68**2))
    expected = F.normalize(loop_pool(f, "attention", a), dim=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_padded_clip_equals_the_short_clip():
    net = video_net(pooling="mean").eval()
    clip = torch.rand(1, 2, 3, 8, 8)
    padded = torch.cat([clip, torch.zeros(1, 3, 3, 8, 8)], dim=1)
    mask = torch.tensor([[True, True, False, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(net(padded, mask=mask), net(clip))


def test_video_model_errors():
    net = video_net(pooling="attention").train()
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="num_classes"):
        net(torch.rand(1, 2, 3, 8, 8), torch.tensor([0]))
    with_clf = video_net(pooling="attention", num_classes=3).train()
    with pytest.raises(ValueError, match="labels"):
        with_clf(torch.rand(1, 2, 3, 8, 8))
    with pytest.raises(ConfigError, match="pooling"):
        video_net(pooling="median")
    with pytest.raises(ConfigError, match="attention_form"):
        video_net(attention_form="softmax")
    with pytest.raises(ConfigError, match="num_classes"):
        video_net(pooling="attention", num_classes=0)


def test_video_bninception_config_runs_the_authors_model():
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "backbone=video_bninception",
                "backbone.pretrained=false",
                "backbone.num_classes=3",
            ],
        ).backbone
    assert cfg.embedding_dim == 1024 and cfg.trunk.embedding_from == "inception_4e"
    torch.manual_seed(0)
    net = build(cfg, "backbone").train()
    clips, labels = torch.rand(2, 2, 3, 96, 96), torch.tensor([0, 2])
    out, details = net(clips, labels, return_details=True)
    assert out.shape == (2, 1024) and details["frame_logits"].shape == (2, 2, 3)
    assert (details["frame_embeddings"] >= 0).all()  # the authors' rectified embedding
