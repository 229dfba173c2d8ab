"""Tracklet features: batched mean/max pooling against pooling all frame features at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from softmine.engine.embedding import extract_tracklet_features, pool_tracklet_features
from softmine.errors import ConfigError, DataError


class _Recorder(nn.Module):
    """A small frame embedder that records the largest batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Dropout(0.5))
        self.largest = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, x.shape[0])
        return self.net(x)


def _expected(model: _Recorder, frames: torch.Tensor, mode: str) -> np.ndarray:
    with torch.no_grad():
        model.eval()
        f = model.net(frames).double().numpy()
    return f.mean(0) if mode == "mean" else f.max(0)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_920_frame_tracklet_in_batches(mode: str) -> None:
    frames = torch.randn(920, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = _Recorder().train()
    got = pool_tracklet_features(model, frames, batch_size=64, mode=mode)
    assert model.largest == 64 and model.training  # batched, and train mode restored
    np.testing.assert_allclose(got.numpy(), _expected(model, frames, mode), atol=1e-6)
    # The same from an iterable of batches the caller loads lazily.
    lazy = (frames[i : i + 100] for i in range(0, 920, 100))
    again = pool_tracklet_features(model, lazy, mode=mode)
    np.testing.assert_allclose(again.numpy(), got.numpy(), atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_extract_many_tracklets_with_batches_across_tracklets(mode: str) -> None:
    lengths = [1, 920, 5, 37]
    bank = torch.randn(sum(lengths), 3, 4, 4, generator=torch.Generator().manual_seed(2))
    tracklets, start = [], 0
    for t, n in enumerate(lengths):
        tracklets.append((tuple(str(start + i) for i in range(n)), 10 + t, t % 2))
        start += n
    model = _Recorder()
    feats, pids, camids = extract_tracklet_features(
        model, tracklets, lambda path: bank[int(path)], batch_size=50, mode=mode
    )
    assert model.largest == 50
    assert feats.shape == (4, 6) and feats.dtype == np.float32
    np.testing.assert_array_equal(pids, [10, 11, 12, 13])
    np.testing.assert_array_equal(camids, [0, 1, 0, 1])
    for t, (paths, _, _) in enumerate(tracklets):
        idx = torch.tensor([int(p) for p in paths])
        np.testing.assert_allclose(feats[t], _expected(model, bank[idx], mode), atol=1e-6)


def test_bad_inputs_are_clear() -> None:
    model = _Recorder()
    with pytest.raises(ConfigError, match="pooling"):
        pool_tracklet_features(model, torch.randn(3, 3, 4, 4), mode="median")
    with pytest.raises(DataError, match="no frames"):
        pool_tracklet_features(model, torch.randn(0, 3, 4, 4))
    with pytest.raises(DataError, match="index 1"):
        extract_tracklet_features(
            model, [(("a",), 1, 0), ((), 2, 0)], lambda p: torch.zeros(3, 4, 4)
        )
