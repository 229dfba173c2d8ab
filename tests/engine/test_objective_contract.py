"""The model-objective contract: what a model declares it offers (FeatureInfo) against what a loss
declares it needs (MetricLoss), checked once when the run is built, with a one-line error naming
both sides; and every loss config passes it with the backbone it is trained with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from softmine.config import build
from softmine.engine.components import run_time_sizes
from softmine.engine.objective import Objective, build_loss, check_contract
from softmine.engine.trainer import Trainer
from softmine.errors import ConfigError
from softmine.losses import (
    LossNeeds,
    MetricLoss,
    OSMCAAAuthorsLoss,
    OSMCAAAuthorsVideoLoss,
    OSMCAALoss,
    TripletBatchHardLoss,
    needs_of,
)
from softmine.models import EmbeddingNet, FeatureInfo, TinyCNN, VideoEmbeddingNet
from tests.conftest import FAST_DIGITS, REPO, compose

VIDEO_FIX = "use a video backbone (backbone=video_bninception or backbone=video_resnet50)"


def _image_net() -> EmbeddingNet:
    """TinyCNN(width 4): global pooling of 2 x 4 channels -> an 8-wide trunk; a 6-d embedding."""
    return EmbeddingNet(TinyCNN(1, 4), embedding_dim=6, name="tiny")


class NeedsPool5(MetricLoss):
    """A loss of one's own that reads the model's ``pool5`` feature."""

    requires = ("pool5",)

    def forward(self, embeddings: Tensor, labels: Tensor, *, features: dict) -> Tensor:
        return features["pool5"].sum() * 0 + embeddings.sum() * 0


class PlainLoss(nn.Module):
    """A loss that declares nothing: (embeddings, labels) -> loss."""

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return embeddings.square().mean()


def test_models_declare_their_features_with_widths() -> None:
    assert _image_net().feature_info == FeatureInfo(
        name="tiny", features={"trunk": 8, "embedding": 6}, per_frame=False, frame_loss=False
    )
    video = VideoEmbeddingNet(TinyCNN(1, 4), embedding_dim=6, name="clips")
    assert video.feature_info == FeatureInfo(
        name="clips",
        features={"trunk": 8, "embedding": 6, "tracklet": 6},
        per_frame=True,
        frame_loss=True,
    )
    assert _image_net().feature_info.describe() == "embedding (6), trunk (8)"


def test_losses_declare_what_they_need() -> None:
    assert needs_of(TripletBatchHardLoss()).requires == ()
    assert needs_of(OSMCAALoss(4, 6)).returns_details
    assert not needs_of(TripletBatchHardLoss()).returns_details
    assert needs_of(OSMCAAAuthorsLoss(4, 6)).requires == ("embedding",)
    heads = {"a": {"feature": "trunk"}, "b": {"feature": "pool5"}}
    loss = OSMCAAAuthorsLoss(
        4, 6, heads=heads, attention_head="a", feature_dims={"pool5": 3, "trunk": 2}
    )
    assert needs_of(loss).requires == ("pool5", "trunk")
    video = needs_of(
        OSMCAAAuthorsVideoLoss(
            4, 6, heads=heads, attention_head="a", feature_dims={"pool5": 3, "trunk": 2}
        )
    )
    assert video.per_frame and video.requires == ("embedding", "pool5", "trunk")
    assert needs_of(PlainLoss()) == LossNeeds()  # declares nothing
    assert needs_of(TripletBatchHardLoss()) == LossNeeds(takes_memory=True)  # a pair loss
    assert needs_of(OSMCAALoss(4, 6)).memory_fields == ("attention",)
    assert needs_of(OSMCAALoss(4, 6, caa=False, ce_weight=0)).memory_fields == ()


def test_a_per_frame_loss_on_an_image_model_is_one_line_naming_both_sides() -> None:
    with pytest.raises(ConfigError) as err:
        check_contract(_image_net(), OSMCAAAuthorsVideoLoss(4, 6))
    assert str(err.value) == (
        "loss OSMCAAAuthorsVideoLoss needs features per frame (B, T, dim) but backbone tiny "
        f"is an image model, offering: embedding (6), trunk (8); {VIDEO_FIX}"
    )


def test_a_missing_feature_is_one_line_naming_both_sides() -> None:
    with pytest.raises(ConfigError) as err:
        check_contract(_image_net(), NeedsPool5())
    assert str(err.value) == (
        "loss NeedsPool5 needs feature 'pool5' but backbone tiny offers: embedding (6), "
        "trunk (8); use a backbone that has it"
    )
    with pytest.raises(ConfigError) as err:  # a model of one's own declares only its output
        check_contract(nn.Linear(3, 6), NeedsPool5())
    assert str(err.value) == (
        "loss NeedsPool5 needs feature 'pool5' but backbone Linear offers: no named features "
        "(only its output); use a backbone that has it"
    )


def test_matching_pairs_pass_and_the_objective_routes_by_the_declarations() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    for model, loss in [
        (_image_net(), OSMCAAAuthorsLoss(2, 6)),
        (_image_net(), PlainLoss()),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 6)), PlainLoss()),
        (VideoEmbeddingNet(TinyCNN(1, 4), embedding_dim=6), OSMCAAAuthorsVideoLoss(2, 6)),
        (VideoEmbeddingNet(TinyCNN(1, 4), embedding_dim=6), OSMCAAAuthorsLoss(2, 6)),
    ]:
        check_contract(model, loss)
        batch = x[:, None].expand(4, 3, 1, 8, 8) if isinstance(model, VideoEmbeddingNet) else x
        value, details = Objective(model, loss)(batch, y)
        assert value.ndim == 0 and torch.isfinite(value)
        assert ("pair" in details) == isinstance(loss, OSMCAAAuthorsLoss | OSMCAAAuthorsVideoLoss)
        assert ("frame_ce" in details) == isinstance(model, VideoEmbeddingNet)


def _expected_tiny_offer(cfg) -> str:  # noqa: ANN001
    """The default digits backbone as the config sizes it: TinyCNN's 2 x width global pool."""
    trunk = 2 * int(cfg.backbone.trunk.width)
    return f"embedding ({int(cfg.backbone.embedding_dim)}), trunk ({trunk})"


def test_building_the_run_checks_the_contract(tmp_path: Path) -> None:
    cfg = compose(["loss=osm_caa_official_video", "trainer.device=cpu", *FAST_DIGITS])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, tmp_path / "video")
    assert str(err.value) == (
        "loss OSMCAAAuthorsVideoLoss needs features per frame (B, T, dim) but backbone tiny "
        f"is an image model, offering: {_expected_tiny_offer(cfg)}; {VIDEO_FIX}"
    )


def test_a_head_on_a_feature_the_backbone_lacks_is_the_same_contract_error(
    tmp_path: Path,
) -> None:
    heads = ["loss=osm_caa_official", "loss.heads={h: {feature: pool5}}", "loss.attention_head=h"]
    cfg = compose([*heads, "trainer.device=cpu", *FAST_DIGITS])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, tmp_path / "heads")
    assert str(err.value) == (
        "loss OSMCAAAuthorsLoss needs feature 'pool5' (loss.heads.h) but backbone tiny offers: "
        f"{_expected_tiny_offer(cfg)}; point loss.heads.h.feature at one of those, or use a "
        "backbone that has it"
    )


def test_softmine_train_names_the_config_options_in_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from softmine.commands.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SOFTMINE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(
        sys,
        "argv",
        ["softmine-train", "loss=osm_caa_official_video", "trainer.device=cpu", *FAST_DIGITS],
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "error: loss=osm_caa_official_video needs features per frame (B, T, dim) but "
        "backbone=tiny is an image model"
    )


# Each loss config with the backbone it is trained with: the authors' objectives with their
# experiments' networks (weights not loaded), every other loss with the digits network that
# `make demo` and the fair benchmark's digits runs use.
EXPERIMENT_OF = {
    "osm_caa_authors": ["experiment=authors_cub"],
    "osm_caa_authors_video": ["experiment=authors_mars"],
    "osm_caa_official": ["experiment=reproduce_cub"],  # the old names of the two above
    "osm_caa_official_video": ["experiment=reproduce_mars"],
}
LOSS_CONFIGS = sorted(p.stem for p in (REPO / "configs" / "loss").glob("*.yaml"))


@pytest.mark.parametrize("loss", LOSS_CONFIGS)
def test_every_loss_config_meets_its_backbone(loss: str) -> None:
    overrides = EXPERIMENT_OF.get(loss, [f"loss={loss}"])
    cfg = compose([*overrides, "backbone.pretrained=false"])
    classes, dim = 5, int(cfg.backbone.embedding_dim)
    model = build(cfg.backbone, "backbone", **run_time_sizes(cfg.backbone, classes, dim))
    sizes = run_time_sizes(cfg.loss, classes, dim, model.feature_dims)
    loss_fn = build_loss(cfg.loss, model, **sizes)  # checks the contract
    check_contract(model, loss_fn)
    needs, offers = needs_of(loss_fn), model.feature_info
    assert set(needs.requires) <= set(offers.features)
    assert offers.per_frame or not needs.per_frame


def test_the_authors_experiments_read_their_three_features() -> None:
    """authors_cub / authors_mars: heads on inception_3c, embedding and pool5 (their prototxts)."""
    for experiment, video in (("authors_cub", False), ("authors_mars", True)):
        cfg = compose([f"experiment={experiment}", "backbone.pretrained=false"])
        dim = int(cfg.backbone.embedding_dim)
        model = build(cfg.backbone, "backbone", **run_time_sizes(cfg.backbone, 5, dim))
        sizes = run_time_sizes(cfg.loss, 5, dim, model.feature_dims)
        loss_fn = build_loss(cfg.loss, model, **sizes)
        assert needs_of(loss_fn).requires == ("embedding", "inception_3c", "pool5")
        assert needs_of(loss_fn).per_frame == video == model.feature_info.per_frame
