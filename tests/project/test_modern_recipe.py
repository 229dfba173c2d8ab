"""experiment=modern_cub / modern_cars: Proxy-Anchor's ResNet-50 recipe, validation on a class fold.

Expected values are read off Proxy-Anchor's code (github.com/tjddus9597/Proxy-Anchor-CVPR2020:
the README's ResNet-50 commands, commands/train.py defaults, net/resnet.py), named beside each check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from softmine.testing.fakes import make_cub
from tests.conftest import compose, run_cli

LOSSES = {
    "osm_caa": "softmine.losses.OSMCAALoss",
    "proxy_anchor": "softmine.losses.ProxyAnchorLoss",
    "multi_similarity": "softmine.losses.MultiSimilarityLoss",
    "contrastive": "softmine.losses.OSMCAALoss",
}


@pytest.mark.parametrize(
    ("experiment", "dataset", "epoch_iters", "decay_epochs"),
    [("modern_cub", "cub", 40, 5), ("modern_cars", "cars196", 54, 10)],
)
@pytest.mark.slow
def test_modern_recipe_holds_the_published_settings(
    experiment: str, dataset: str, epoch_iters: int, decay_epochs: int
) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert cfg.dataset.name == dataset
    b = cfg.backbone
    assert b.trunk._target_ == "softmine.models.TorchvisionTrunk" and b.name == "resnet50"
    assert b.pretrained is True and b.embedding_dim == 512  # --embedding-size 512
    assert b.frozen_bn is True  # --bn-freeze 1
    assert b.trunk.pooling == "avg+max"  # net/resnet.py: max_x + avg_x
    assert cfg.sampler.classes_per_batch * cfg.sampler.samples_per_class == 120  # --batch-size 120
    o = cfg.optimizer
    assert o._target_ == "torch.optim.AdamW" and o.lr == 1e-4  # --optimizer adamw, --lr 1e-4
    assert o.weight_decay == 1e-4  # --weight-decay default
    rules = OmegaConf.to_container(o.param_groups)
    assert {"pattern": "model.trunk.*", "frozen_iters": 5 * epoch_iters} in rules  # --warm 5
    assert {"pattern": "loss.*", "lr_mult": 100.0, "optional": True} in rules  # proxies lr x 100
    s = cfg.scheduler
    assert s.gamma == 0.5  # --lr-decay-gamma 0.5
    steps = [int(m) for m in s.milestones]
    assert steps == list(
        range(decay_epochs * epoch_iters, 60 * epoch_iters, decay_epochs * epoch_iters)
    )
    assert cfg.trainer.max_iters == 60 * epoch_iters  # --epochs 60
    assert (cfg.dataset.folds, cfg.dataset.fold) == (4, 0)  # Musgrave et al.: 4 folds
    assert cfg.trainer.monitor == "val/map@r" and cfg.trainer.save_best is True
    for loss, target in LOSSES.items():  # the loss is a choice
        assert compose([f"experiment={experiment}", f"loss={loss}"]).loss._target_ == target


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["proxy_anchor", "multi_similarity"])
def test_modern_cub_runs_on_a_fake_cub(tmp_path: Path, loss: str) -> None:
    root = make_cub(tmp_path / "data", num_classes=16, images_per_class=4)
    run = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "experiment=modern_cub",
            f"loss={loss}",
            f"dataset.root={root}",
            "backbone.pretrained=false",  # no download in tests
            "dataset.transform.resize=40",
            "dataset.transform.crop_size=32",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=2",
            "trainer.max_iters=4",
            "trainer.eval_every_iters=2",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            "trainer.tensorboard=false",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("recall@1", "val/map@r", "selected_iteration", "selected/recall@1"):
        assert key in metrics
    assert (run / "checkpoints" / "best.pt").exists() and (run / "test_embeddings.npz").exists()
