"""Evaluation: faiss k-NN search, retrieval metrics, mirror confusion, re-ID protocols, re-ranking.

Numpy and faiss only: running a model over a dataset (tracklet pooling included) is
:mod:`softmine.engine.embedding`.
"""

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
