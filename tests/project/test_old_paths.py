"""Issue 24 moved most modules; every module path of the package before the move still imports."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from softmine import _moved
from tests.conftest import run_forked

#: Every module of ``src/softmine`` at 5cfecf3, the commit before the new layout.
BEFORE = (
    "softmine",
    "softmine.cli",
    "softmine.config",
    "softmine.data",
    "softmine.data.cache",
    "softmine.data.cars",
    "softmine.data.check",
    "softmine.data.csvlist",
    "softmine.data.cub",
    "softmine.data.custom",
    "softmine.data.decode",
    "softmine.data.device_transforms",
    "softmine.data.digits",
    "softmine.data.digits_pairs",
    "softmine.data.download",
    "softmine.data.fakes",
    "softmine.data.file_check",
    "softmine.data.ilidsvid",
    "softmine.data.image_splits",
    "softmine.data.imagefolder",
    "softmine.data.images",
    "softmine.data.inshop",
    "softmine.data.lpw",
    "softmine.data.mars",
    "softmine.data.noise",
    "softmine.data.prid2011",
    "softmine.data.run_batches",
    "softmine.data.samplers",
    "softmine.data.sop",
    "softmine.data.sources",
    "softmine.data.splits",
    "softmine.data.transforms",
    "softmine.data.video",
    "softmine.data.views",
    "softmine.data_cli",
    "softmine.embed",
    "softmine.engine",
    "softmine.engine.artifacts",
    "softmine.engine.atomic",
    "softmine.engine.attention",
    "softmine.engine.callbacks",
    "softmine.engine.checkpoint",
    "softmine.engine.crossval",
    "softmine.engine.distributed",
    "softmine.engine.embed",
    "softmine.engine.eval_history",
    "softmine.engine.evaluator",
    "softmine.engine.logger",
    "softmine.engine.nonfinite",
    "softmine.engine.objective",
    "softmine.engine.optim",
    "softmine.engine.results",
    "softmine.engine.run_folder",
    "softmine.engine.schedules",
    "softmine.engine.setup",
    "softmine.engine.signals",
    "softmine.engine.step_stats",
    "softmine.engine.sweep",
    "softmine.engine.sync_bn",
    "softmine.engine.trainer",
    "softmine.engine.validate",
    "softmine.errors",
    "softmine.evaluate",
    "softmine.evaluation",
    "softmine.evaluation.confusion",
    "softmine.evaluation.knn",
    "softmine.evaluation.reid",
    "softmine.evaluation.rerank",
    "softmine.evaluation.retrieval",
    "softmine.evaluation.video",
    "softmine.export",
    "softmine.fair",
    "softmine.hardware",
    "softmine.html_report",
    "softmine.hydra_errors",
    "softmine.index",
    "softmine.inference",
    "softmine.inference.embed",
    "softmine.inference.embeddings",
    "softmine.inference.export",
    "softmine.inference.images",
    "softmine.inference.index",
    "softmine.inference.model",
    "softmine.losses",
    "softmine.losses.contrastive",
    "softmine.losses.fused",
    "softmine.losses.heads",
    "softmine.losses.lifted",
    "softmine.losses.multi_similarity",
    "softmine.losses.normsoftmax",
    "softmine.losses.osm_caa",
    "softmine.losses.osm_caa_official",
    "softmine.losses.pairwise",
    "softmine.losses.proxy_anchor",
    "softmine.losses.triplet",
    "softmine.models",
    "softmine.models.bninception",
    "softmine.models.caffe",
    "softmine.models.embedding",
    "softmine.models.normalization",
    "softmine.models.tiny",
    "softmine.models.trunks",
    "softmine.models.video",
    "softmine.models.weights",
    "softmine.plots",
    "softmine.report",
    "softmine.train",
    "softmine.tuning",
)


@pytest.mark.parametrize("old", BEFORE)
def test_an_old_module_path_imports(old: str) -> None:
    module = importlib.import_module(old)
    new = _moved.MOVED.get(old)
    if new is not None:  # one module object under both names: patches and isinstance agree
        assert module is importlib.import_module(new)


def test_what_users_import_from_the_old_places() -> None:
    from softmine.data.cub import CUB200 as old_cub
    from softmine.engine.run_folder import plan_run

    from softmine.config import compose_config
    from softmine.data import CUB200, MARS, ImageFolder
    from softmine.runs.folder import plan_run as new_plan_run

    assert old_cub is CUB200 and plan_run is new_plan_run
    assert callable(compose_config) and MARS.__module__ == "softmine.data.datasets.mars"
    assert ImageFolder.__module__ == "softmine.data.datasets.imagefolder"


def test_every_moved_name_points_at_a_module_that_exists() -> None:
    for old, new in _moved.MOVED.items():
        assert importlib.util.find_spec(new) is not None, f"{old} -> {new}"


def test_python_dash_m_softmine_train_still_runs() -> None:
    """The documented torchrun entry (``torchrun ... -m softmine.train``)."""
    out = run_forked(
        [sys.executable, "-m", "softmine.train", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("softmine-train ")
