"""Evaluate a model on a dataset config's test protocol: retrieval (``test``) or re-ID (``query`` + ``gallery``).

Shared by the trainer (every ``trainer.eval_every`` epochs and at the end) and
``softmine-eval`` (a finished run or checkpoint). Under torch.distributed each
rank embeds a shard and the features are gathered before the metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from softmine.config import build
from softmine.engine.distributed import DistEnv, gather_shards, shard
from softmine.engine.embed import extract_embeddings, extract_reid_embeddings
from softmine.errors import ConfigError
from softmine.evaluation import reid_metrics, retrieval_metrics


class Evaluator:
    """Builds the evaluation split(s) of ``cfg.dataset`` once; :meth:`evaluate` scores a model.

    ``embeddings`` keeps the (embeddings, labels) of the last retrieval evaluation,
    so the end-of-run plots need not embed the test set a second time.

    Args:
        cfg: the full run config (``dataset``, ``evaluation``, ``trainer.eval_batch_size``).
        device: where the model runs.
        num_workers: DataLoader worker processes for embedding.
        dist: this process's place in a distributed job.
    """

    def __init__(
        self,
        cfg: DictConfig,
        device: torch.device,
        num_workers: int = 0,
        dist: DistEnv | None = None,
    ) -> None:
        self.cfg, self.device, self.num_workers = cfg, device, num_workers
        self.dist = dist or DistEnv()
        self.embeddings: tuple[np.ndarray, np.ndarray] | None = None
        d = cfg.dataset
        if "test" in d:
            self.protocol = "retrieval"
            self.test_set = build(d.test, "dataset.test")
        elif "query" in d and "gallery" in d:
            self.protocol = "reid"
            self.query_set = build(d.query, "dataset.query")
            self.gallery_set = build(d.gallery, "dataset.gallery")
        else:
            raise ConfigError(
                "the dataset config needs a `test` node (retrieval) or `query` and `gallery` "
                "nodes (re-identification)"
            )

    def _reid_embeddings(self, model: torch.nn.Module, dataset) -> tuple[np.ndarray, ...]:
        parts = extract_reid_embeddings(
            model,
            shard(dataset, self.dist),
            device=self.device,
            frame_batch_size=int(self.cfg.evaluation.frame_batch_size),
            num_workers=self.num_workers,
        )
        return gather_shards(parts, len(dataset), self.dist)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The flat metrics dict of ``model``: ``recall@K``, ``map@r``, ... or ``cmc@R``, ``mAP``."""
        ecfg = self.cfg.evaluation
        if self.protocol == "reid":
            q, q_pids, q_cams = self._reid_embeddings(model, self.query_set)
            g, g_pids, g_cams = self._reid_embeddings(model, self.gallery_set)
            return reid_metrics(
                q,
                q_pids,
                q_cams,
                g,
                g_pids,
                g_cams,
                ranks=tuple(ecfg.ranks),
                ap=str(ecfg.ap),
                rerank=bool(ecfg.rerank),
            )
        emb, labels = extract_embeddings(
            model,
            shard(self.test_set, self.dist),
            device=self.device,
            batch_size=int(self.cfg.trainer.eval_batch_size),
            num_workers=self.num_workers,
        )
        emb, labels = gather_shards((emb, labels), len(self.test_set), self.dist)
        self.embeddings = (emb, labels)
        return retrieval_metrics(emb, labels, ecfg.ks)
