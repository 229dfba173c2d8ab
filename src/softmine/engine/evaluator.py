"""Evaluate a model on a dataset config's test protocol: retrieval, query/gallery retrieval or re-ID.

Shared by the trainer (every ``trainer.eval_every`` epochs and at the end) and
``softmine-eval`` (a finished run or checkpoint). Under torch.distributed each
rank embeds a shard and the features are gathered before the metrics.

``dataset.eval_protocol`` picks the protocol (when absent: ``retrieval`` if the config
has a ``test`` node, else ``reid``):

* ``retrieval``: leave-one-out Recall@K, MAP@R, R-Precision and NMI on ``test``
  (CUB, Cars196, SOP);
* ``query_gallery``: Recall@K, MAP@R and R-Precision of each ``query`` item against
  the ``gallery`` (In-Shop Clothes);
* ``reid``: CMC and mAP of ``query`` against ``gallery`` under the Market-1501/MARS
  rules, with the dataset's ``junk_pids`` (removed from the gallery) and
  ``distractor_pids`` (never a match); both default to none: every identity is real.

Query and gallery items are ``(input, id, camera)`` with the published ids, so the
two sides share one id space whatever each split's own training labels are.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from softmine.config import build
from softmine.engine.distributed import DistEnv, gather_shards, shard
from softmine.engine.embed import extract_embeddings, extract_reid_embeddings
from softmine.engine.eval_history import metric_names
from softmine.errors import ConfigError
from softmine.evaluation import query_gallery_metrics, reid_metrics, retrieval_metrics

EVAL_PROTOCOLS = ("retrieval", "query_gallery", "reid")


def _id_list(d: DictConfig, key: str) -> tuple[int, ...]:
    """``dataset.<key>`` as a tuple of ints (absent or null: none)."""
    value = d.get(key)
    if value is None:
        return ()
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"dataset.{key} must be a list of integer identities, e.g. [-1], got {value!r}"
        ) from None


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
        default = "retrieval" if "test" in d else "reid"
        self.protocol = str(d.get("eval_protocol") or default)
        if self.protocol not in EVAL_PROTOCOLS:
            raise ConfigError(
                f"dataset.eval_protocol must be one of {EVAL_PROTOCOLS}, got {self.protocol!r}"
            )
        needed = ("test",) if self.protocol == "retrieval" else ("query", "gallery")
        absent = [n for n in needed if n not in d]
        if absent:
            raise ConfigError(
                f"dataset.eval_protocol={self.protocol} needs the dataset config node(s) "
                f"{absent}; use a `test` node for retrieval, `query` and `gallery` for "
                "query_gallery or reid"
            )
        if self.protocol == "retrieval":
            self.test_set = build(d.test, "dataset.test")
        else:
            self.junk_pids = _id_list(d, "junk_pids")
            self.distractor_pids = _id_list(d, "distractor_pids")
            self.query_set = build(d.query, "dataset.query")
            self.gallery_set = build(d.gallery, "dataset.gallery")

    def metric_names(self) -> list[str]:
        """Names of the metrics :meth:`evaluate` returns (what ``trainer.monitor`` may name)."""
        e = self.cfg.evaluation
        names = metric_names(self.protocol, e.ks, e.ranks)
        return names + [f"{v}/{n}" for v in self._variants() for n in names]

    def _variants(self) -> dict[str, dict]:
        """``evaluation.reid_variants``: name -> {junk_pids, distractor_pids, ap} (re-ID only)."""
        raw = self.cfg.evaluation.get("reid_variants") or {}
        if raw and self.protocol != "reid":
            raise ConfigError(
                "evaluation.reid_variants applies to re-ID evaluation (query/gallery with "
                f"cameras); this dataset's protocol is {self.protocol}"
            )
        out = {}
        for name, opts in raw.items():
            if opts is None:  # `name: null` switches off a variant an experiment inherited
                continue
            opts = dict(opts)
            unknown = set(opts) - {"junk_pids", "distractor_pids", "ap"}
            if unknown:
                raise ConfigError(
                    f"evaluation.reid_variants.{name} takes junk_pids, distractor_pids and ap "
                    f"(got {sorted(unknown)})"
                )
            out[str(name)] = {
                "junk_pids": _id_list(opts, "junk_pids") if "junk_pids" in opts else self.junk_pids,
                "distractor_pids": _id_list(opts, "distractor_pids")
                if "distractor_pids" in opts
                else self.distractor_pids,
                "ap": str(opts.get("ap", self.cfg.evaluation.ap)),
            }
        return out

    def _reid_embeddings(self, model: torch.nn.Module, dataset) -> tuple[np.ndarray, ...]:
        parts = extract_reid_embeddings(
            model,
            shard(dataset, self.dist),
            device=self.device,
            frame_batch_size=int(self.cfg.evaluation.frame_batch_size),
            num_workers=self.num_workers,
            batch_size=int(self.cfg.trainer.eval_batch_size),
        )
        return gather_shards(parts, len(dataset), self.dist)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The flat metrics dict of ``model``: ``recall@K``, ``map@r``, ... or ``cmc@R``, ``mAP``."""
        ecfg = self.cfg.evaluation
        if self.protocol != "retrieval":
            q, q_pids, q_cams = self._reid_embeddings(model, self.query_set)
            g, g_pids, g_cams = self._reid_embeddings(model, self.gallery_set)
            if self.protocol == "query_gallery":
                return query_gallery_metrics(q, q_pids, g, g_pids, ecfg.ks)
            arrays = (q, q_pids, q_cams, g, g_pids, g_cams)
            opts = {"ranks": tuple(ecfg.ranks), "rerank": bool(ecfg.rerank)}
            out = reid_metrics(
                *arrays,
                **opts,
                ap=str(ecfg.ap),
                junk_pids=self.junk_pids,
                distractor_pids=self.distractor_pids,
            )
            for name, variant in self._variants().items():
                extra = reid_metrics(*arrays, **opts, **variant)
                out.update({f"{name}/{k}": v for k, v in extra.items()})
            return out
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
