"""The digits_pairs trunk keeps the left/right layout that global pooling throws away (issue 23)."""

from __future__ import annotations

import pytest
import torch

from softmine.config import build
from softmine.errors import ConfigError
from softmine.models import EmbeddingNet, TinyCNN
from tests.conftest import compose


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """The image with its left and right halves exchanged: the mirrored class (b, a) of (a, b)."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


def test_output_sizes() -> None:
    x = torch.rand(3, 1, 8, 16)
    assert TinyCNN(width=4).out_features == 8
    assert TinyCNN(width=4)(x).shape == (3, 8)
    grid = TinyCNN(width=4, pool="grid", grid=(2, 4))
    assert grid.out_features == 8 * 2 * 4
    assert grid(x).shape == (3, 64)
    net = EmbeddingNet(TinyCNN(width=4, pool="grid"), embedding_dim=16)
    assert net(x).shape == (3, 16)


def test_global_pooling_cannot_tell_which_half_is_which() -> None:
    # Any feature map and the same map with its halves exchanged have the same mean:
    # whatever the convolutions compute, global pooling gives both one vector.
    feats = torch.randn(2, 8, 4, 8)
    pool = TinyCNN(width=4).pool
    torch.testing.assert_close(pool(feats), pool(_swap_halves(feats)), rtol=0, atol=1e-6)
    grid = TinyCNN(width=4, pool="grid").pool
    assert not torch.allclose(grid(feats), grid(_swap_halves(feats)), atol=1e-3)
    # the grid keeps every cell: the swap moves the left cells' values to the right
    cells = grid(feats).view(2, 8, 2, 4)
    swapped = grid(_swap_halves(feats)).view(2, 8, 2, 4)
    torch.testing.assert_close(swapped, torch.cat([cells[..., 2:], cells[..., :2]], dim=-1))


def test_the_grid_network_embeds_a_pair_and_its_mirror_apart_at_init() -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(TinyCNN(pool="grid"), embedding_dim=64).eval()
    x = torch.rand(8, 1, 8, 16)
    with torch.no_grad():
        a, b = net(x), net(_swap_halves(x))
    cosine = (a * b).sum(1)  # unit vectors
    assert (cosine < 0.999).all(), cosine


def test_pool_is_checked() -> None:
    with pytest.raises(ConfigError, match="backbone.trunk.pool"):
        TinyCNN(pool="max")
    with pytest.raises(ConfigError, match="backbone.trunk.grid"):
        TinyCNN(pool="grid", grid=(0, 4))


@pytest.mark.slow
def test_digits_pairs_defaults_to_the_grid_trunk_and_digits_keeps_its_own() -> None:
    pairs = compose(["dataset=digits_pairs"])
    assert pairs.backbone.name == "tiny_grid"
    assert build(pairs.backbone, "backbone").trunk.out_features == 64 * 2 * 4
    for overrides in ([], ["experiment=demo"], ["experiment=ablation"], ["experiment=noise"]):
        assert compose(overrides).backbone.name == "tiny", overrides  # plain digits: as before
    assert compose(["dataset=digits_pairs", "backbone=tiny"]).backbone.name == "tiny"
    assert compose(["experiment=ablation", "dataset=digits_pairs"]).backbone.name == "tiny_grid"


def test_tiny_keeps_its_modules_so_old_checkpoints_load() -> None:
    # the plain trunk's parameters and buffers are the ones it always had (make demo unchanged)
    keys = list(TinyCNN(width=4).state_dict())
    assert keys[0] == "features.0.0.weight" and keys[-1] == "features.3.1.num_batches_tracked"
    assert not [k for k in keys if k.startswith("pool")]
