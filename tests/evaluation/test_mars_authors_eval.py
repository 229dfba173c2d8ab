"""authors_mars's ``authors/*`` figures follow the authors' MARS evaluation, on a fake MARS.

Their test data (``MARS_V01/pre_pro_process/generate_data/generate_Mars_test_dataset_V001.m``:18, 34)
labels every tracklet with its folder's index in the ASCII-sorted listing of ``bbox_test/``
minus 3, so label 0 is the junk folder ``00-1`` and label 1 the distractor folder ``0000``;
``evaluation_mars.m``:4 removes label 0 only, and ``compute_AP.m`` is the trapezoid AP.
The expected numbers come from a hand example and from a float64 port of those files.
"""

from __future__ import annotations

import numpy as np
import pytest

from softmine.data import MARS
from softmine.engine.evaluator import score_arrays
from softmine.testing.fakes import MARS_QUERY_IDX, MARS_TEST, make_mars
from tests.conftest import compose


@pytest.fixture(scope="module")
def fake_mars(tmp_path_factory: pytest.TempPathFactory):
    root = make_mars(tmp_path_factory.mktemp("data") / "mars")
    query, gallery = MARS(root, "query"), MARS(root, "gallery")
    return root, query, gallery


def _arrays(query: MARS, gallery: MARS, features: np.ndarray) -> dict[str, np.ndarray]:
    """The evaluator's re-ID arrays, with ``features[r]`` the feature of test track row r."""

    def side(split: MARS) -> tuple[np.ndarray, ...]:
        pids = np.array([t[1] for t in split.tracklets])
        cams = np.array([t[2] for t in split.tracklets])
        return features[split.rows], pids, cams

    return dict(
        zip(
            ("query", "query_pids", "query_camids", "gallery", "gallery_pids", "gallery_camids"),
            (*side(query), *side(gallery)),
            strict=True,
        )
    )


def _authors_reference(features: np.ndarray) -> tuple[np.ndarray, float]:
    """(CMC, mAP) of a float64 port of the authors' pipeline on all MARS_TEST tracks.

    Labels as generate_Mars_test_dataset_V001.m gives them (ASCII-sorted folders, index - 3
    with '.' and '..' first); gallery = every test track (queries and junk included);
    cosine distance 1 - cos; evaluation_mars.m (junk = label 0 and the query's own
    label in its camera) with compute_AP.m's trapezoid AP, one query at a time.
    """
    folders = sorted({"00-1" if p == -1 else f"{p:04d}" for p, _, _ in MARS_TEST})
    label_of = {name: i for i, name in enumerate(folders)}  # dir_index 3 (after '.', '..') -> 0
    labels = np.array([label_of["00-1" if p == -1 else f"{p:04d}"] for p, _, _ in MARS_TEST])
    cams = np.array([c for _, c, _ in MARS_TEST])
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    query_idx = np.asarray(MARS_QUERY_IDX) - 1
    junk0 = np.flatnonzero(labels == 0)
    cmcs, aps = [], []
    for k in query_idx:
        score = 1.0 - x @ x[k]
        pos = np.flatnonzero(labels == labels[k])
        good = set(pos[cams[pos] != cams[k]].tolist())
        junk = set(junk0.tolist()) | set(pos[cams[pos] == cams[k]].tolist())
        index = np.argsort(score, kind="stable")
        cmc = np.zeros(len(index))
        ap, old_recall, old_precision, hits, j, good_now, njunk = 0.0, 0.0, 1.0, 0, 0, 0, 0
        for n, item in enumerate(index):
            flag = item in good
            if flag:
                cmc[n - njunk :] = 1
                good_now += 1
            if item in junk:
                njunk += 1
                continue
            hits += flag
            recall, precision = hits / len(good), hits / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j += 1
            if good_now == len(good):
                break
        cmcs.append(cmc)
        aps.append(ap)
    return np.mean(cmcs, axis=0), float(np.mean(aps))


# Hand example: 2-d features at these angles (degrees), one per MARS_TEST row.
# Rows: 1-2 junk (-1), 3-4 distractors (0000), 5-7 pid 2, 8-10 pid 4, 11-12 pid 6;
# queries rows 5, 6, 8, 10, 11. Distractor row 3 sits just above pid 2's matches for
# queries 5 and 6, distractor row 4 just above query 11's match; junk rows sit above
# matches too and must be removed under both rules.
ANGLES = [3, 122, 5, 245, 0, 10, 40, 120, 130, 150, 240, 250]


def _hand_features() -> np.ndarray:
    a = np.deg2rad(np.asarray(ANGLES, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_authors_rule_is_junk_minus_one_with_distractors_as_negatives(fake_mars) -> None:
    """By hand. Query 5 (0 deg; matches rows 6, 7): distractor row 3 ranks 1, matches 2 and 3:
    trapezoid AP = ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2 = 5/12. Query 6 (10 deg; match row 5,
    row 7 shares its camera): row 3 ranks 1, row 5 ranks 2: AP (0 + 1/2)/2 = 1/4. Query 11:
    distractor row 4 first, match second: 1/4. Queries 8 and 10: matches first: 1.
    rank-1 = 2/5; mAP = (5/12 + 1/4 + 1 + 1 + 1/4) / 5 = 7/12. (Dropping the distractors,
    the old variant's rule, would give rank-1 1 and mAP 1.)"""
    root, query, gallery = fake_mars
    cfg = compose(["experiment=authors_mars", f"dataset.root={root}", "evaluation.rerank=false"])
    got = score_arrays(_arrays(query, gallery, _hand_features()), cfg)
    assert got["authors/cmc@1"] == pytest.approx(2 / 5)
    assert got["authors/cmc@5"] == pytest.approx(1.0)
    assert got["authors/mAP"] == pytest.approx(7 / 12)
    assert got["authors/num_skipped_queries"] == 0
    # the standard protocol's rank-1 is the same figure; its AP is the non-interpolated one:
    # (1/2 + 2/3)/2, 1/2, 1, 1, 1/2 -> 43/60
    assert got["cmc@1"] == pytest.approx(2 / 5)
    assert got["mAP"] == pytest.approx(43 / 60)
    cmc, mAP = _authors_reference(_hand_features())  # the port agrees with the hand numbers
    assert (cmc[0], mAP) == pytest.approx((2 / 5, 7 / 12))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_variant_matches_a_port_of_their_evaluation(fake_mars, seed: int) -> None:
    root, query, gallery = fake_mars
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(MARS_TEST), 4))
    cfg = compose(["experiment=authors_mars", f"dataset.root={root}", "evaluation.rerank=false"])
    got = score_arrays(_arrays(query, gallery, features), cfg)
    cmc, mAP = _authors_reference(features)
    for r in cfg.evaluation.ranks:
        assert got[f"authors/cmc@{r}"] == pytest.approx(cmc[min(r, len(cmc)) - 1]), r
    assert got["authors/mAP"] == pytest.approx(mAP, abs=1e-12)
