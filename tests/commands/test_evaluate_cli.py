"""``softmine-eval`` on saved embeddings: retrieval and re-ID archives, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from softmine.commands.evaluate import main
from softmine.evaluation import reid_metrics, retrieval_metrics


def _reid_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 6)) * 2
    qp, gp = rng.integers(1, 8, 12), rng.integers(-1, 8, 60)
    return {
        "query": centers[qp] + rng.normal(size=(12, 6)),
        "query_pids": qp,
        "query_camids": rng.integers(0, 3, 12),
        "gallery": centers[np.abs(gp)] + rng.normal(size=(60, 6)),
        "gallery_pids": gp,
        "gallery_camids": rng.integers(0, 3, 60),
    }


def test_reid_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arrays = _reid_arrays()
    path = tmp_path / "reid.npz"
    np.savez(path, **arrays)
    main([str(path), "--ap", "market", "--out", str(tmp_path / "m.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "m.json").read_text())
    want = reid_metrics(*arrays.values(), ap="market")
    assert printed == pytest.approx(want)
    assert set(printed) == {"cmc@1", "cmc@5", "cmc@10", "cmc@20", "mAP", "num_skipped_queries"}
    main([str(path), "--rerank"])  # the re-ranked metrics beside the plain ones
    reranked = reid_metrics(*arrays.values(), rerank=True)
    assert json.loads(capsys.readouterr().out) == pytest.approx(
        {**reid_metrics(*arrays.values()), **{f"rerank/{k}": v for k, v in reranked.items()}}
    )


def test_reid_npz_junk_and_distractor_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = _reid_arrays()
    path = tmp_path / "reid.npz"
    np.savez(path, **arrays)
    main([str(path), "--junk-pids=-1", "--distractor-pids", "0"])
    got = json.loads(capsys.readouterr().out)
    mars = reid_metrics(*arrays.values(), junk_pids=(-1,), distractor_pids=(0,))
    assert got == pytest.approx(mars)
    assert got != pytest.approx(reid_metrics(*arrays.values()))  # the ids change the result
    with pytest.raises(SystemExit) as e:
        main([str(path), "--junk-pids=minus one"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --junk-pids takes comma-separated")


def test_retrieval_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 5, 50)
    np.savez(tmp_path / "e.npz", embeddings=x, labels=y)
    main([str(tmp_path / "e.npz"), "--ks", "1,3"])
    got = json.loads(capsys.readouterr().out)
    assert got == pytest.approx(retrieval_metrics(x, y, [1, 3]))


def test_bad_archives_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "odd.npz", foo=np.zeros(3))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "odd.npz")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "needs either" in err and err.count("\n") == 1
    arrays = _reid_arrays()
    arrays["query_pids"] = arrays["query_pids"][:5]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "bad.npz")])
    assert e.value.code == 2 and "query_pids has 5 entries" in capsys.readouterr().err


def _evaluated_csv(tmp_path: Path, protocol: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The trainer's Evaluator on a small CSV set: its metrics and the test arrays it scored."""
    import torch

    from softmine.engine.evaluator import Evaluator
    from softmine.models import EmbeddingNet, TinyCNN
    from softmine.testing.fakes import make_csv
    from tests.conftest import compose

    file = make_csv(tmp_path / protocol, labels=(0, 1, 2, 3, 4, 5), images_per_label=3)
    cfg = compose(
        [
            "dataset=csv",
            f"dataset.file={file}",
            f"dataset.eval_protocol={protocol}",
            "dataset.transform.resize=16",
            "dataset.transform.crop_size=16",
            "trainer.device=cpu",
        ]
    )
    torch.manual_seed(0)
    model = EmbeddingNet(TinyCNN(in_channels=3, width=4), embedding_dim=8)
    evaluator = Evaluator(cfg, torch.device("cpu"))
    return evaluator.evaluate(model), evaluator.last_test_arrays


@pytest.mark.parametrize("protocol", ["retrieval", "reid"])
def test_an_embeddings_file_scores_as_the_trainers_evaluator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    """softmine-eval on the arrays the evaluator scored gives the evaluator's own metrics."""
    metrics, arrays = _evaluated_csv(tmp_path, protocol)
    path = tmp_path / "test_embeddings.npz"
    np.savez(path, **arrays)
    main([str(path)])
    assert json.loads(capsys.readouterr().out) == metrics


def test_an_embeddings_file_reranks_as_the_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ap, --junk-pids, --distractor-pids and --rerank* score as the same evaluation.* keys."""
    from softmine.engine.evaluator import score_arrays
    from tests.conftest import compose

    arrays = _reid_arrays(3)
    path = tmp_path / "reid.npz"
    np.savez(path, **arrays)
    main(
        [str(path), "--ap", "market", "--junk-pids=-1", "--distractor-pids=0"]
        + ["--rerank", "--rerank-k1", "7", "--rerank-k2", "3", "--rerank-lambda", "0.5"]
    )
    got = json.loads(capsys.readouterr().out)
    cfg = compose(
        ["dataset=mars", "evaluation.ap=market", "evaluation.rerank=true"]
        + ["evaluation.rerank_k1=7", "evaluation.rerank_k2=3", "evaluation.rerank_lambda=0.5"]
    )
    assert (cfg.dataset.junk_pids, cfg.dataset.distractor_pids) == ([-1], [0])
    assert got == score_arrays(arrays, cfg)
    assert "rerank/mAP" in got
