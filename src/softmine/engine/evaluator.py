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

With a validation split (held-out training classes, :mod:`softmine.data.splits`) every
evaluation also scores it, by leave-one-out retrieval (or re-ID query/gallery for re-ID
sets), and reports those metrics as ``val/<metric>`` beside the test ones.

Scoring is separate from embedding: :meth:`Evaluator.embed_test` gives the arrays
(the ``.npz`` layout ``softmine-eval`` reads) and :func:`score_arrays` turns arrays into
metrics with the run's protocol, so cross-validation can score concatenated embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from softmine.config import build
from softmine.data.splits import ValidationSplit
from softmine.engine.distributed import DistEnv, gather_shards, shard
from softmine.engine.embed import extract_embeddings, extract_reid_embeddings
from softmine.engine.eval_history import metric_names
from softmine.errors import ConfigError
from softmine.evaluation import (
    mirror_confusion,
    query_gallery_metrics,
    reid_metrics,
    retrieval_metrics,
)

EVAL_PROTOCOLS = ("retrieval", "query_gallery", "reid")
VAL_PREFIX = "val/"
RETRIEVAL_ARRAYS = ("embeddings", "labels")
REID_ARRAYS = ("query", "query_pids", "query_camids", "gallery", "gallery_pids", "gallery_camids")


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


def eval_protocol(dataset_cfg: DictConfig) -> str:
    """``dataset.eval_protocol``, or ``retrieval`` when the config has a ``test`` node, else ``reid``."""
    default = "retrieval" if "test" in dataset_cfg else "reid"
    protocol = str(dataset_cfg.get("eval_protocol") or default)
    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError(
            f"dataset.eval_protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}"
        )
    return protocol


def reid_variants(cfg: DictConfig, protocol: str) -> dict[str, dict]:
    """``evaluation.reid_variants``: name -> {junk_pids, distractor_pids, ap} (re-ID only)."""
    raw = cfg.evaluation.get("reid_variants") or {}
    if raw and protocol != "reid":
        raise ConfigError(
            "evaluation.reid_variants applies to re-ID evaluation (query/gallery with "
            f"cameras); this dataset's protocol is {protocol}"
        )
    junk, distractors = _id_list(cfg.dataset, "junk_pids"), _id_list(cfg.dataset, "distractor_pids")
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
            "junk_pids": _id_list(opts, "junk_pids") if "junk_pids" in opts else junk,
            "distractor_pids": _id_list(opts, "distractor_pids")
            if "distractor_pids" in opts
            else distractors,
            "ap": str(opts.get("ap", cfg.evaluation.ap)),
        }
    return out


def mirror_metrics(dataset: object, embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``mirror_confusion`` of a retrieval split whose classes have mirrors (``digits_pairs``:
    the dataset's ``mirror_labels``), else nothing."""
    mirror = getattr(dataset, "mirror_labels", None)
    if mirror is None:
        return {}
    return {"mirror_confusion": mirror_confusion(embeddings, labels, mirror(labels))}


def score_arrays(arrays: dict[str, np.ndarray], cfg: DictConfig) -> dict[str, float]:
    """The test metrics of embedding arrays under the run's protocol and evaluation options.

    ``arrays`` holds ``embeddings`` and ``labels`` (retrieval), or ``query``,
    ``query_pids``, ``query_camids``, ``gallery``, ``gallery_pids``, ``gallery_camids``
    (query_gallery and re-ID; the camera ids are unused by query_gallery).
    """
    ecfg = cfg.evaluation
    protocol = eval_protocol(cfg.dataset)
    if protocol == "retrieval":
        return retrieval_metrics(arrays["embeddings"], arrays["labels"], ecfg.ks)
    q, q_pids, q_cams, g, g_pids, g_cams = (arrays[k] for k in REID_ARRAYS)
    if protocol == "query_gallery":
        return query_gallery_metrics(q, q_pids, g, g_pids, ecfg.ks)
    opts = {"ranks": tuple(ecfg.ranks), "rerank": bool(ecfg.rerank)}
    out = reid_metrics(
        q,
        q_pids,
        q_cams,
        g,
        g_pids,
        g_cams,
        **opts,
        ap=str(ecfg.ap),
        junk_pids=_id_list(cfg.dataset, "junk_pids"),
        distractor_pids=_id_list(cfg.dataset, "distractor_pids"),
    )
    for name, variant in reid_variants(cfg, protocol).items():
        extra = reid_metrics(q, q_pids, q_cams, g, g_pids, g_cams, **opts, **variant)
        out.update({f"{name}/{k}": v for k, v in extra.items()})
    return out


class Evaluator:
    """Builds the evaluation split(s) of ``cfg.dataset`` once; :meth:`evaluate` scores a model.

    ``embeddings`` keeps the (embeddings, labels) of the last retrieval evaluation,
    so the end-of-run plots need not embed the test set a second time.

    Args:
        cfg: the full run config (``dataset``, ``evaluation``, ``trainer.eval_batch_size``).
        device: where the model runs.
        num_workers: DataLoader worker processes for embedding.
        dist: this process's place in a distributed job.
        validation: held-out training classes, scored too (``val/<metric>``); None: none.
        test: build and score the test split (``evaluation.test``); False: the
            validation split alone, and the test split is never even read (tuning).
    """

    def __init__(
        self,
        cfg: DictConfig,
        device: torch.device,
        num_workers: int = 0,
        dist: DistEnv | None = None,
        validation: ValidationSplit | None = None,
        test: bool = True,
    ) -> None:
        self.cfg, self.device, self.num_workers = cfg, device, num_workers
        self.dist = dist or DistEnv()
        self.validation = validation
        self.has_test = bool(test)
        if not self.has_test and validation is None:
            raise ConfigError(
                "evaluation.test=false scores no test split, so it needs held-out training "
                "classes to score: set dataset.val_classes=N or dataset.folds=K"
            )
        self.last_test_arrays: dict[str, np.ndarray] = {}
        self.embeddings: tuple[np.ndarray, np.ndarray] | None = None
        d = cfg.dataset
        self.protocol = eval_protocol(d)
        needed = ("test",) if self.protocol == "retrieval" else ("query", "gallery")
        absent = [n for n in needed if n not in d]
        if absent:
            raise ConfigError(
                f"dataset.eval_protocol={self.protocol} needs the dataset config node(s) "
                f"{absent}; use a `test` node for retrieval, `query` and `gallery` for "
                "query_gallery or reid"
            )
        reid_variants(cfg, self.protocol)  # a bad variant fails here, before training
        if not self.has_test:
            return
        if self.protocol == "retrieval":
            self.test_set = build(d.test, "dataset.test")
        else:
            self.query_set = build(d.query, "dataset.query")
            self.gallery_set = build(d.gallery, "dataset.gallery")

    def metric_names(self, test: bool = True) -> list[str]:
        """Names of the metrics every :meth:`evaluate` returns (what ``trainer.monitor`` may
        name); ``test=False``: those of the validation split alone."""
        e = self.cfg.evaluation
        names: list[str] = []
        if test and self.has_test:
            names = metric_names(self.protocol, e.ks, e.ranks)
            names += [f"{v}/{n}" for v in reid_variants(self.cfg, self.protocol) for n in names]
        if self.validation is not None:
            val = metric_names(self.validation.protocol, e.ks, e.ranks)
            names += [VAL_PREFIX + n for n in val]
        return names

    def _embed(self, model: torch.nn.Module, dataset) -> tuple[np.ndarray, np.ndarray]:
        emb, labels = extract_embeddings(
            model,
            shard(dataset, self.dist),
            device=self.device,
            batch_size=int(self.cfg.trainer.eval_batch_size),
            num_workers=self.num_workers,
        )
        return gather_shards((emb, labels), len(dataset), self.dist)

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

    def embed_test(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The test split's embedding arrays (see :func:`score_arrays` for the keys)."""
        if self.protocol == "retrieval":
            return dict(zip(RETRIEVAL_ARRAYS, self._embed(model, self.test_set), strict=True))
        query = self._reid_embeddings(model, self.query_set)
        gallery = self._reid_embeddings(model, self.gallery_set)
        return dict(zip(REID_ARRAYS, (*query, *gallery), strict=True))

    def evaluate_validation(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of the held-out training classes, named ``val/<metric>`` (empty without them)."""
        val = self.validation
        if val is None:
            return {}
        ecfg = self.cfg.evaluation
        if val.test is not None:
            out = retrieval_metrics(*self._embed(model, val.test), ecfg.ks)
        else:  # every identity of the training split is real: no junk, no distractors
            out = reid_metrics(
                *self._reid_embeddings(model, val.query),
                *self._reid_embeddings(model, val.gallery),
                ranks=tuple(ecfg.ranks),
                rerank=bool(ecfg.rerank),
                ap=str(ecfg.ap),
                junk_pids=(),
                distractor_pids=(),
            )
        return {VAL_PREFIX + k: v for k, v in out.items()}

    def evaluate(self, model: torch.nn.Module, test: bool = True) -> dict[str, float]:
        """The flat metrics dict of ``model``: ``recall@K``, ``map@r``, ... or ``cmc@R``, ``mAP``
        (and ``mirror_confusion`` on a set with mirrored classes), then ``val/<metric>`` with a
        validation split. ``test=False`` (or an evaluator built without the test split): the
        validation metrics alone. The test embedding arrays stay in :attr:`last_test_arrays`
        (retrieval: also :attr:`embeddings`) until the next call that scores the test split."""
        out: dict[str, float] = {}
        if test and self.has_test:
            arrays = self.embed_test(model)
            self.last_test_arrays = arrays
            out = score_arrays(arrays, self.cfg)
            if self.protocol == "retrieval":
                self.embeddings = (arrays["embeddings"], arrays["labels"])
                out.update(mirror_metrics(self.test_set, *self.embeddings))
        return {**out, **self.evaluate_validation(model)}
