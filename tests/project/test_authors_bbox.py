"""The authors' bounding-box runs: authors_cub_bbox and authors_cars_bbox.

Expected values are read off the authors' repository (XinshaoAmosWang/OSM_CAA_WeightedContrastiveLoss
at a8911b9): ``CUB_V01/train_M_WIDE_ASiamese_V42_e1_bbox/`` and
``CARS196_V01/train_M_WIDE_ASiamese_V62_e1_bbox/`` (``train.m``, ``test_model.m``), whose
``modelDir`` is the full-image run's, so the solver is the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from softmine.data.build import build_split
from softmine.testing.fakes import make_cars, make_cub
from tests.conftest import compose, run_cli


def _flat(cfg) -> dict[str, object]:
    """Every leaf of the config (unresolved) by its dotted key."""

    def walk(node: object, prefix: str) -> dict[str, object]:
        if isinstance(node, dict):
            out: dict[str, object] = {}
            for k, v in node.items():
                out.update(walk(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def _differences(a, b) -> dict[str, tuple[object, object]]:
    fa, fb = _flat(a), _flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def _evaluated(cfg) -> list[int]:
    """The iterations the trainer evaluates: every eval_every_iters from eval_start_iter."""
    t = cfg.trainer
    return [
        i
        for i in range(1, t.max_iters + 1)
        if i >= t.eval_start_iter and i % t.eval_every_iters == 0
    ]


def test_authors_cub_bbox_is_authors_cub_on_box_crops() -> None:
    """train.m of the bbox run differs from the full-image one only in its data file (line 9)."""
    full, bbox = compose(["experiment=authors_cub"]), compose(["experiment=authors_cub_bbox"])
    assert _differences(full, bbox) == {"dataset.crop": (False, True)}
    # CUB_V01/M_WIDE_ASiamese_V42_e1/solver.prototxt (train.m:15 modelDir)
    assert bbox.optimizer.lr == 0.0005 and bbox.optimizer.weight_decay == 0.0003
    assert list(bbox.scheduler.milestones) == [500, 1000, 1500, 1501, 2000, 2001]
    assert bbox.seed == 123 and (
        bbox.sampler.classes_per_batch,
        bbox.sampler.samples_per_class,
    ) == (8, 7)
    # train.m:25-27, test_model.m:23 `for iter = 1000 : 250 : 3000`
    assert bbox.trainer.max_iters == 3000
    assert _evaluated(bbox) == list(range(1000, 3001, 250))


def test_authors_cars_bbox_has_the_shorter_schedule() -> None:
    """train.m:25-27 of the bbox run: 8,000 iterations, snapshots every 500 from 2,000."""
    full, bbox = compose(["experiment=authors_cars"]), compose(["experiment=authors_cars_bbox"])
    assert _differences(full, bbox) == {
        "dataset.crop": (False, True),
        "trainer.max_iters": (10000, 8000),
        "trainer.eval_every_iters": (250, 500),
        "trainer.eval_start_iter": (1000, 2000),
        "trainer.checkpoint_every": (250, 500),
    }
    # CARS196_V01/M_WIDE_ASiamese_V62_e1/solver.prototxt (train.m:15 modelDir)
    assert bbox.optimizer.lr == 0.001 and bbox.optimizer.weight_decay == 0.00005
    assert list(bbox.scheduler.milestones) == [1500, 3000, 4500, 6000]
    assert bbox.scheduler.gamma == 0.5 and bbox.optimizer.momentum == 0.9
    assert bbox.seed == 123 and (
        bbox.sampler.classes_per_batch,
        bbox.sampler.samples_per_class,
    ) == (8, 7)
    # test_model.m:23 `for iter = 2000 : 500 : 8000`
    assert _evaluated(bbox) == list(range(2000, 8001, 500))
    assert bbox.dataset.name == "cars196"


@pytest.mark.parametrize(
    ("experiment", "make", "box_hw"),
    [
        # make_cub: box x 1, y 2, w 4, h 3 -> a 3 x 4 crop
        ("authors_cub_bbox", lambda r: make_cub(r, num_classes=4, images_per_class=2), (3, 4)),
        # make_cars: MATLAB box (2, 3)-(6, 7), inclusive -> 5 x 5
        ("authors_cars_bbox", lambda r: make_cars(r, num_classes=4, images_per_class=2), (5, 5)),
    ],
)
def test_bbox_experiments_crop_train_and_test_images_to_their_boxes(
    tmp_path: Path, experiment: str, make, box_hw: tuple[int, int]
) -> None:
    root = make(tmp_path / "data")
    cfg = compose([f"experiment={experiment}", f"dataset.root={root}", "data.check_files=false"])
    for split in ("train", "test"):
        ds = build_split(cfg.dataset, split)
        assert tuple(ds.load(0).shape) == (3, *box_hw)  # the crop, before the transform
        image, _ = ds[0]
        assert tuple(image.shape) == (3, 224, 224)  # then resized whole, as their 224 x 224 cells


@pytest.mark.slow  # BN-Inception on the CPU, 2 iterations
def test_authors_cub_bbox_runs_on_a_fake_cub(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "data", num_classes=4, images_per_class=3)
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "experiment=authors_cub_bbox",
            f"dataset.root={root}",
            f"hydra.run.dir={run_dir}",
            "trainer.max_iters=2",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=3",
            "backbone.pretrained=false",
            "trainer.device=cpu",
            "trainer.num_workers=0",
            "trainer.progress_bar=false",
            "trainer.tensorboard=false",
            "dataset.transform.size=96",
        ],
        tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["recall@1"] <= 1.0
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.dataset.crop is True and cfg.seed == 123
