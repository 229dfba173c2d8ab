"""The run folder's layout: each file where the docs say it is, and spelled by one module only."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from softmine.runs.layout import (
    ReportLayout,
    RunLayout,
    StudyLayout,
    SweepLayout,
    bad_images_beside,
    read_metrics,
)
from softmine.runs.metrics_file import read_metrics as reexported_read_metrics

REPO = Path(__file__).resolve().parents[2]
LAYOUT_MODULE = REPO / "src" / "softmine" / "runs" / "layout.py"

#: Every property, with the path docs/ and users know (relative to the folder's root).
EXPECTED = {
    RunLayout: {
        "lock": ".softmine.lock",
        "record_dir": ".hydra",
        "config": ".hydra/config.yaml",
        "overrides": ".hydra/overrides.yaml",
        "hydra": ".hydra/hydra.yaml",
        "resumes": ".hydra/resumes.yaml",
        "log": "train.log",
        "train_log": "train_log.csv",
        "eval_log": "eval_log.csv",
        "metrics": "metrics.json",
        "bad_images": "bad_images.txt",
        "attention": "attention.csv",
        "test_embeddings": "test_embeddings.npz",
        "report": "report.html",
        "summary": "summary",
        "tensorboard": "tensorboard",
        "mlflow_run_id": "mlflow_run_id",
        "wandb_run_id": "wandb_run_id",
        "checkpoints": "checkpoints",
        "last_checkpoint": "checkpoints/last.pt",
        "best_checkpoint": "checkpoints/best.pt",
        "plots": "plots",
        "training_curves_plot": "plots/training_curves.png",
        "recall_plot": "plots/recall_at_k.png",
        "cmc_plot": "plots/cmc.png",
        "retrieval_grid_plot": "plots/retrieval_grid.png",
        "retrieval_grid_worst_plot": "plots/retrieval_grid_worst.png",
        "tsne_plot": "plots/tsne.png",
        "map_sample": "plots/embedding_map.npz",
        "osm_weights_plot": "plots/osm_weights.png",
        "attention_plot": "plots/attention.png",
    },
    SweepLayout: {
        "lock": ".softmine.lock",
        "summary": "summary.csv",
        "hydra_record": "multirun.yaml",
        "jobs": ".jobs",
        "stop": ".jobs/STOP",
        "fair_table": "fair.csv",
        "fair_markdown": "fair.md",
        "val_curves": "val_curves.png",
    },
    StudyLayout: {"db": "study.db", "record": "study.yaml"},
    ReportLayout: {
        "markdown": "report.md",
        "table": "report.csv",
        "html": "report.html",
        "training_loss_plot": "training_loss.png",
        "tsne_plot": "tsne.png",
    },
}


def _properties(cls: type) -> list[str]:
    return [name for name, value in vars(cls).items() if isinstance(value, property)]


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_every_property_is_the_documented_path(cls: type, tmp_path: Path) -> None:
    expected = EXPECTED[cls]
    assert sorted(_properties(cls)) == sorted(expected), "a property without an expected path"
    layout = cls(tmp_path)
    for name, rel in expected.items():
        assert getattr(layout, name) == tmp_path / rel, name
        assert getattr(cls(Path()), name) == Path(rel), name  # rooted at Path(): relative


def test_the_methods_name_their_files(tmp_path: Path) -> None:
    assert SweepLayout(tmp_path).job(3) == tmp_path / ".jobs" / "3.json"
    assert ReportLayout(tmp_path).plot("map_r") == tmp_path / "map_r.png"
    assert bad_images_beside(tmp_path / "emb.npz") == tmp_path / "emb.bad_images.txt"
    assert RunLayout(str(tmp_path)).root == tmp_path  # a str root becomes a Path


def test_read_metrics_reads_the_run_folder_or_the_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"map@r": 0.5, "iteration": 7}))
    want = {"map@r": 0.5, "iteration": 7}
    assert RunLayout(tmp_path).read_metrics() == want
    assert read_metrics(tmp_path) == want
    assert read_metrics(tmp_path / "metrics.json") == want
    assert reexported_read_metrics is read_metrics


# ----------------------------------------------------------------------------- one module spells them


def _checked_names() -> list[str]:
    """The file and folder names of the layouts that are unmistakable in a string: those with
    a dot or an underscore (plain words such as ``plots`` are also config keys)."""
    names = {
        part for paths in EXPECTED.values() for rel in paths.values() for part in Path(rel).parts
    }
    return sorted(n for n in names if "." in n or "_" in n)


def _documentation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) of every string that is a statement of its own (docstrings)."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            v = node.value
            spans.append(
                ((v.lineno, v.col_offset), (v.end_lineno or v.lineno, v.end_col_offset or 0))
            )
    return spans


def code_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals of ``source`` that are code, not docstrings."""
    docs = _documentation_spans(source)
    kinds = {tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in kinds and not any(a <= tok.start < b for a, b in docs):
            out.append((tok.start[0], tok.string))
    return out


def spellings(source: str, names: list[str]) -> list[tuple[int, str]]:
    """(line, name) for each of ``names`` spelled as a path component in a code string."""
    patterns = {n: re.compile(rf"(?<![\w.-]){re.escape(n)}(?![\w-])") for n in names}
    return [
        (line, n)
        for line, text in code_strings(source)
        for n, p in patterns.items()
        if p.search(text)
    ]


def test_the_spelling_check_sees_code_and_skips_docstrings() -> None:
    source = (
        '"""Writes metrics.json."""\n'
        "def f(run):\n"
        '    """The ``metrics.json`` of a run."""\n'
        '    a = run / "metrics.json"\n'
        '    b = f"{run}/checkpoints/last.pt"\n'
        '    c = "softmine.reporting.html"  # report.html\n'
        '    return "final_metrics.json"\n'
    )
    found = spellings(source, ["last.pt", "metrics.json", "report.html"])
    assert found == [(4, "metrics.json"), (5, "last.pt")]


def test_only_the_layout_module_spells_the_file_names() -> None:
    names = _checked_names()
    assert {"metrics.json", "last.pt", ".hydra", "summary.csv", "mlflow_run_id"} <= set(names)
    offenders = []
    for root in ("src", "scripts"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == LAYOUT_MODULE:
                continue
            for line, name in spellings(path.read_text(), names):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offenders, "use softmine.runs.layout instead of spelling:\n" + "\n".join(offenders)
