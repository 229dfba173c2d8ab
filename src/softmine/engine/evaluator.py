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
  ``evaluation.reid_variants`` adds the same figures under other rules (``<name>/*``),
  and ``evaluation.rerank`` the k-reciprocal re-ranked figures of all of them beside
  the plain ones (``rerank/*``).

Query and gallery items are ``(input, id, camera)`` with the published ids, so the
two sides share one id space whatever each split's own training labels are.

With a validation split (held-out training classes, :mod:`softmine.data.splits`) every
evaluation also scores it, by leave-one-out retrieval (or re-ID query/gallery for re-ID
sets), and reports those metrics as ``val/<metric>`` beside the test ones.

Unreadable images under ``data.on_bad_image=skip``: an evaluation item whose image cannot be
read is left out, from queries and gallery alike, never scored through a stand-in (another
image of its class would find its twin at distance 0 and inflate Recall@1). The trainer
finds the bad files of every split before training (:meth:`Evaluator.check_files`); a file
that passes that header check but does not decode is found while a split is embedded, and
its item leaves that evaluation and every later one. :meth:`Evaluator.dropped_counts` gives
the number left out per split (``dropped_items/<split>`` in ``metrics.json``).

Scoring is separate from embedding: :meth:`Evaluator.embed_test` gives the arrays
(the ``.npz`` layout ``softmine-eval`` reads) and :func:`score_embeddings` turns arrays
into metrics under a :class:`Scoring` (a protocol and its options). Every score goes
through it: the test and validation splits during training, cross-validation's
concatenated embeddings (:func:`score_arrays`, the run's own :class:`Scoring`) and
``softmine-eval`` on an embeddings file (the :class:`Scoring` of its flags).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from softmine.data.build import build_split
from softmine.data.file_check import (
    base_dataset,
    check_files,
    collect_unreadable,
    item_files,
    keep_items,
    known_bad,
    unreadable_items,
)
from softmine.data.images import ImageDataset
from softmine.data.splits import ValidationSplit
from softmine.engine.distributed import DistEnv, gather_shards, shard
from softmine.engine.embedding import extract_embeddings, extract_reid_embeddings
from softmine.engine.eval_history import metric_names
from softmine.errors import ConfigError
from softmine.evaluation import (
    evaluate_reid_distmat,
    k_reciprocal_distances,
    mirror_confusion,
    query_gallery_metrics,
    reid_metrics,
    retrieval_metrics,
)
from softmine.evaluation.metric_names import DROPPED_PREFIX, RERANK_PREFIX, VAL_PREFIX

log = logging.getLogger(__name__)

EVAL_PROTOCOLS = ("retrieval", "query_gallery", "reid")
#: Zhong et al.'s (CVPR 2017) re-ranking settings, the defaults of evaluation.rerank_*.
RERANK_DEFAULTS = {"k1": 20, "k2": 6, "lambda_value": 0.3}
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


def rerank_options(ecfg: DictConfig) -> dict[str, Any] | None:
    """``evaluation.rerank_k1``, ``rerank_k2``, ``rerank_lambda``, ``rerank_expansion`` as keyword arguments of
    :func:`~softmine.evaluation.k_reciprocal_distances`; None when ``evaluation.rerank`` is off.

    A config saved before these keys existed gets Zhong et al.'s values (20, 6, 0.3).
    """
    if not bool(ecfg.get("rerank", False)):
        return None
    d = RERANK_DEFAULTS
    return {
        "k1": int(ecfg.get("rerank_k1", d["k1"])),
        "k2": int(ecfg.get("rerank_k2", d["k2"])),
        "lambda_value": float(ecfg.get("rerank_lambda", d["lambda_value"])),
        "expansion": str(ecfg.get("rerank_expansion", "zhong")),
    }


def reid_scores(
    arrays: dict[str, np.ndarray],
    *,
    ranks: tuple[int, ...],
    rules: dict[str, dict],
    rerank: dict[str, float] | None = None,
) -> dict[str, float]:
    """Re-ID metrics of the ``REID_ARRAYS`` under each rule, plain and (``rerank``) re-ranked.

    ``rules`` maps a prefix (``""`` for the main protocol, ``"<variant>/"``) to its
    ``{ap, junk_pids, distractor_pids}``. The plain metrics come first; with ``rerank``
    (keyword arguments of :func:`~softmine.evaluation.k_reciprocal_distances`) the
    re-ranked distances are computed once and every rule's metrics on them follow as
    ``rerank/<prefix><metric>``, beside the plain ones rather than instead of them.
    """
    q, q_pids, q_cams, g, g_pids, g_cams = (arrays[k] for k in REID_ARRAYS)
    out: dict[str, float] = {}
    for prefix, rule in rules.items():
        m = reid_metrics(q, q_pids, q_cams, g, g_pids, g_cams, ranks=ranks, **rule)
        out.update({prefix + k: v for k, v in m.items()})
    if rerank is not None:
        dist = k_reciprocal_distances(q, g, **rerank)
        for prefix, rule in rules.items():
            res = evaluate_reid_distmat(
                dist, q_pids, q_cams, g_pids, g_cams, max_rank=max(ranks), **rule
            )
            out.update({RERANK_PREFIX + prefix + k: v for k, v in res.metrics(ranks).items()})
    return out


def mirror_metrics(dataset: object, embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``mirror_confusion`` of a retrieval split whose classes have mirrors (``digits_pairs``:
    the dataset's ``mirror_labels``), else nothing."""
    mirror = getattr(dataset, "mirror_labels", None)
    if mirror is None:
        return {}
    return {"mirror_confusion": mirror_confusion(embeddings, labels, mirror(labels))}


def reid_rule(
    ap: str = "standard", junk_pids: tuple[int, ...] = (), distractor_pids: tuple[int, ...] = ()
) -> dict[str, Any]:
    """One re-ID rule of :attr:`Scoring.rules` (default: standard AP, every identity real)."""
    return {"ap": str(ap), "junk_pids": tuple(junk_pids), "distractor_pids": tuple(distractor_pids)}


@dataclass(frozen=True)
class Scoring:
    """How embedding arrays are scored: a protocol (:data:`EVAL_PROTOCOLS`) and its options.

    Attributes:
        protocol: ``retrieval`` | ``query_gallery`` | ``reid``.
        ks: the K of Recall@K (retrieval, query_gallery).
        ranks: the CMC ranks (re-ID).
        rules: re-ID only: metric-name prefix (``""`` for the main protocol,
            ``"<variant>/"``) -> :func:`reid_rule`.
        rerank: re-ID only: keyword arguments of
            :func:`~softmine.evaluation.k_reciprocal_distances` to add the re-ranked
            metrics (``rerank/*``); None: the plain ones alone.
    """

    protocol: str = "retrieval"
    ks: tuple[int, ...] = (1, 2, 4, 8)
    ranks: tuple[int, ...] = (1, 5, 10, 20)
    rules: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": reid_rule()})
    rerank: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, cfg: DictConfig) -> Scoring:
        """The test split's scoring of a run config: its protocol, ``evaluation.*``, the dataset's ids."""
        ecfg = cfg.evaluation
        protocol = eval_protocol(cfg.dataset)
        main = reid_rule(
            ecfg.ap, _id_list(cfg.dataset, "junk_pids"), _id_list(cfg.dataset, "distractor_pids")
        )
        variants = {f"{name}/": v for name, v in reid_variants(cfg, protocol).items()}
        return cls(
            protocol=protocol,
            ks=tuple(int(k) for k in ecfg.ks),
            ranks=tuple(int(r) for r in ecfg.ranks),
            rules={"": main, **variants},
            rerank=rerank_options(ecfg),
        )


def score_embeddings(arrays: dict[str, np.ndarray], scoring: Scoring) -> dict[str, float]:
    """The metrics of embedding arrays under ``scoring``: the one scoring function.

    ``arrays`` holds ``embeddings`` and ``labels`` (retrieval, :data:`RETRIEVAL_ARRAYS`), or
    ``query``, ``query_pids``, ``query_camids``, ``gallery``, ``gallery_pids``,
    ``gallery_camids`` (query_gallery and re-ID, :data:`REID_ARRAYS`; the camera ids are
    unused by query_gallery).
    """
    if scoring.protocol == "retrieval":
        return retrieval_metrics(arrays["embeddings"], arrays["labels"], scoring.ks)
    if scoring.protocol == "query_gallery":
        q, q_pids, _, g, g_pids, _ = (arrays[k] for k in REID_ARRAYS)
        return query_gallery_metrics(q, q_pids, g, g_pids, scoring.ks)
    return reid_scores(arrays, ranks=scoring.ranks, rules=scoring.rules, rerank=scoring.rerank)


def score_arrays(arrays: dict[str, np.ndarray], cfg: DictConfig) -> dict[str, float]:
    """The test metrics of embedding arrays under the run's protocol and evaluation options
    (:func:`score_embeddings` with :meth:`Scoring.of_run`)."""
    return score_embeddings(arrays, Scoring.of_run(cfg))


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
        if self.has_test and self.protocol == "retrieval":
            self.test_set = build_split(d, "test")
        elif self.has_test:
            self.query_set = build_split(d, "query")
            self.gallery_set = build_split(d, "gallery")
        self.listing: Path | None = None  # the run's bad_images.txt, once check_files set it
        self.dropped = {name: self._missing_items(name) for name in self._slots()}

    # ---------------------------------------------------------------- unreadable items
    def _slots(self) -> dict[str, tuple[Any, str]]:
        """Evaluation split name -> (object, attribute) holding its dataset."""
        slots: dict[str, tuple[Any, str]] = {}
        if self.has_test and self.protocol == "retrieval":
            slots["test"] = (self, "test_set")
        elif self.has_test:
            slots.update(query=(self, "query_set"), gallery=(self, "gallery_set"))
        val = self.validation
        if val is not None and val.test is not None:
            slots["val"] = (val, "test")
        elif val is not None:
            slots.update(val_query=(val, "query"), val_gallery=(val, "gallery"))
        return slots

    def items_per_evaluation(self) -> int:
        """Items one evaluation embeds: every split it reads (test or query + gallery, and
        the validation split's)."""
        return sum(len(self._split(name)) for name in self._slots())

    def _missing_items(self, name: str) -> int:
        """Items split ``name`` dropped when it was built: its missing image files (one an
        item; none counted for the validation reading, whose are the whole training split's)."""
        base = base_dataset(self._split(name))
        if name.startswith("val") or not isinstance(base, ImageDataset):
            return 0
        return len(base.bad_images)

    def _split(self, name: str) -> Any:
        holder, attr = self._slots()[name]
        return getattr(holder, attr)

    def check_files(self, train_set: Any, listing: Path, *, write: bool = True) -> None:
        """Check the image files of every split before training; leave the unreadable items out.

        ``data.check_files=false`` skips the check (unreadable files are then found as they
        are read). Under ``on_bad_image=error`` any bad file stops here, all of them named
        (:func:`~softmine.data.file_check.check_files`); under ``skip`` they are listed in
        ``listing`` (the run's ``bad_images.txt``) and their evaluation items leave the
        splits. ``write``: whether this process writes ``listing`` (rank 0); every rank
        appends the files it finds unreadable later, while it embeds its shard.
        """
        self.listing = listing
        if not bool(OmegaConf.select(self.cfg, "data.check_files", default=True)):
            return
        splits = {"train": train_set, **{n: self._split(n) for n in self._slots()}}
        bad = check_files(splits, listing, write=write)
        for name in self._slots():
            self._leave_out(name, ~unreadable_items(self._split(name), bad), bad)

    def _leave_out(self, name: str, keep: np.ndarray, bad: dict[str, str]) -> None:
        """Replace split ``name`` by its items where ``keep`` is True; count and log the others."""
        if keep.all():
            return
        holder, attr = self._slots()[name]
        dataset = getattr(holder, attr)
        setattr(holder, attr, keep_items(dataset, keep))
        gone = int((~keep).sum())
        self.dropped[name] += gone
        files = [f for i in np.flatnonzero(~keep)[:3] for f in _files_of(dataset, int(i))[:1]]
        log.warning(
            "%s: %d item(s) left out of the evaluation, their image unreadable (e.g. %s); the "
            "metrics are over the %d others%s",
            name,
            gone,
            ", ".join(f"{f} ({bad.get(f) or 'unreadable'})" for f in files),
            int(keep.sum()),
            f" (listed in {self.listing})" if self.listing else "",
        )

    def _read(self, name: str, embed: Any) -> tuple[np.ndarray, ...]:
        """``embed(shard)``'s arrays for split ``name``, without the items found unreadable.

        Each rank reads its shard; the items whose files turned out unreadable (in any
        DataLoader worker) are removed from the gathered arrays and from the split.
        """
        dataset = self._split(name)
        part = shard(dataset, self.dist)
        with collect_unreadable(dataset) as found:
            arrays = embed(part)
        keep = ~unreadable_items(part, set(found) | known_bad(dataset))
        *arrays, keep = gather_shards((*arrays, keep), len(dataset), self.dist)
        if found and self.listing is not None:  # appended: ranks may find some at once
            with open(self.listing, "a") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in found.items())
        if keep.all():
            return tuple(arrays)
        self._leave_out(name, keep, found)
        return tuple(a[keep] for a in arrays)

    def dropped_counts(self) -> dict[str, int]:
        """``dropped_items/<split>``: evaluation items left out as unreadable, per split.

        Present when a split reads image files under ``on_bad_image=skip`` (zeros
        included, so a run says none were dropped), or whenever one is not zero.
        """
        skip = any(
            getattr(base_dataset(self._split(n)), "on_bad_image", None) == "skip"
            for n in self._slots()
        )
        if not skip and not any(self.dropped.values()):
            return {}
        return {DROPPED_PREFIX + name: int(n) for name, n in self.dropped.items()}

    def metric_names(self, test: bool = True) -> list[str]:
        """Names of the metrics every :meth:`evaluate` returns (what ``trainer.monitor`` may
        name); ``test=False``: those of the validation split alone."""
        e = self.cfg.evaluation
        names: list[str] = []
        rerank = rerank_options(e) is not None
        if test and self.has_test:
            names = metric_names(self.protocol, e.ks, e.ranks)
            names += [f"{v}/{n}" for v in reid_variants(self.cfg, self.protocol) for n in names]
            if rerank and self.protocol == "reid":
                names += [RERANK_PREFIX + n for n in names]
        if self.validation is not None:
            val = metric_names(self.validation.protocol, e.ks, e.ranks)
            if rerank and self.validation.protocol == "reid":
                val += [RERANK_PREFIX + n for n in val]
            names += [VAL_PREFIX + n for n in val]
        return names

    def _embed(self, model: torch.nn.Module, name: str) -> tuple[np.ndarray, ...]:
        """(embeddings, labels) of split ``name``, its unreadable items left out."""
        return self._read(
            name,
            lambda part: extract_embeddings(
                model,
                part,
                device=self.device,
                batch_size=int(self.cfg.trainer.eval_batch_size),
                num_workers=self.num_workers,
            ),
        )

    def _reid_embeddings(self, model: torch.nn.Module, name: str) -> tuple[np.ndarray, ...]:
        """(embeddings, ids, cameras) of split ``name``, its unreadable items left out."""
        return self._read(
            name,
            lambda part: extract_reid_embeddings(
                model,
                part,
                device=self.device,
                frame_batch_size=int(self.cfg.evaluation.frame_batch_size),
                num_workers=self.num_workers,
                batch_size=int(self.cfg.trainer.eval_batch_size),
            ),
        )

    def embed_test(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The test split's embedding arrays (see :func:`score_arrays` for the keys)."""
        if self.protocol == "retrieval":
            return dict(zip(RETRIEVAL_ARRAYS, self._embed(model, "test"), strict=True))
        query = self._reid_embeddings(model, "query")
        gallery = self._reid_embeddings(model, "gallery")
        return dict(zip(REID_ARRAYS, (*query, *gallery), strict=True))

    def evaluate_validation(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of the held-out training classes, named ``val/<metric>`` (empty without them)."""
        val = self.validation
        if val is None:
            return {}
        ecfg = self.cfg.evaluation
        if val.test is not None:
            arrays = dict(zip(RETRIEVAL_ARRAYS, self._embed(model, "val"), strict=True))
            scoring = Scoring("retrieval", ks=tuple(int(k) for k in ecfg.ks))
        else:  # every identity of the training split is real: no junk, no distractors
            query = self._reid_embeddings(model, "val_query")
            gallery = self._reid_embeddings(model, "val_gallery")
            arrays = dict(zip(REID_ARRAYS, (*query, *gallery), strict=True))
            scoring = Scoring(
                "reid",
                ranks=tuple(int(r) for r in ecfg.ranks),
                rules={"": reid_rule(ecfg.ap)},
                rerank=rerank_options(ecfg),
            )
        return {VAL_PREFIX + k: v for k, v in score_embeddings(arrays, scoring).items()}

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


def _files_of(dataset: Any, i: int) -> tuple[str, ...]:
    """The files item ``i`` of ``dataset`` reads (none for a set without image files)."""
    files = item_files(dataset)
    return () if files is None else files[i]
