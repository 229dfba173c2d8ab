"""Evaluation: faiss k-NN search and retrieval metrics."""

from softmine.evaluation.knn import knn_search
from softmine.evaluation.retrieval import map_at_r, nmi, recall_at_k, retrieval_metrics

__all__ = ["knn_search", "map_at_r", "nmi", "recall_at_k", "retrieval_metrics"]
