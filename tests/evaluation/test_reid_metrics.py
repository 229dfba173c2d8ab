"""Re-ID CMC/mAP against hand-worked cases and an independent float64 loop of the MATLAB protocol."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from softmine.errors import ConfigError, DataError
from softmine.evaluation import cmc_map, evaluate_reid, evaluate_reid_distmat, reid_metrics


def _unit(angles_deg: list[float]) -> np.ndarray:
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1)


def _one_query(gallery_angles, gallery_pids, gallery_cams, q_pid=1, q_cam=0, **kw):
    """One query at angle 0 against a gallery whose similarity order is the order of the angles."""
    return evaluate_reid(
        _unit([0]),
        [q_pid],
        [q_cam],
        _unit(gallery_angles),
        gallery_pids,
        gallery_cams,
        **kw,
    )


MARS = {"junk_pids": (-1,), "distractor_pids": (0,)}


def test_junk_identity_is_removed() -> None:
    # Ranked: junk (pid -1), match, other identity. Without the junk the match is rank 1.
    res = _one_query([5, 10, 20], [-1, 1, 2], [1, 1, 1], **MARS)
    assert res.first_match_rank[0] == 1 and res.ap[0] == pytest.approx(1.0)
    assert res.cmc[0] == 1.0 and res.num_skipped == 0
    # By default -1 is an identity like any other: a negative ranked first.
    assert _one_query([5, 10, 20], [-1, 1, 2], [1, 1, 1]).first_match_rank[0] == 2


def test_distractor_stays_as_a_negative_and_never_matches() -> None:
    # Ranked: distractor (pid 0), match. The distractor keeps rank 1, so the match is rank 2.
    res = _one_query([5, 10], [0, 1], [1, 1], **MARS)
    assert res.first_match_rank[0] == 2 and res.ap[0] == pytest.approx(0.5)
    # Trapezoid AP: (P(1) + P(2)) / 2 = (0 + 1/2) / 2.
    mkt = _one_query([5, 10], [0, 1], [1, 1], ap="market", **MARS)
    assert mkt.ap[0] == pytest.approx(0.25)
    # A distractor query has no true match even against other distractors: skipped.
    q, g = _unit([0, 50]), _unit([5, 40])
    res = evaluate_reid(q, [0, 1], [0, 0], g, [0, 1], [1, 1], **MARS)
    assert res.num_skipped == 1 and np.isnan(res.ap[0]) and res.mAP == pytest.approx(1.0)
    # By default identity 0 is real: the first query matches its gallery item at rank 1.
    res = evaluate_reid(q, [0, 1], [0, 0], g, [0, 1], [1, 1])
    assert res.num_skipped == 0 and res.first_match_rank.tolist() == [1, 1]


def test_zero_based_identities_score_as_one_based() -> None:
    # The same ranking with identities numbered from 0 and from 1: identical CMC and AP.
    q, qp, qc, g, gp, gc = _random_reid(5)
    qp0, gp0 = qp - 1, np.maximum(gp, 1) - 1  # 0-based: identity 0 in query and gallery
    zero = evaluate_reid(q, qp0, qc, g, gp0, gc)
    one = evaluate_reid(q, qp0 + 1, qc, g, gp0 + 1, gc)
    assert (qp0 == 0).any() and (gp0 == 0).any()
    np.testing.assert_array_equal(zero.first_match_rank, one.first_match_rank)
    np.testing.assert_array_equal(zero.cmc, one.cmc)
    assert zero.mAP == one.mAP and zero.num_skipped == one.num_skipped
    assert zero.ap[qp0 == 0].size and not np.isnan(zero.ap[qp0 == 0]).all()
    cmc0, map0 = cmc_map(q, qp0, qc, g, gp0, gc)
    cmc1, map1 = cmc_map(q, qp0 + 1, qc, g, gp0 + 1, gc)
    np.testing.assert_array_equal(cmc0, cmc1)
    assert map0 == map1


def test_same_identity_same_camera_is_removed() -> None:
    # Ranked: same pid + same camera (removed), other identity, match in another camera.
    res = _one_query([5, 10, 20], [1, 3, 1], [0, 2, 2])
    assert res.first_match_rank[0] == 2 and res.num_matches[0] == 1
    assert res.ap[0] == pytest.approx(0.5)


def test_two_matches_both_ap_definitions() -> None:
    # Matches at ranks 1 and 3 of 2: standard (1/1 + 2/3)/2; trapezoid
    # ((1 + 1)/2 + (1/2 + 2/3)/2) / 2 with P(0) = 1.
    angles, pids, cams = [5, 10, 20, 30], [1, 2, 1, 2], [1, 1, 1, 1]
    assert _one_query(angles, pids, cams).mAP == pytest.approx((1 + 2 / 3) / 2)
    assert _one_query(angles, pids, cams, ap="market").mAP == pytest.approx(
        (1.0 + (0.5 + 2 / 3) / 2) / 2
    )


def test_query_without_valid_match_is_skipped_and_reported() -> None:
    q = _unit([0, 90])
    g = _unit([5, 88, 95])
    # Query 0 (pid 7) has only a same-camera item of its own identity: no valid match.
    args = (q, [7, 2], [0, 0], g, [7, 2, 3], [0, 1, 1])
    res = evaluate_reid(*args)
    assert res.num_skipped == 1 and res.first_match_rank[0] == 0
    assert res.mAP == pytest.approx(1.0) and res.cmc[0] == 1.0
    with pytest.warns(UserWarning, match="1 of 2 queries have no true match"):
        cmc, m = cmc_map(*args, max_rank=3)
    assert cmc.shape == (3,) and m == pytest.approx(1.0)
    assert reid_metrics(*args)["num_skipped_queries"] == 1
    with pytest.raises(DataError, match="none of the 1 queries"):
        evaluate_reid(q[:1], [7], [0], g, [7, 2, 3], [0, 1, 1])


def test_no_warning_when_nothing_is_skipped() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmc_map(_unit([0]), [1], [0], _unit([5, 10]), [2, 1], [1, 1])


def test_ties_are_broken_against_the_query() -> None:
    # Constant features: every gallery item ties; the match ranks after both negatives.
    res = evaluate_reid(np.ones((1, 4)), [1], [0], np.ones((3, 4)), [2, 1, 3], [1, 1, 1])
    assert res.first_match_rank[0] == 3 and res.ap[0] == pytest.approx(1 / 3)


def _matlab_style_reference(q, qp, qc, g, gp, gc, max_rank, junk=(-1,), distractors=(0,)):
    """Per-query loop in float64 following the official Market-1501/MARS MATLAB evaluation."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    dist = 1.0 - qn @ gn.T
    cmcs, ap_std, ap_mkt, skipped = [], [], [], 0
    for i in range(len(q)):
        good = {
            j
            for j in range(len(g))
            if gp[j] == qp[i] and gc[j] != qc[i] and gp[j] not in junk and gp[j] not in distractors
        }
        junk_set = {
            j for j in range(len(g)) if gp[j] in junk or (gp[j] == qp[i] and gc[j] == qc[i])
        }
        if not good:
            skipped += 1
            continue
        order = sorted(range(len(g)), key=lambda j, i=i: dist[i, j])
        cmc = [0.0] * max_rank
        old_recall, old_precision, ap_m, hits, j_valid, n_junk, found = 0.0, 1.0, 0.0, 0, 0, 0, 0
        ap_s = 0.0
        for n, idx in enumerate(order):
            flag = idx in good
            if flag:
                for r in range(n - n_junk, max_rank):
                    cmc[r] = 1.0
                found += 1
            if idx in junk_set:
                n_junk += 1
                continue
            if flag:
                hits += 1
                ap_s += hits / (j_valid + 1)
            recall = hits / len(good)
            precision = hits / (j_valid + 1)
            ap_m += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j_valid += 1
            if found == len(good):
                break
        cmcs.append(cmc)
        ap_std.append(ap_s / len(good))
        ap_mkt.append(ap_m)
    return np.mean(cmcs, 0), float(np.mean(ap_std)), float(np.mean(ap_mkt)), skipped


def _random_reid(seed: int, nq: int = 40, ng: int = 260, d: int = 12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, d))
    qp = rng.integers(1, 12, nq)
    gp = rng.integers(-1, 12, ng)  # includes junk (-1) and distractors (0)
    q = centers[qp] + rng.normal(scale=1.2, size=(nq, d))
    g = centers[np.abs(gp)] + rng.normal(scale=1.2, size=(ng, d))
    qc, gc = rng.integers(0, 4, nq), rng.integers(0, 4, ng)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    gaps = np.diff(np.sort(qn @ gn.T, axis=1), axis=1)
    assert gaps.min() > 1e-6, "test data must be free of (float32) ties"
    return q, qp, qc, g, gp, gc


@pytest.mark.parametrize("seed", [0, 5])
def test_against_matlab_style_loop_on_random_data(seed: int) -> None:
    q, qp, qc, g, gp, gc = _random_reid(seed)
    ref_cmc, ref_std, ref_mkt, ref_skipped = _matlab_style_reference(q, qp, qc, g, gp, gc, 20)
    # Small chunks so several chunk boundaries are crossed.
    std = evaluate_reid(q, qp, qc, g, gp, gc, chunk_size=7, **MARS)
    mkt = evaluate_reid(q, qp, qc, g, gp, gc, ap="market", chunk_size=7, **MARS)
    np.testing.assert_allclose(std.cmc, ref_cmc, atol=1e-12)
    assert std.mAP == pytest.approx(ref_std, abs=1e-9)
    assert mkt.mAP == pytest.approx(ref_mkt, abs=1e-9)
    assert std.num_skipped == ref_skipped
    cmc, m = cmc_map(torch.from_numpy(q), qp, qc, torch.from_numpy(g), gp, gc, **MARS)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-12)
    assert m == pytest.approx(ref_std, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 5])
def test_every_identity_real_by_default_against_the_loop(seed: int) -> None:
    q, qp, qc, g, gp, gc = _random_reid(seed)
    ref_cmc, ref_std, _, ref_skipped = _matlab_style_reference(
        q, qp, qc, g, gp, gc, 20, junk=(), distractors=()
    )
    res = evaluate_reid(q, qp, qc, g, gp, gc, chunk_size=7)
    np.testing.assert_allclose(res.cmc, ref_cmc, atol=1e-12)
    assert res.mAP == pytest.approx(ref_std, abs=1e-9) and res.num_skipped == ref_skipped


def test_distance_matrix_entry_point_and_metrics_dict() -> None:
    q, qp, qc, g, gp, gc = _random_reid(5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    from_dist = evaluate_reid_distmat(2 - 2 * qn @ gn.T, qp, qc, gp, gc)
    from_feat = evaluate_reid(q, qp, qc, g, gp, gc)
    np.testing.assert_array_equal(from_dist.first_match_rank, from_feat.first_match_rank)
    assert from_dist.mAP == pytest.approx(from_feat.mAP, abs=1e-12)
    m = reid_metrics(q, qp, qc, g, gp, gc)
    assert set(m) == {"cmc@1", "cmc@5", "cmc@10", "cmc@20", "mAP", "num_skipped_queries"}
    assert m["cmc@1"] == pytest.approx(from_feat.cmc[0]) and m["cmc@20"] == from_feat.cmc[19]


def test_bad_inputs_are_clear() -> None:
    q, g = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="query_pids has 1 entries"):
        evaluate_reid(q, [1], [0, 0], g, [1, 2, 3, 4], [0, 0, 0, 0])
    with pytest.raises(ConfigError, match="unknown AP definition"):
        evaluate_reid(q, [1, 2], [0, 0], g, [1, 2, 3, 4], [1, 1, 1, 1], ap="interpolated")
    with pytest.raises(ValueError, match="dim"):
        evaluate_reid(q, [1, 2], [0, 0], np.ones((4, 5)), [1, 2, 3, 4], [1, 1, 1, 1])
