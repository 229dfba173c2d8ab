"""k-reciprocal re-ranking against a per-sample float64 loop of Zhong et al.'s algorithm, and its
settings (evaluation.rerank_k1/k2/lambda, softmine-eval --rerank-*) reaching it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from softmine.commands import evaluate
from softmine.data.splits import build_train_and_validation
from softmine.engine import evaluator as evaluator_module
from softmine.engine.evaluator import REID_ARRAYS, Evaluator, score_arrays
from softmine.errors import ConfigError
from softmine.evaluation import (
    evaluate_reid,
    evaluate_reid_distmat,
    k_reciprocal_distances,
    reid_metrics,
)
from softmine.evaluation.rerank import expansion_size
from softmine.testing.fakes import make_mars
from tests.conftest import compose


def _reference(
    q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float, authors: bool = False
) -> np.ndarray:
    """The algorithm of the paper, one sample at a time, with a dense N x N float64 matrix.

    ``authors``: a candidate's reciprocal set as Wang et al.'s ``re_ranking_cosine.m``:30 draws
    it, ``initial_rank(candidate, 1:round((k1+1)/2))`` with MATLAB's round (half away from 0)."""
    x = np.concatenate([q, g])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, nq = len(x), len(q)
    dist = np.maximum(2.0 - 2.0 * x @ x.T, 0.0)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1)

    def reciprocal(i: int, k: int) -> list[int]:
        return [int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    v = np.zeros((n, n))
    kh = math.floor((k1 + 1) / 2 + 0.5) - 1 if authors else int(np.around(k1 / 2))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, kh)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        cols = sorted(expanded)
        w = np.exp(-dist[i, cols])
        v[i, cols] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            a, b = v[i], v[nq + j]
            jac[i, j] = 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
    return (1 - lam) * jac + lam * dist[:nq, nq:]


def _data(seed: int, nq: int = 15, ng: int = 70, d: int = 8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, d)) * 2
    qp, gp = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    q = centers[qp] + rng.normal(size=(nq, d))
    g = centers[gp] + rng.normal(size=(ng, d))
    return q, qp, g, gp


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0)])
def test_matches_per_sample_reference(k1: int, k2: int, lam: float) -> None:
    q, _, g, _ = _data(0)
    x = np.concatenate([q, g])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    gaps = np.diff(np.sort(x @ x.T, axis=1), axis=1)
    assert gaps.min() > 1e-6, "test data must be free of (float32) ties"
    got = k_reciprocal_distances(q, g, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(got, _reference(q, g, k1, k2, lam), atol=2e-6)


def test_rerank_option_of_evaluate_reid_ranks_by_the_reranked_distance() -> None:
    q, qp, g, gp = _data(1)
    qc, gc = np.zeros(len(q), int), np.ones(len(g), int)
    dist = k_reciprocal_distances(q, g)
    want = evaluate_reid_distmat(dist, qp, qc, gp, gc, ap="market")
    got = evaluate_reid(q, qp, qc, g, gp, gc, rerank=True, ap="market")
    assert got.mAP == pytest.approx(want.mAP, abs=1e-12)
    np.testing.assert_array_equal(got.first_match_rank, want.first_match_rank)


@pytest.mark.parametrize("k1", [3, 7, 11, 20])
def test_the_authors_expansion_matches_their_matlab_rule(k1: int) -> None:
    """re_ranking_cosine.m:30 (itself and round((k1+1)/2) - 1 others) differs from Zhong's
    round(k1/2) others at k1 = 3, 7, 11; at an even k1 the two agree."""
    q, _, g, _ = _data(11)
    got = k_reciprocal_distances(q, g, k1=k1, k2=3, lambda_value=0.85, expansion="authors")
    np.testing.assert_allclose(got, _reference(q, g, k1, 3, 0.85, authors=True), atol=2e-6)
    assert (expansion_size(k1, "authors") == expansion_size(k1, "zhong")) == (k1 % 4 != 3)
    if k1 == 7:  # the authors_mars setting: here the two rules re-rank differently
        zhong = k_reciprocal_distances(q, g, k1=k1, k2=3, lambda_value=0.85)
        assert not np.allclose(got, zhong)


def test_bad_parameters_are_clear() -> None:
    q, _, g, _ = _data(2, nq=3, ng=5)
    with pytest.raises(ConfigError, match="k1 must be in"):
        k_reciprocal_distances(q, g, k1=20)
    with pytest.raises(ConfigError, match="lambda_value"):
        k_reciprocal_distances(q, g, k1=3, k2=2, lambda_value=1.5)


def _reid_arrays(seed: int) -> dict[str, np.ndarray]:
    q, qp, g, gp = _data(seed)
    qc, gc = np.zeros(len(q), int), np.ones(len(g), int)
    return dict(zip(REID_ARRAYS, (q, qp + 1, qc, g, gp + 1, gc), strict=True))  # ids 1..6


def _reference_metrics(arrays: dict, k1: int, k2: int, lam: float) -> dict[str, float]:
    """Metrics ranked by the float64 reference's re-ranked distances."""
    q, qp, qc, g, gp, gc = (arrays[k] for k in REID_ARRAYS)
    dist = _reference(q, g, k1, k2, lam)
    return evaluate_reid_distmat(
        dist, qp, qc, gp, gc, junk_pids=(-1,), distractor_pids=(0,)
    ).metrics()


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_rerank_config_keys_reach_the_reranking_and_keep_the_plain_metrics() -> None:
    """evaluation.rerank_k1/k2/lambda: rerank/* are the metrics of the float64 reference with
    those values (not Zhong's defaults); the plain metrics stay beside them, unchanged."""
    arrays = _reid_arrays(3)
    knobs = ["evaluation.rerank_k1=5", "evaluation.rerank_k2=2", "evaluation.rerank_lambda=0.4"]
    cfg = compose(["dataset=mars", "evaluation.rerank=true", *knobs])
    got = score_arrays(arrays, cfg)
    want = _reference_metrics(arrays, 5, 2, 0.4)
    assert _prefixed(got, "rerank/") == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(_reference_metrics(arrays, 20, 6, 0.3), abs=1e-9)  # knobs matter
    plain = reid_metrics(*arrays.values(), junk_pids=(-1,), distractor_pids=(0,))
    assert {k: v for k, v in got.items() if "/" not in k} == pytest.approx(plain, abs=1e-12)
    off = score_arrays(arrays, compose(["dataset=mars", *knobs]))  # rerank=false: plain only
    assert off == pytest.approx(plain, abs=1e-12)


def test_rerank_lambda_one_is_the_original_ranking() -> None:
    """lambda = 1 leaves the row-scaled original distance: its ranking is the plain one."""
    arrays = _reid_arrays(4)
    cfg = compose(["dataset=mars", "evaluation.rerank=true", "evaluation.rerank_lambda=1.0"])
    got = score_arrays(arrays, cfg)
    plain = {k: v for k, v in got.items() if "/" not in k}
    assert _prefixed(got, "rerank/") == pytest.approx(plain, abs=1e-9)
    assert got["rerank/mAP"] != pytest.approx(
        score_arrays(arrays, compose(["dataset=mars", "evaluation.rerank=true"]))["rerank/mAP"]
    )


def test_softmine_eval_rerank_takes_the_same_knobs(tmp_path, capsys) -> None:
    arrays = _reid_arrays(3)
    path = tmp_path / "reid.npz"
    np.savez(path, **arrays)
    ids = ["--junk-pids=-1", "--distractor-pids=0"]
    knobs = ["--rerank-k1", "5", "--rerank-k2", "2", "--rerank-lambda", "0.4"]
    evaluate.main([str(path), *ids, "--rerank", *knobs])
    got = json.loads(capsys.readouterr().out)
    assert _prefixed(got, "rerank/") == pytest.approx(_reference_metrics(arrays, 5, 2, 0.4))
    plain = reid_metrics(*arrays.values(), junk_pids=(-1,), distractor_pids=(0,))
    assert {k: v for k, v in got.items() if "/" not in k} == pytest.approx(plain)
    evaluate.main([str(path), *ids, "--rerank", "--rerank-lambda", "1"])
    got = json.loads(capsys.readouterr().out)
    assert _prefixed(got, "rerank/") == pytest.approx(plain)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), "--rerank-k1", "5"])
    assert e.value.code == 2
    assert "--rerank-k1 sets the re-ranking; add --rerank" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), "--rerank", "--rerank-k1", "3", "--rerank-k2", "5"])
    assert e.value.code == 2
    assert "--rerank-k2 in 1..k1+1" in capsys.readouterr().err


class _MeanColour(torch.nn.Module):
    """Frames (n, 3, H, W) -> their mean colour: fake MARS frames differ by identity in blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def test_a_checkpoint_and_the_validation_split_rerank_with_the_given_knobs(
    tmp_path, monkeypatch
) -> None:
    """softmine-eval RUN --rerank --rerank-k1 ...: the run's config gets the knobs, the
    re-ranking receives them, and the test and validation splits report rerank/* beside
    the plain metrics (val/rerank/* for the held-out identities)."""
    root = make_mars(tmp_path / "mars")
    cfg = compose(["dataset=mars", f"dataset.root={root}", "trainer.device=cpu"])
    loaded = SimpleNamespace(config=cfg, model=_MeanColour(), device=torch.device("cpu"))
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: loaded)
    calls = []
    real = evaluator_module.k_reciprocal_distances

    def spy(q, g, **kwargs):
        calls.append(kwargs)
        return real(q, g, **kwargs)

    monkeypatch.setattr(evaluator_module, "k_reciprocal_distances", spy)
    got = evaluate.evaluate_checkpoint(
        tmp_path / "last.pt", "cpu", {"k1": 4, "k2": 2, "lambda_value": 1.0}
    )
    assert calls == [{"k1": 4, "k2": 2, "lambda_value": 1.0, "expansion": "zhong"}]
    plain = {k: v for k, v in got.items() if "/" not in k}
    assert set(plain) == {"cmc@1", "cmc@5", "cmc@10", "cmc@20", "mAP", "num_skipped_queries"}
    assert _prefixed(got, "rerank/") == pytest.approx(plain)  # lambda 1: the plain ranking

    knobs = ["evaluation.rerank_k1=2", "evaluation.rerank_k2=1", "evaluation.rerank_lambda=0.5"]
    val_cfg = compose(
        ["dataset=mars", f"dataset.root={root}", "dataset.val_classes=2", "evaluation.rerank=true"]
        + knobs
    )
    _, val = build_train_and_validation(val_cfg.dataset, reid=True)
    ev = Evaluator(val_cfg, torch.device("cpu"), validation=val, test=False)
    calls.clear()
    out = ev.evaluate_validation(_MeanColour())
    assert calls == [{"k1": 2, "k2": 1, "lambda_value": 0.5, "expansion": "zhong"}]
    assert set(out) == {f"val/{p}{k}" for p in ("", "rerank/") for k in plain}
    assert set(ev.metric_names()) == {k for k in out if "num_skipped" not in k}
