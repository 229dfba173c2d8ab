"""Evaluation benchmarks, each against a baseline measured in the same run.

1. Recall@{1,2,4,8} (leave-one-out) on 50,000 x 128 embeddings vs the floor: a bare
   faiss ``IndexFlatIP`` holding the same (already normalised) data, searched once for
   k = 9 (8 neighbours + the query itself). Targets: time <= 1.25x, peak memory <= 2x.
2. ``cmc_map`` at MARS size (1,980 queries x 11,310 gallery, d = 1,024) vs a per-query
   Python loop in the style of torchreid's ``eval_market1501`` (written here, extended to
   drop MARS junk pid -1) on the same features. Targets: < 3 s, >= 15x faster.

Peak memory is the growth of the process's peak resident set (VmHWM in
/proc/self/status) over its resident set just before the measured call, after
resetting the peak with ``/proc/self/clear_refs``: it counts every allocation,
numpy's, faiss's C++ index and BLAS scratch alike, which tracemalloc would miss.
glibc's malloc is first told to serve every block over 128 KiB by mmap and to
return freed memory at once (``mallopt``), so memory freed by one measurement
cannot be silently reused by the next and hide its peak. The measured calls take
turns trial by trial (``--trials`` of each; a call shorter than a second is repeated
within its trial until the trial lasts one), and each prints the best and the median
of its trials. faiss runs single-threaded by default (``--threads``), for the
floor and for us alike: on a shared CPU its OpenMP threads wait on each other
whenever one is descheduled, which makes multi-threaded timings swing by 2x from
run to run, while single-threaded ones repeat to within a few percent. With one
thread (faiss's and the BLAS's) the trials are timed by the process's CPU time,
which other jobs on the machine do not lengthen; with more, by the wall clock.

Run: ``python scripts/bench/eval.py`` (about 5 minutes on 2 CPU cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from _timing import MIN_TRIAL_S, Summary, fixed_malloc, headline, interleave, run_for
from threadpoolctl import threadpool_limits

from softmine.evaluation import cmc_map, evaluate_reid, recall_at_k

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {_STATUS}")


CLOCK: list[Callable[[], float]] = [time.perf_counter]  # main() picks CPU time for one thread


def measure(fn: Callable[[], object], min_s: float = MIN_TRIAL_S) -> tuple[float, float, object]:
    """(seconds per call, peak memory growth in MiB, result) of ``fn``, called for >= ``min_s``
    seconds of :data:`CLOCK`."""
    out: list[object] = []

    def call() -> None:
        out.clear()  # the last result is freed before the next call, so it adds no peak
        out.append(fn())

    _CLEAR_REFS.write_text("5")  # reset VmHWM to the current resident set
    before = _kib("VmRSS")
    trial = run_for(call, min_s, clock=CLOCK[0])
    return trial.per_unit, (_kib("VmHWM") - before) / 1024, out[0]


def bench_recall(n: int, d: int, trials: int) -> bool:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n // 50, n)
    centers = rng.normal(size=(n // 50, d))
    x = (centers[labels] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    xn = x.copy()
    faiss.normalize_L2(xn)

    def floor() -> np.ndarray:
        index = faiss.IndexFlatIP(d)
        index.add(xn)
        return index.search(xn, 9)[1]

    def ours() -> dict[int, float]:
        return recall_at_k(x, labels, (1, 2, 4, 8))

    runs = interleave(
        {"floor": lambda: measure(floor), "ours": lambda: measure(ours)}, trials, warmup=False
    )
    ft, ot = (Summary.of([r[0] for r in runs[k]], False) for k in ("floor", "ours"))
    fm = Summary.of([r[1] for r in runs["floor"]], False)  # memory: the floor's least ...
    om = Summary.of([r[1] for r in runs["ours"]], True)  # ... against our most
    rec = runs["ours"][-1][2]
    time_ratio, mem_ratio = ot / ft, om / fm
    ok = time_ratio.best <= 1.25 and mem_ratio.best <= 2.0
    print(f"Recall@K on {n:,} x {d} (leave-one-out, {trials} interleaved trials):")
    print(f"  recalls              {', '.join(f'R@{k}={v:.4f}' for k, v in rec.items())}")
    print(f"  {'':20} {'time (s)':>17}   {'peak growth (MiB)':>19}")
    print(f"  {'':20} {'best':>8} {'median':>8}   {'best':>9} {'median':>9}")
    for label, t, m in (("floor (IndexFlatIP)", ft, fm), ("recall_at_k", ot, om)):
        print(f"  {label:<20} {t.best:8.2f} {t.median:8.2f}   {m.best:9.1f} {m.median:9.1f}")
    print(headline("  recall: time ratio", time_ratio, ".3f") + ", target <= 1.25")
    print(headline("  recall: memory ratio", mem_ratio, ".3f") + ", target <= 2")
    return ok


def mars_like(seed: int, clustered: bool) -> tuple[np.ndarray, ...]:
    """MARS-sized query/gallery features: 625 identities, 6 cameras, junk (-1) and distractors (0)."""
    rng = np.random.default_rng(seed)
    nq, ng, d, ids = 1980, 11310, 1024, 625
    qp = rng.integers(1, ids + 1, nq)
    gp = rng.integers(1, ids + 1, ng)
    gp[rng.random(ng) < 0.10] = -1  # junk
    gp[rng.random(ng) < 0.05] = 0  # distractors
    qc, gc = rng.integers(1, 7, nq), rng.integers(1, 7, ng)
    if clustered:  # a trained-looking embedding: identity centres plus noise
        centers = rng.normal(size=(ids + 2, d)).astype(np.float32)
        q = centers[qp + 1] + 3.0 * rng.normal(size=(nq, d)).astype(np.float32)
        g = centers[gp + 1] + 3.0 * rng.normal(size=(ng, d)).astype(np.float32)
    else:  # features of an untrained network: no structure at all
        q = rng.normal(size=(nq, d)).astype(np.float32)
        g = rng.normal(size=(ng, d)).astype(np.float32)
    return q, qp, qc, g, gp, gc


def torchreid_style_loop(q, qp, qc, g, gp, gc, max_rank: int = 20) -> tuple[np.ndarray, float]:
    """Per-query loop in the style of torchreid's eval_market1501, plus MARS junk (pid -1) removal."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    distmat = 1.0 - qn @ gn.T
    indices = np.argsort(distmat, axis=1)
    matches = (gp[indices] == qp[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    for i in range(len(qp)):
        order = indices[i]
        remove = ((gp[order] == qp[i]) & (gc[order] == qc[i])) | (gp[order] == -1)
        raw_cmc = matches[i][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (j + 1.0) for j, x in enumerate(tmp_cmc)]
        all_ap.append((np.asarray(tmp_cmc) * raw_cmc).sum() / num_rel)
    return np.asarray(all_cmc, dtype=np.float32).mean(0), float(np.mean(all_ap))


MARS_IDS = {"junk_pids": (-1,), "distractor_pids": (0,)}  # MARS's junk and distractor identities


def bench_cmc_map(trials: int, rerank: bool) -> bool:
    data = mars_like(0, clustered=True)
    worst = mars_like(1, clustered=False)
    runs = interleave(
        {
            "loop": lambda: measure(lambda: torchreid_style_loop(*data)),
            "ours": lambda: measure(lambda: cmc_map(*data, **MARS_IDS)),
            "worst": lambda: measure(lambda: cmc_map(*worst, **MARS_IDS)),
        },
        trials,
        warmup=False,  # a loop trial takes half a minute; the first trials warm up alike
    )
    t_loop, ot, t_worst = (Summary.of([r[0] for r in runs[k]], False) for k in runs)
    cmc, m = runs["ours"][-1][2]
    cmc_loop, m_loop = runs["loop"][-1][2]
    speedup = t_loop / ot
    ok = ot.best < 3.0 and speedup.best >= 15.0
    print(
        f"cmc_map at MARS size (1,980 x 11,310, d = 1,024; 10% junk, 5% distractors; {trials} trials):"
    )
    print(f"  {'':20} {'time (s)':>17}")
    print(f"  {'':20} {'best':>8} {'median':>8}")
    print(f"  {'cmc_map':<20} {ot.best:8.2f} {ot.median:8.2f}   rank-1 {cmc[0]:.4f}  mAP {m:.4f}")
    print(
        f"  {'torchreid-style loop':<20} {t_loop.best:8.2f} {t_loop.median:8.2f}"
        f"   rank-1 {cmc_loop[0]:.4f}  mAP {m_loop:.4f}"
    )
    print(
        f"  agreement |d mAP| {abs(m - m_loop):.1e}  max |d CMC| {np.abs(cmc - cmc_loop).max():.1e}"
    )
    print(f"  unstructured features (worst case for cmc_map): {t_worst.format('.2f')} s")
    if rerank:
        t, mem, res = measure(lambda: evaluate_reid(*data, rerank=True, **MARS_IDS), 0.0)
        print(f"  with k-reciprocal re-ranking: {t:.1f} s, peak +{mem:.0f} MiB, mAP {res.mAP:.4f}")
    print(f"  cmc_map time {ot.format('.2f')} s (target < 3)")
    print(headline("  cmc_map: speed-up over the loop", speedup, ".1f") + ", target >= 15")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="items of the Recall@K benchmark")
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials of each")
    parser.add_argument(
        "--threads", type=int, default=1, help="faiss OpenMP threads (0: faiss's default)"
    )
    parser.add_argument("--rerank", action="store_true", help="also time re-ranking at MARS size")
    args = parser.parse_args()
    fixed_malloc()
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    one_thread = faiss.omp_get_max_threads() == 1
    CLOCK[0] = time.process_time if one_thread else time.perf_counter
    print(
        f"faiss threads: {faiss.omp_get_max_threads()}; timer: "
        f"{'process CPU time (BLAS on one thread too)' if one_thread else 'wall clock'}"
    )
    with threadpool_limits(limits=1 if one_thread else None, user_api="blas"):
        ok = bench_recall(args.n, 128, args.trials)
        ok &= bench_cmc_map(args.trials, args.rerank)
    print("targets met" if ok else "TARGETS MISSED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
