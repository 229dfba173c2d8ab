"""Old module paths that still import: each name below is the module it became.

Issue 24 gave the package a layout whose folders name their job (commands/, runs/,
reporting/, data/datasets/, testing/) and one name, "authors", for the authors' released
code (``losses/osm_caa_official`` became ``losses/osm_caa_authors``). Code and configs
written against the old paths keep working: ``import softmine.engine.run_folder`` returns
:mod:`softmine.runs.folder` itself (one module object, so patches and
``isinstance`` checks agree), and ``python -m softmine.train`` runs
:mod:`softmine.commands.train`. New code uses the new paths.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from types import CodeType, ModuleType

MOVED: dict[str, str] = {
    "softmine.cli": "softmine.commands.common",
    "softmine.data.cars": "softmine.data.datasets.cars",
    "softmine.data.csvlist": "softmine.data.datasets.csvlist",
    "softmine.data.cub": "softmine.data.datasets.cub",
    "softmine.data.digits": "softmine.data.datasets.digits",
    "softmine.data.digits_pairs": "softmine.data.datasets.digits_pairs",
    "softmine.data.fakes": "softmine.testing.fakes",
    "softmine.data.ilidsvid": "softmine.data.datasets.ilidsvid",
    "softmine.data.imagefolder": "softmine.data.datasets.imagefolder",
    "softmine.data.inshop": "softmine.data.datasets.inshop",
    "softmine.data.lpw": "softmine.data.datasets.lpw",
    "softmine.data.mars": "softmine.data.datasets.mars",
    "softmine.data.prid2011": "softmine.data.datasets.prid2011",
    "softmine.data.sop": "softmine.data.datasets.sop",
    "softmine.data.video": "softmine.data.tracklets",
    "softmine.data_cli": "softmine.commands.data",
    "softmine.embed": "softmine.commands.embed",
    "softmine.engine.artifacts": "softmine.reporting.artifacts",
    "softmine.engine.atomic": "softmine.runs.atomic",
    "softmine.engine.attention": "softmine.reporting.attention",
    "softmine.engine.callbacks": "softmine.runs.hydra_callbacks",
    "softmine.engine.crossval": "softmine.reporting.crossval",
    "softmine.engine.embed": "softmine.engine.embedding",
    "softmine.engine.results": "softmine.runs.metrics_file",
    "softmine.engine.run_folder": "softmine.runs.folder",
    "softmine.engine.signals": "softmine.runs.signals",
    "softmine.engine.sweep": "softmine.runs.sweep",
    "softmine.evaluate": "softmine.commands.evaluate",
    "softmine.evaluation.video": "softmine.engine.embedding",
    "softmine.export": "softmine.commands.export",
    "softmine.fair": "softmine.commands.fair",
    "softmine.html_report": "softmine.reporting.html",
    "softmine.hydra_errors": "softmine.commands.hydra_errors",
    "softmine.index": "softmine.commands.index",
    "softmine.models.embedding": "softmine.models.embedding_net",
    "softmine.inference.embed": "softmine.inference.extract",
    "softmine.inference.export": "softmine.inference.model_export",
    "softmine.inference.images": "softmine.inference.image_files",
    "softmine.inference.index": "softmine.inference.search_index",
    "softmine.losses.osm_caa_official": "softmine.losses.osm_caa_authors",
    "softmine.plots": "softmine.reporting.plots",
    "softmine.report": "softmine.commands.report",
    "softmine.train": "softmine.commands.train",
    "softmine.tuning": "softmine.commands.tune",
}


class _AliasLoader:
    """Loads an old name as the module it moved to (and runs it under ``python -m``).

    Duck-typed rather than an ``importlib.abc`` subclass: that module imports
    ``importlib.resources`` and ``tempfile``, time every command would pay at start-up."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module ran when it was imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        import importlib.util

        spec = importlib.util.find_spec(self.new)
        if spec is None or spec.loader is None:
            return None
        return spec.loader.get_code(self.new)  # type: ignore[attr-defined]


class _AliasFinder:
    """Finds the old module paths of :data:`MOVED`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        new = MOVED.get(fullname)
        if new is None:
            return None
        import importlib.util

        target_spec = importlib.util.find_spec(new)
        origin = target_spec.origin if target_spec is not None else None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), origin=origin)


def install() -> None:
    """Make the old paths importable (idempotent; :mod:`softmine` calls it on import)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
