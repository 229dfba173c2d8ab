"""P x K batch sampler: P classes with K samples each in every batch.

Epoch semantics: at the start of epoch ``e`` each class's indices are shuffled
(with a generator seeded by ``(seed, e)``) and cut into chunks of K (the last
chunk is completed from the start of the same shuffled list, so every sample is
seen once per epoch). Batches are then drawn by picking P distinct classes, with
probability proportional to their remaining chunks, and taking one chunk from
each, until fewer than P classes have chunks left. The order therefore depends
only on ``(seed, epoch)``: an epoch can be replayed exactly, and resumed part-way
with :meth:`PKSampler.set_epoch` (``start_batch``).

Under torch.distributed (``world_size`` N > 1) every rank draws the same sequence
of global batches. By default rank r takes every N-th of them whole, so the batch
the loss sees (gathered over ranks) is N x P x K. With ``split_across_ranks`` every
rank takes its share of every global batch instead, P/N whole classes each, so the
gathered batch is the P x K batch one process would train on.

``draw="uniform_classes"`` is the authors' draw instead (``get_train_minibatch.m``): every
batch picks its P classes uniformly among all classes, independently of the other batches
(no epochs: a class can come in consecutive batches and another wait long), and its K items
of each class uniformly, either K distinct ones (``within_class="distinct"``, their
``randperm(len, K)``; a class with fewer than K items repeats them by their
``mod(randperm(K), len)`` rule) or K independent draws (``within_class="independent"``, their
MARS/LPW tracklet draw, where the same tracklet can come twice). An "epoch" of this draw is
``len(labels) // (P*K)`` batches drawn from ``(seed, epoch)``, so the run's seed replays it
and a resume part-way is exact as for the other draw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from softmine.errors import ConfigError

log = logging.getLogger(__name__)

DRAWS = ("epochs", "uniform_classes")
AUTO = "auto"
#: ``auto`` P x K: the largest K and the batch cap (the 8 x 8 = 64 of ``sampler=pk``)
AUTO_MAX_K, AUTO_MAX_BATCH = 8, 64
WITHIN_CLASS = ("distinct", "independent")


def distinct_draws(rng: np.random.Generator, n: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct integers uniform in ``[0, n[i])`` for every row ``i``, in random order.

    Floyd's algorithm over all rows at once: a uniformly random ``k``-subset (every ``n[i]``
    must be at least ``k``), then shuffled, so each row is distributed as MATLAB's
    ``randperm(n[i], k) - 1``. Returns shape ``(len(n), k)``.
    """
    n = np.asarray(n, dtype=np.int64)
    out = np.empty((len(n), k), dtype=np.int64)
    for step in range(k):
        top = n - k + step  # Floyd: draw t in [0, top]; if taken, take top itself
        t = rng.integers(0, top + 1)
        taken = (out[:, :step] == t[:, None]).any(axis=1)
        out[:, step] = np.where(taken, top, t)
    return rng.permuted(out, axis=1)


def fit_pk(counts: Sequence[int] | np.ndarray) -> tuple[int, int]:
    """P and K that fit training classes of ``counts`` items (``sampler.*=auto``).

    K = the smallest class's size, at most 8 (every class then gives K distinct items);
    P = as many classes as fit a batch of 64 at that K, at most all classes:
    ``K = min(8, min(counts))``, ``P = min(C, 64 // K)``. 10 classes of 8 or more
    training images: 8 x 8; 200 classes of 3: 21 x 3. A class of one item has no
    positive pair: :class:`PKSampler` then says so.
    """
    counts = np.asarray(counts)
    if len(counts) == 0:
        return 1, 2
    k = max(2, min(AUTO_MAX_K, int(counts.min())))
    return min(len(counts), AUTO_MAX_BATCH // k), k


def _resolve_auto(labels: np.ndarray, p: int | str, k: int | str) -> tuple[int, int]:
    """``classes_per_batch`` / ``samples_per_class``, an ``auto`` one replaced by :func:`fit_pk`'s."""
    for key, value in (("classes_per_batch", p), ("samples_per_class", k)):
        if isinstance(value, str) and value != AUTO:
            raise ConfigError(f"sampler.{key} must be a whole number or auto (got {value!r})")
    if p != AUTO and k != AUTO:
        return int(p), int(k)
    _, counts = np.unique(labels, return_counts=True)
    k = fit_pk(counts)[1] if k == AUTO else int(k)
    p = max(1, min(len(counts), AUTO_MAX_BATCH // k)) if p == AUTO else int(p)
    log.info(
        "sampler: P=%d classes x K=%d images a batch (auto: K = the smallest class's training "
        "images, at most %d; P = the classes that fit a batch of %d)",
        p,
        k,
        AUTO_MAX_K,
        AUTO_MAX_BATCH,
    )
    return p, k


def check_split_across_ranks(classes_per_batch: int, world_size: int) -> None:
    """``sampler.split_across_ranks=true`` gives each of ``world_size`` ranks P/N whole classes
    of every batch: a P that the ranks cannot share is a :class:`ConfigError`. ``softmine-train``
    asks before it builds the data and the model, :class:`PKSampler` again when built."""
    if classes_per_batch % world_size:
        raise ConfigError(
            f"sampler.split_across_ranks=true gives each of the N={world_size} ranks "
            f"P/N whole classes of every batch, but "
            f"P=sampler.classes_per_batch={classes_per_batch} is not divisible by "
            f"N={world_size}; set sampler.classes_per_batch to a multiple "
            f"of {world_size}, launch a number of processes that divides {classes_per_batch}, "
            "or set sampler.split_across_ranks=false"
        )


class PKSampler(Sampler[list[int]]):
    """Yields lists of P*K dataset indices: P classes x K samples per class.

    Args:
        labels: label of every dataset item.
        classes_per_batch: P, classes in a batch; ``"auto"``: :func:`fit_pk`'s P.
        samples_per_class: K, samples of each of those classes in a batch; ``"auto"``:
            :func:`fit_pk`'s K (the smallest class, at most 8).
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        allow_replacement: let classes with fewer than K items fill their K slots by
            sampling with replacement; by default such classes are an error.
        rank, world_size: for distributed training, each rank takes every
            ``world_size``-th batch, so ranks see disjoint batches of the same epoch.
        split_across_ranks: instead, every rank takes P / world_size whole classes of
            every batch (rank r the r-th block of K-groups), so the ranks together
            train on the one-process batches; P must be divisible by world_size.
        class_names: name of every label ``0..C-1`` (the dataset's ``class_names``), so an
            error names a class as the data do; None: by its label.
        draw: ``epochs`` (every item about once per epoch, classes in proportion to their
            remaining chunks) or ``uniform_classes`` (the authors' draw: P classes uniformly
            for every batch; see the module's notes).
        within_class: for ``uniform_classes``, how the K items of a class are drawn:
            ``distinct`` (K different items) or ``independent`` (K draws with replacement).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes_per_batch: int | str,
        samples_per_class: int | str,
        seed: int = 0,
        allow_replacement: bool = False,
        rank: int = 0,
        world_size: int = 1,
        split_across_ranks: bool = False,
        class_names: Sequence[str] | None = None,
        draw: str = "epochs",
        within_class: str = "distinct",
    ) -> None:
        labels = np.asarray(labels)
        classes_per_batch, samples_per_class = _resolve_auto(
            labels, classes_per_batch, samples_per_class
        )
        if draw not in DRAWS or within_class not in WITHIN_CLASS:
            raise ConfigError(
                f"sampler.draw must be one of {DRAWS} and sampler.within_class one of "
                f"{WITHIN_CLASS} (got draw={draw!r}, within_class={within_class!r})"
            )
        if draw == "epochs" and within_class != "distinct":
            raise ConfigError(
                f"sampler.within_class={within_class} needs sampler.draw=uniform_classes "
                "(the epoch draw takes every item once); set sampler.within_class=distinct"
            )
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ConfigError(
                f"sampler.classes_per_batch (P={classes_per_batch}) and sampler.samples_per_class "
                f"(K={samples_per_class}) must both be >= 1"
            )
        if samples_per_class < 2:
            raise ConfigError(
                "sampler.samples_per_class (K) must be >= 2: with one sample per class a batch "
                "has no positive pair"
            )
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < classes_per_batch:
            raise ConfigError(
                f"sampler.classes_per_batch (P={classes_per_batch}) is larger than the "
                f"{len(classes)} classes in the training set; lower sampler.classes_per_batch"
            )
        small = classes[counts < samples_per_class]
        if len(small) and not allow_replacement and within_class == "distinct":
            name = repr(class_names[int(small[0])]) if class_names is not None else small[0]
            raise ConfigError(
                f"{len(small)} of {len(classes)} training classes have fewer than "
                f"K={samples_per_class} samples (smallest has {counts.min()}, e.g. class {name}); "
                f"lower sampler.samples_per_class or set sampler.allow_replacement=true"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"sampler rank {rank} must lie in [0, world_size={world_size})")
        if split_across_ranks:
            check_split_across_ranks(classes_per_batch, world_size)
        self.P, self.K = int(classes_per_batch), int(samples_per_class)
        self.seed = int(seed)
        self.allow_replacement = allow_replacement
        self.rank, self.world_size = rank, world_size
        self.split = bool(split_across_ranks) and world_size > 1
        self.by_class = [np.flatnonzero(labels == c) for c in classes]
        self.draw, self.within_class = draw, within_class
        # uniform_classes: every class's items in data order, one after another
        self._items = np.argsort(labels, kind="stable")
        self._sizes = counts.astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._uniform_batches = max(
            len(labels) // (self.P * self.K), 1 if self.split else world_size
        )
        self.epoch = 0
        self.start_batch = 0
        self._cache: dict[int, list[list[int]]] = {}  # the last two epochs drawn

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch to draw, and skip its first ``start_batch`` batches (for resuming)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` across every rank, in order (the last two epochs cached)."""
        if epoch in self._cache:
            return self._cache[epoch]
        if self.draw == "uniform_classes":
            batches = self._uniform_epoch(epoch)
        else:
            batches = self._chunked_epoch(epoch)
        self._cache = {e: b for e, b in self._cache.items() if e == epoch - 1}
        self._cache[epoch] = batches
        return batches

    def _chunked_epoch(self, epoch: int) -> list[list[int]]:
        """``draw=epochs``: every class's shuffled items in chunks of K, P chunks a batch."""
        rng = np.random.default_rng([self.seed, epoch])
        queues: list[list[np.ndarray]] = []
        for idx in self.by_class:
            perm = rng.permutation(idx)
            if len(perm) < self.K:
                perm = np.concatenate([perm, rng.choice(idx, self.K - len(perm), replace=True)])
            n_chunks = len(perm) // self.K + (len(perm) % self.K > 0)
            padded = np.resize(perm, n_chunks * self.K)
            queues.append(list(padded.reshape(n_chunks, self.K)))
        batches = []
        remaining = np.array([len(q) for q in queues], dtype=np.float64)
        while (remaining > 0).sum() >= self.P:
            chosen = rng.choice(len(queues), self.P, replace=False, p=remaining / remaining.sum())
            batches.append(np.concatenate([queues[c].pop() for c in chosen]).tolist())
            remaining[chosen] -= 1
        return batches

    def _uniform_epoch(self, epoch: int) -> list[list[int]]:
        """``draw=uniform_classes``: P classes uniformly per batch, K items of each uniformly.

        Mirrors ``get_train_minibatch.m``:6-21 (``randperm(length(ids), id_num)``, then
        ``randperm(len, image_per_id)`` or, for a class with fewer items,
        ``mod(randperm(image_per_id), len) + 1``) and, with ``within_class=independent``,
        ``get_train_minibatch_Mars_V006_even.m``:8-17 (one ``randperm(len, 1)`` per slot).
        """
        rng = np.random.default_rng([self.seed, epoch])
        n_batches, n_classes = self._uniform_batches, len(self._sizes)
        classes = distinct_draws(rng, np.full(n_batches, n_classes), self.P).ravel()
        sizes = self._sizes[classes]
        if self.within_class == "independent":
            pos = rng.integers(0, sizes[:, None], size=(len(classes), self.K))
        else:
            pos = np.empty((len(classes), self.K), dtype=np.int64)
            whole = sizes >= self.K
            pos[whole] = distinct_draws(rng, sizes[whole], self.K)
            if not whole.all():  # 1..K shuffled, modulo the class size (their rule)
                cycle = np.tile(np.arange(1, self.K + 1), (int((~whole).sum()), 1))
                pos[~whole] = rng.permuted(cycle, axis=1) % sizes[~whole, None]
        items = self._items[self._starts[classes, None] + pos]
        return items.reshape(n_batches, self.P * self.K).tolist()

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order (every rank gets the same number)."""
        batches = self.epoch_batches(epoch)
        if self.split:  # the r-th of N equal blocks of whole K-groups of every batch
            share = self.P // self.world_size * self.K
            lo = self.rank * share
            return [b[lo : lo + share] for b in batches]
        return batches[self.rank :: self.world_size][: len(batches) // self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches(self.epoch)[self.start_batch :]
        self.start_batch = 0

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (after ``start_batch``)."""
        return len(self.rank_batches(self.epoch)) - self.start_batch
