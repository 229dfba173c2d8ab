"""The trainer's parts: the built components, the stop messages, the run's outputs, and the
line between the engine (trains) and the reports (written by softmine-train after it)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from softmine.engine.checkpoint import Checkpoints
from softmine.engine.failures import explain_stop, kept, kept_files, lower_lr_hint
from softmine.engine.outputs import RunOutputs
from softmine.errors import Interrupted, StorageError
from tests.conftest import FAST_DIGITS, compose

ENGINE = Path(__file__).resolve().parents[2] / "src" / "softmine" / "engine"


def test_the_engine_never_imports_the_reports() -> None:
    """softmine.reporting sits above the engine: not one import of it in engine/."""
    found = []
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.startswith("softmine.reporting")]
    assert found == []


def test_what_was_kept_names_last_pt_and_its_step(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    assert kept(ckpts) == "no checkpoint was written yet"
    assert lower_lr_hint(ckpts, 0.03) == (
        "Start again with a lower learning rate (e.g. optimizer.lr=0.003)"
    )
    ckpts.dir.mkdir()
    ckpts.last.write_bytes(b"")
    ckpts.saved_step = 40
    last = tmp_path / "checkpoints" / "last.pt"
    assert kept(ckpts) == f"the last checkpoint, with finite weights, is {last} (step 40)"
    assert lower_lr_hint(ckpts, None).endswith(
        "resume=true resume_override=[optimizer.lr] optimizer.lr=<lower>"
    )
    assert kept_files(ckpts, 42, finished=False) == (
        f"training stopped at step 42; the last checkpoint, with finite weights, is {last} "
        "(step 40); free space and continue with resume=true"
    )
    (tmp_path / "metrics.json").write_text("{}")
    assert kept_files(ckpts, 42, finished=True).startswith(
        f"the results are safe in {tmp_path / 'metrics.json'}, but the final weights were not "
        f"saved ({last} still holds step 40)"
    )


def test_a_stop_becomes_one_error_saying_what_was_kept(tmp_path: Path) -> None:
    ckpts = Checkpoints(tmp_path)
    full = OSError(28, "No space left on device", str(tmp_path / "x"))
    error = explain_stop(full, ckpts, 7, finished=False)
    assert isinstance(error, StorageError) and error.errno == 28
    assert str(error) == (
        f"cannot write {tmp_path / 'x'} (No space left on device); training stopped at step 7; "
        "no checkpoint was written yet; free space and continue with resume=true"
    )
    interrupt = explain_stop(KeyboardInterrupt(), ckpts, 7, finished=False)
    assert isinstance(interrupt, Interrupted) and str(interrupt).startswith(
        "aborted at step 7 by an interrupt; no checkpoint was written yet. Resume with"
    )
    assert explain_stop(OSError(2, "No such file"), ckpts, 7, finished=False) is None
    assert explain_stop(ValueError("a bug"), ckpts, 7, finished=False) is None


def test_metrics_json_is_the_metrics_then_the_summary() -> None:
    """A key a report adds to the metrics (attention_auc) comes before the summary's keys."""
    metrics = {"recall@1": 0.5, "map@r": 0.25}
    run = RunOutputs(
        **dict.fromkeys(
            (
                "cfg run_dir is_main model loss_fn device train_set test_set num_workers "
                "baselines test_embeddings test_arrays embed_test"
            ).split()
        ),
        metrics=metrics,
        summary={"best_test/map@r": 0.3, "iteration": 12},
    )
    metrics["attention_auc"] = 0.75
    assert list(run.final_metrics().items()) == [
        ("recall@1", 0.5),
        ("map@r", 0.25),
        ("attention_auc", 0.75),
        ("best_test/map@r", 0.3),
        ("iteration", 12),
    ]


@pytest.mark.slow
def test_fit_trains_and_softmine_train_adds_the_reports(tmp_path: Path) -> None:
    """Trainer.fit writes what the engine writes; fit_and_report adds report.html and the plots,
    and both give the same metrics.json for the same run."""
    from softmine.engine import Trainer
    from softmine.reporting.artifacts import fit_and_report

    overrides = [*FAST_DIGITS, "trainer.device=cpu", "trainer.max_iters=4", "trainer.plots=true"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = Trainer(compose(overrides), tmp_path / "plain")
        assert plain.model is plain.parts.model and plain.loader is plain.parts.loader
        metrics = plain.fit()
        reported = fit_and_report(Trainer(compose(overrides), tmp_path / "reported"))
    finally:
        torch.set_num_threads(threads)
    for run in ("plain", "reported"):
        assert (tmp_path / run / "checkpoints" / "last.pt").exists()
        assert (tmp_path / run / "train_log.csv").exists()
    assert not (tmp_path / "plain" / "report.html").exists()
    assert not (tmp_path / "plain" / "plots").exists()
    assert (tmp_path / "reported" / "report.html").exists()
    assert (tmp_path / "reported" / "plots" / "recall_at_k.png").exists()
    assert metrics == reported == json.loads((tmp_path / "plain" / "metrics.json").read_text())
