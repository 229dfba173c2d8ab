"""The one embedding path (``softmine.engine.embedding.embed_batches``) against hand computations.

Every expectation is worked out in float64 numpy from the model's weights: a linear map of
the flattened input, so a forward pass is ``x @ W.T + b`` by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from softmine.engine.embedding import embed_batches, extract_reid_embeddings

SHAPE = (3, 2, 5)  # (C, H, W): W odd and > 1, so a mirror image differs from the image


class _Linear(nn.Module):
    """Flatten, a linear map and dropout (a different output in train mode); records its calls."""

    def __init__(self, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(int(np.prod(SHAPE)), dim)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple[bool, bool, int]] = []  # (training, grad enabled, batch size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        return self.drop(self.fc(x.flatten(1)))

    def by_hand(self, x: np.ndarray) -> np.ndarray:
        """The eval-mode forward in float64 numpy."""
        w = self.fc.weight.detach().double().numpy()
        b = self.fc.bias.detach().double().numpy()
        return x.reshape(len(x), -1).astype(np.float64) @ w.T + b


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_eval_mode_no_grad_and_the_previous_mode_restored() -> None:
    model = _Linear().train()
    x = _images(10)
    labels = torch.arange(10) % 3
    got, (y,) = embed_batches(model, [(x[:6], labels[:6]), (x[6:], labels[6:])])
    assert model.training  # restored
    assert model.calls == [(False, False, 6), (False, False, 4)]  # eval mode, no gradients
    np.testing.assert_allclose(got, model.by_hand(x.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, labels.numpy())
    assert got.dtype == np.float32

    model.eval()  # a model in eval mode stays there
    embed_batches(model, [x])
    assert not model.training

    def failing():  # noqa: ANN202
        yield x
        raise RuntimeError("a loader that fails half way")

    model.train()
    with pytest.raises(RuntimeError, match="half way"):
        embed_batches(model, failing())
    assert model.training  # restored after an error too


def test_flip_is_the_mean_of_the_two_passes_by_hand() -> None:
    model = _Linear()
    x = _images(5)
    got, _ = embed_batches(model, [x], flip=True)
    plain = model.by_hand(x.numpy())
    mirrored = model.by_hand(x.numpy()[..., ::-1])
    assert not np.allclose(plain, mirrored)  # the mirror image really differs
    want = (plain + mirrored) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # normalize: the mean re-normalised to unit length
    unit, _ = embed_batches(model, [x], flip=True, normalize=True)
    np.testing.assert_allclose(
        unit, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5, atol=1e-6
    )


def test_uint8_images_are_scaled_to_unit_range_and_device_transform_applies() -> None:
    model = _Linear()
    raw = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8, generator=torch.Generator())
    got, _ = embed_batches(model, [raw])
    np.testing.assert_allclose(got, model.by_hand(raw.numpy() / 255.0), rtol=1e-5, atol=1e-6)
    doubled, _ = embed_batches(model, [raw], device_transform=lambda t: t.float() / 255.0 * 2)
    np.testing.assert_allclose(
        doubled, model.by_hand(raw.numpy() / 255.0 * 2), rtol=1e-5, atol=1e-6
    )


def test_bf16_precision_returns_float32_close_to_float32() -> None:
    model = _Linear()
    x = _images(8)
    got, _ = embed_batches(model, [x], precision=torch.bfloat16)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, model.by_hand(x.numpy()), atol=0.1)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_frame_pooling_is_the_float64_mean_or_max_over_frames(mode: str) -> None:
    lengths = [3, 1, 130, 7]
    frames = _images(sum(lengths), seed=2)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pid = 10 + owner
    model = _Linear()
    # batches of 50 frames that cut across tracklets
    batches = [(frames[i : i + 50], owner[i : i + 50], pid[i : i + 50]) for i in range(0, 141, 50)]
    got, (pids,) = embed_batches(model, batches, pool=mode)
    assert max(n for _, _, n in model.calls) == 50  # never more than one batch at once
    per_frame = model.by_hand(frames.numpy())
    bounds = np.cumsum([0, *lengths])
    for t in range(len(lengths)):
        f = per_frame[bounds[t] : bounds[t + 1]]
        want = f.mean(0) if mode == "mean" else f.max(0)
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pids, [10, 11, 12, 13])  # each tracklet's first frame's field
    unit, _ = embed_batches(model, batches, pool=mode, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, got / np.linalg.norm(got, axis=1, keepdims=True), rtol=1e-5)


def test_frames_out_of_tracklet_order_are_refused() -> None:
    x = _images(4)
    with pytest.raises(ValueError, match="tracklets in order"):
        embed_batches(
            _Linear(), [(x[:2], torch.tensor([1, 1])), (x[2:], torch.tensor([0, 0]))], pool="mean"
        )


class _Video(nn.Module):
    """A video model: frame embeddings by a linear map, pooled at test time by ``eval_pooling``."""

    def __init__(self, eval_pooling: str) -> None:
        super().__init__()
        self.frames = _Linear(dim=5, seed=3)
        self.eval_pooling = eval_pooling

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        raise AssertionError("test-time tracklets are embedded frame by frame")

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        return self.frames(frames)


class _ChunkedTracklets(Dataset):
    """Whole tracklets cut into chunks of 4 frames, the last padded with its last frame."""

    def __init__(self, lengths: list[int]) -> None:
        self.clips = [_images(n, seed=10 + i) for i, n in enumerate(lengths)]
        self.tracklets = [
            ([f"{i}/{k}" for k in range(n)], 20 + i, i % 2) for i, n in enumerate(lengths)
        ]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        clip = self.clips[i]
        pad = -len(clip) % 4
        clip = torch.cat([clip, clip[-1:].expand(pad, *SHAPE)])
        _, pid, camid = self.tracklets[i]
        return clip.reshape(-1, 4, *SHAPE), pid, camid


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_reid_tracklets_pool_their_real_frames_then_normalise(mode: str) -> None:
    data = _ChunkedTracklets([5, 1, 9])  # 3, 3 and 3 padding frames
    model = _Video(mode).train()
    got, pids, camids = extract_reid_embeddings(
        model, data, device=torch.device("cpu"), frame_batch_size=3
    )
    assert model.training and model.frames.training
    assert max(n for _, _, n in model.frames.calls) == 3
    for t, clip in enumerate(data.clips):  # padding dropped: only the tracklet's own frames
        f = model.frames.by_hand(clip.numpy())
        want = f.mean(0) if mode == "mean" else f.max(0)
        np.testing.assert_allclose(got[t], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pids, [20, 21, 22])
    np.testing.assert_array_equal(camids, [0, 1, 0])


@pytest.mark.slow
def test_evaluation_is_numpy_and_faiss_only_and_the_old_path_imports() -> None:
    """``softmine.evaluation`` imports without torch; ``softmine.evaluation.video`` still imports."""
    import subprocess
    import sys

    code = (
        "import sys, softmine.evaluation; "
        "assert 'torch' not in sys.modules, 'softmine.evaluation imported torch'; "
        "from softmine.evaluation.video import pool_tracklet_features; "
        "from softmine.engine import embedding; "
        "assert pool_tracklet_features is embedding.pool_tracklet_features"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
