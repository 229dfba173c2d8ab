"""Evaluation: faiss k-NN search, retrieval metrics, mirror confusion, re-ID protocols, re-ranking.

Numpy and faiss only: running a model over a dataset (tracklet pooling included) is
:mod:`softmine.engine.embedding`. The names below load their module on first use, so that
importing the light :mod:`softmine.evaluation.metric_names` (reports, plots) does not load faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softmine.evaluation.confusion import mirror_confusion, partner_confusion
    from softmine.evaluation.knn import faiss_gpu_available, iter_knn, knn_search
    from softmine.evaluation.reid import (
        ReIDResult,
        cmc_map,
        evaluate_reid,
        evaluate_reid_distmat,
        reid_metrics,
    )
    from softmine.evaluation.rerank import k_reciprocal_distances
    from softmine.evaluation.retrieval import (
        average_precision_at_r,
        map_at_r,
        nmi,
        query_gallery_metrics,
        r_precision,
        ranking_metrics,
        recall_at_k,
        retrieval_metrics,
    )

#: Each public name -> the module that defines it.
_HOMES = {
    "mirror_confusion": "confusion",
    "partner_confusion": "confusion",
    "faiss_gpu_available": "knn",
    "iter_knn": "knn",
    "knn_search": "knn",
    "ReIDResult": "reid",
    "cmc_map": "reid",
    "evaluate_reid": "reid",
    "evaluate_reid_distmat": "reid",
    "reid_metrics": "reid",
    "k_reciprocal_distances": "rerank",
    "average_precision_at_r": "retrieval",
    "map_at_r": "retrieval",
    "nmi": "retrieval",
    "query_gallery_metrics": "retrieval",
    "r_precision": "retrieval",
    "ranking_metrics": "retrieval",
    "recall_at_k": "retrieval",
    "retrieval_metrics": "retrieval",
}

__all__ = [
    "ReIDResult",
    "average_precision_at_r",
    "cmc_map",
    "evaluate_reid",
    "evaluate_reid_distmat",
    "faiss_gpu_available",
    "iter_knn",
    "k_reciprocal_distances",
    "knn_search",
    "map_at_r",
    "mirror_confusion",
    "nmi",
    "partner_confusion",
    "query_gallery_metrics",
    "r_precision",
    "ranking_metrics",
    "recall_at_k",
    "reid_metrics",
    "retrieval_metrics",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
