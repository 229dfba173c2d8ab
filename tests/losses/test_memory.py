"""Cross-batch memory (XBM): the pairs a loss sees with a memory against float64 constructions
written here, the FIFO ring buffer against hand examples, the warm-up, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from softmine.errors import ConfigError
from softmine.losses import (
    ContrastiveHardLoss,
    LiftedStructureLoss,
    MetricLoss,
    MultiSimilarityLoss,
    NormSoftmaxLoss,
    OSMCAALoss,
    ProxyAnchorLoss,
    TripletBatchHardLoss,
    TripletSemiHardLoss,
    contrastive_hard_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    triplet_batchhard_loss,
    triplet_semihard_loss,
    weighted_contrastive_loss,
)
from softmine.losses.memory import CrossBatchMemory, build_memory
from softmine.losses.pairwise import References, pair_masks, reference_rows, unit_rows

F64 = torch.float64
REL = 1e-6


# ---------------------------------------------------------------- float64 loops over (i, j) pairs
# Anchors are the batch f (n rows); the references are R = [f detached; stored] with labels ry;
# the pair (i, i) of anchor i with its own copy is left out. All distances are true Euclidean
# distances of normalised rows, written with scalar autograd.


def _unit(v: Tensor) -> Tensor:
    return v / v.square().sum().sqrt()


def _refs(f: Tensor, y: Tensor, mem: Tensor, my: Tensor) -> tuple[list, list, list[int]]:
    x = [_unit(r) for r in f]
    r = [_unit(v) for v in f.detach()] + [_unit(v) for v in mem]
    return x, r, y.tolist() + my.tolist()


def _d(u: Tensor, v: Tensor) -> Tensor:
    d2 = (u - v).square().sum()
    return d2.sqrt() if float(d2.detach()) > 0 else d2 * 0


def _others(i: int, r: list) -> list[int]:
    return [j for j in range(len(r)) if j != i]


def loop_contrastive_hard(f, y, mem, my, margin, lam):
    x, r, ry = _refs(f, y, mem, my)
    zero = f.sum() * 0
    pos, neg, n_pos, n_neg = zero, zero, 0, 0
    for i in range(len(x)):
        negs = [float(_d(x[i], r[k])) for k in range(len(r)) if ry[k] != int(y[i])]
        closest = min(negs) if negs else math.inf
        for j in _others(i, r):
            d = _d(x[i], r[j])
            if ry[j] == int(y[i]) and float(d) > closest:
                pos, n_pos = pos + d**2, n_pos + 1
            elif ry[j] != int(y[i]) and float(d) < margin:
                neg, n_neg = neg + (margin - d) ** 2, n_neg + 1
    lp = 0.5 * pos / n_pos if n_pos else zero
    ln = 0.5 * neg / n_neg if n_neg else zero
    return (1 - lam) * lp + lam * ln


def loop_multi_similarity(f, y, mem, my, alpha, beta, base, eps):
    x, r, ry = _refs(f, y, mem, my)
    total = f.sum() * 0
    for i in range(len(x)):
        pos = [(x[i] * r[k]).sum() for k in _others(i, r) if ry[k] == int(y[i])]
        neg = [(x[i] * r[k]).sum() for k in range(len(r)) if ry[k] != int(y[i])]
        if not pos or not neg:
            continue
        min_pos, max_neg = min(float(s) for s in pos), max(float(s) for s in neg)
        kept_neg = [s for s in neg if float(s) + eps > min_pos]
        kept_pos = [s for s in pos if float(s) - eps < max_neg]
        if kept_pos and kept_neg:
            total = (
                total + torch.log(1 + sum(torch.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
            )
            total = (
                total + torch.log(1 + sum(torch.exp(beta * (s - base)) for s in kept_neg)) / beta
            )
    return total / len(x)


def loop_triplet_semihard(f, y, mem, my, margin):
    x, r, ry = _refs(f, y, mem, my)
    total, count = f.sum() * 0, 0
    for a in range(len(x)):
        negs = [_d(x[a], r[k]) ** 2 for k in range(len(r)) if ry[k] != int(y[a])]
        if not negs:
            continue
        for p in _others(a, r):
            if ry[p] != int(y[a]):
                continue
            d_ap = _d(x[a], r[p]) ** 2
            farther = [v for v in negs if float(v) > float(d_ap)]
            pick = min if farther else max
            d_an = pick(farther or negs, key=float)
            total, count = total + torch.clamp(d_ap - d_an + margin, min=0), count + 1
    return total / count if count else total


def loop_triplet_batchhard(f, y, mem, my, margin):
    x, r, ry = _refs(f, y, mem, my)
    total, count = f.sum() * 0, 0
    for a in range(len(x)):
        pos = [_d(x[a], r[p]) for p in _others(a, r) if ry[p] == int(y[a])]
        neg = [_d(x[a], r[k]) for k in range(len(r)) if ry[k] != int(y[a])]
        if pos and neg:
            gap = max(pos, key=float) - min(neg, key=float)
            total, count = total + torch.clamp(gap + margin, min=0), count + 1
    return total / count if count else total


def loop_lifted(f, y, mem, my, margin):
    """Anchor i's negatives are references, reference j's are anchors (the memory has no pairs)."""
    x, r, ry = _refs(f, y, mem, my)
    total, pairs = f.sum() * 0, 0
    for i in range(len(x)):
        for j in _others(i, r):
            if ry[j] != int(y[i]):
                continue
            pairs += 1
            terms = [
                torch.exp(margin - _d(x[i], r[k])) for k in range(len(r)) if ry[k] != int(y[i])
            ]
            terms += [
                torch.exp(margin - _d(x[k], r[j])) for k in range(len(x)) if int(y[k]) != ry[j]
            ]
            if terms:
                total = total + torch.clamp(torch.log(sum(terms)) + _d(x[i], r[j]), min=0) ** 2
    return total / (2 * pairs) if pairs else total


def loop_osm(f, y, mem, my, a, ma, margin, sigma, lam, osm):
    """OSM (+CAA) pairs with detached weights; a stored sample's attention is the stored one."""
    x, r, ry = _refs(f, y, mem, my)
    ra = None if a is None else a.tolist() + ma.tolist()
    zero = f.sum() * 0
    pn, pd, nn_, nd = zero, zero, zero, zero
    for i in range(len(x)):
        for j in _others(i, r):
            d = _d(x[i], r[j])
            att = 1.0 if a is None else min(float(a[i]), ra[j])
            hinge = torch.clamp(margin - d, min=0.0)
            if ry[j] == int(y[i]):
                w = (math.exp(-(float(d) ** 2) / sigma**2) if osm else 1.0) * att
                pn, pd = pn + w * d**2, pd + w
            else:
                w = (float(hinge) if osm else 1.0) * att
                nn_, nd = nn_ + w * hinge**2, nd + w
    lp = 0.5 * pn / pd if float(pd) > 0 else zero
    ln = 0.5 * nn_ / nd if float(nd) > 0 else zero
    return (1 - lam) * lp + lam * ln


def _data(seed: int, labels: list[int], stored: list[int], dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(labels), dim, generator=g, dtype=F64)
    mem = torch.randn(len(stored), dim, generator=g, dtype=F64) * 3  # any scale
    return f, torch.tensor(labels), mem, torch.tensor(stored)


BATCH, STORED = [0, 0, 1, 1, 2, 2, 3, 5], [0, 1, 1, 4, 4, 2, 5, 5, 0, 3, 6]
CASES = {
    "contrastive_hard": (
        lambda f, y, m: contrastive_hard_loss(f, y, margin=1.2, lam=0.3, memory=m),
        lambda f, y, mem, my: loop_contrastive_hard(f, y, mem, my, 1.2, 0.3),
    ),
    "multi_similarity": (
        lambda f, y, m: multi_similarity_loss(f, y, memory=m),
        lambda f, y, mem, my: loop_multi_similarity(f, y, mem, my, 2.0, 50.0, 0.5, 0.1),
    ),
    "triplet_semihard": (
        lambda f, y, m: triplet_semihard_loss(f, y, margin=0.2, memory=m),
        lambda f, y, mem, my: loop_triplet_semihard(f, y, mem, my, 0.2),
    ),
    "triplet_batchhard": (
        lambda f, y, m: triplet_batchhard_loss(f, y, margin=0.2, memory=m),
        lambda f, y, mem, my: loop_triplet_batchhard(f, y, mem, my, 0.2),
    ),
    "lifted": (
        lambda f, y, m: lifted_structure_loss(f, y, margin=1.0, memory=m),
        lambda f, y, mem, my: loop_lifted(f, y, mem, my, 1.0),
    ),
    "contrastive": (
        lambda f, y, m: weighted_contrastive_loss(f, y, osm=False, lam=0.3, memory=m),
        lambda f, y, mem, my: loop_osm(f, y, mem, my, None, None, 1.2, 0.8, 0.3, False),
    ),
    "osm": (
        lambda f, y, m: weighted_contrastive_loss(f, y, memory=m),
        lambda f, y, mem, my: loop_osm(f, y, mem, my, None, None, 1.2, 0.8, 0.5, True),
    ),
}


@pytest.mark.parametrize("stored", [STORED, []], ids=["memory", "empty"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_pair_loss_with_memory_matches_a_float64_loop(name: str, stored: list[int]) -> None:
    """Values and gradients over the pairs (batch anchor, batch or stored sample), self left out."""
    f, y, mem, my = _data(0, BATCH, stored)
    vectorised, loop = CASES[name]
    f1, f2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    got = vectorised(f1, y, References(mem, my))
    ref = loop(f2, y, mem, my)
    assert float(got) == pytest.approx(float(ref), rel=REL, abs=1e-12)
    (g1,) = torch.autograd.grad(got, [f1])
    (g2,) = torch.autograd.grad(ref, [f2])
    torch.testing.assert_close(g1, g2, rtol=REL, atol=1e-12)


@pytest.mark.parametrize("osm", [True, False])
def test_osm_caa_with_memory_uses_the_stored_attention(osm: bool) -> None:
    """CAA: the batch's attention from the class vectors, a stored sample's the stored one."""
    f, y, mem, my = _data(1, BATCH, STORED)
    loss = OSMCAALoss(7, f.shape[1], osm=osm, lam=0.4).double()
    stored_attention = torch.rand(
        len(STORED), generator=torch.Generator().manual_seed(2), dtype=F64
    )
    f1, f2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    got = loss(f1, y, memory=References(mem, my, {"attention": stored_attention}))
    with torch.no_grad():
        logits = unit_rows(f) @ torch.nn.functional.normalize(loss.class_vectors, dim=1).T
        a = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
    ref = loop_osm(f2, y, mem, my, a, stored_attention, 1.2, 0.8, 0.4, osm)
    assert float(got) == pytest.approx(float(ref), rel=REL)  # no cross-entropy in the memory term
    (g1,) = torch.autograd.grad(got, [f1])
    (g2,) = torch.autograd.grad(ref, [f2])
    torch.testing.assert_close(g1, g2, rtol=REL, atol=1e-12)


def test_without_memory_the_pair_matrices_are_the_batchs() -> None:
    f, y, _, _ = _data(3, BATCH, [])
    x = unit_rows(f)
    refs, ref_labels = reference_rows(x, y, None)
    assert refs is x and ref_labels is y
    same, self_pairs = pair_masks(y, ref_labels)
    assert torch.equal(self_pairs, torch.eye(len(y), dtype=torch.bool))


# ---------------------------------------------------------------- what the loss sees in training


class Spy(MetricLoss):
    """A pair loss that records the pair set of each memory call and returns a known term."""

    takes_memory = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, ...]] = []  # (similarity, same, self, stored rows) per call

    def forward(self, embeddings: Tensor, labels: Tensor, memory: References | None = None):
        x = unit_rows(embeddings)
        refs, ref_labels = reference_rows(x, labels, memory)  # what every pair loss builds on
        if memory is not None:
            masks = pair_masks(labels, ref_labels)
            self.seen.append((x @ refs.T, *masks, memory.embeddings.clone()))
        return embeddings.sum() * 0 + (2.0 if memory is None else 3.0)


def _stream(steps: int, n: int = 6, dim: int = 4, classes: int = 4):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))
        for _ in range(steps)
    ]


def _columns(n: int, rows: Tensor) -> Tensor:
    """Columns in a canonical order: the batch's n first, then the stored ones by their first
    coordinate (the ring hands the queue in slot order; the pairs do not depend on it)."""
    return torch.cat([torch.arange(n), rows[n:, 0].argsort() + n])


def test_the_pair_set_the_loss_sees_is_the_batch_against_batch_and_queue() -> None:
    """(1) With memory, the similarity matrix, same-label and self masks the loss sees equal a
    float64 construction from the batch and the queue rebuilt here from the history."""
    size, start, n = 14, 1, 6
    memory = CrossBatchMemory(size, start=start, weight=0.5)
    spy, history = Spy(), []
    for step, (emb, y) in enumerate(_stream(6), start=1):
        loss, details = memory(spy, spy(emb, y), {}, emb, y)
        if step <= start:
            assert not spy.seen and float(details["memory_loss"]) == 0 and float(loss) == 2.0
            continue
        assert float(loss) == 2.0 + 0.5 * 3.0 and float(details["memory_loss"]) == 3.0
        # the queue: the newest `size` samples of the batches enqueued before this step
        queue_emb = torch.cat([e for e, _ in history] or [emb[:0]])[-size:]
        queue_lab = torch.cat([lab for _, lab in history] or [y[:0]])[-size:]
        emb64 = torch.cat([emb, queue_emb]).double()
        x = emb64 / emb64.norm(dim=1, keepdim=True)
        lab = torch.cat([y, queue_lab])
        want = (x[:n] @ x.T, y[:, None] == lab[None, :], torch.eye(n, len(lab), dtype=torch.bool))
        got_sim, got_same, got_self, stored = spy.seen[-1]
        assert got_sim.shape == (n, n + min(size, n * len(history)))
        got_cols = _columns(n, torch.cat([emb, stored]))
        want_cols = _columns(n, emb64)
        torch.testing.assert_close(
            got_sim[:, got_cols].double(), want[0][:, want_cols], rtol=0, atol=1e-6
        )
        assert torch.equal(got_same[:, got_cols], want[1][:, want_cols])
        assert torch.equal(got_self[:, got_cols], want[2][:, want_cols])
        history.append((emb, y))
    assert memory.filled == size and memory.iteration == 6 and len(spy.seen) == 5


# ---------------------------------------------------------------- the ring buffer


def _ids(refs: References) -> list[int]:
    return [int(v) for v in refs.embeddings[:, 0]]


def _enqueue(memory: CrossBatchMemory, ids: list[int]) -> None:
    t = torch.tensor(ids, dtype=torch.float32)
    memory.enqueue(t[:, None].repeat(1, 2), torch.tensor(ids), {"attention": t / 100})


def test_fifo_order_and_wrap_around_by_hand() -> None:
    """(2) A queue of 5 fed batches of 2, 2, 2, 1, then 7 samples."""
    memory = CrossBatchMemory(5, fields=("attention",))
    _enqueue(memory, [1, 2])
    _enqueue(memory, [3, 4])
    assert _ids(memory.references()) == [1, 2, 3, 4] and memory.ptr == 4
    _enqueue(memory, [5, 6])  # 6 wraps into slot 0, over 1, the oldest
    assert _ids(memory.references()) == [6, 2, 3, 4, 5]  # slot order
    assert _ids(memory.contents()) == [2, 3, 4, 5, 6]  # oldest first
    assert memory.ptr == 1 and memory.filled == 5
    _enqueue(memory, [7])
    assert _ids(memory.contents()) == [3, 4, 5, 6, 7]
    refs = memory.contents()
    assert refs.labels.tolist() == [3, 4, 5, 6, 7]
    assert torch.allclose(refs.fields["attention"], torch.tensor([3, 4, 5, 6, 7]) / 100)
    _enqueue(memory, [8, 9, 10, 11, 12, 13, 14])  # more than the queue holds: the last 5
    assert _ids(memory.contents()) == [10, 11, 12, 13, 14]
    memory.discard_last()  # a skipped step takes its batch back out
    assert _ids(memory.contents()) == [3, 4, 5, 6, 7] and memory.ptr == 2


def test_state_round_trip_and_discard_of_the_first_batch() -> None:
    memory = CrossBatchMemory(4, fields=("attention",))
    _enqueue(memory, [1, 2, 3])
    _enqueue(memory, [4, 5])
    memory.iteration = 9
    again = CrossBatchMemory(4, fields=("attention",))
    again.load_state(memory.state())
    assert _ids(again.contents()) == _ids(memory.contents()) == [2, 3, 4, 5]
    assert again.iteration == 9 and again.filled == 4
    _enqueue(again, [6])
    _enqueue(memory, [6])
    assert _ids(again.contents()) == _ids(memory.contents()) == [3, 4, 5, 6]
    first = CrossBatchMemory(4)
    _enqueue(first, [1])
    first.discard_last()
    assert first.filled == 0 and first.ptr == 0
    with pytest.raises(ConfigError, match="loss.memory_size=3"):
        CrossBatchMemory(3).load_state(memory.state())


# ---------------------------------------------------------------- warm-up


def test_memory_start_is_respected() -> None:
    """(4) Steps 1..start: no memory term and nothing stored; step start + 1: the batch against
    its own copy only; later steps: against the batches from step start + 1 on."""
    memory = CrossBatchMemory(100, start=3)
    spy = Spy()
    for step, (emb, y) in enumerate(_stream(6), start=1):
        _, details = memory(spy, spy(emb, y), {}, emb, y)
        if step <= 3:
            assert memory.filled == 0 and not spy.seen
            assert float(details["memory_loss"]) == 0.0
        else:
            assert spy.seen[-1][0].shape == (6, 6 + 6 * (step - 4))
            assert memory.filled == 6 * (step - 3)


def test_memory_joins_in_training_only(tmp_path) -> None:
    """The objective pairs with the memory in training mode with gradients, never in evaluation."""
    from softmine.engine.objective import Objective

    memory = CrossBatchMemory(50)
    objective = Objective(torch.nn.Linear(4, 3), ContrastiveHardLoss(), memory=memory)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        objective(x, y)
    objective.eval()
    objective(x, y)
    assert memory.filled == 0 and memory.iteration == 0
    objective.train()
    loss, details = objective(x, y)
    assert memory.filled == 6 and "memory_loss" in details
    plain = ContrastiveHardLoss()(objective.model(x), y)
    assert float(loss) == pytest.approx(float(plain) + float(details["memory_loss"]))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("loss", "name"),
    [(ProxyAnchorLoss(3, 4), "proxy_anchor"), (NormSoftmaxLoss(3, 4), "normsoftmax")],
)
def test_memory_with_a_proxy_or_classifier_loss_is_one_clear_line(loss, name) -> None:
    """(5) A loss without pairs refuses the memory, naming the fix."""
    with pytest.raises(ConfigError) as err:
        build_memory({"memory": "xbm", "memory_size": 10}, loss, f"loss={name}")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"loss={name} does not take a cross-batch memory")
    assert "use one of them" in message and "drop loss.memory" in message


@pytest.mark.parametrize(
    "loss",
    [
        ContrastiveHardLoss(),
        LiftedStructureLoss(),
        MultiSimilarityLoss(),
        TripletBatchHardLoss(),
        TripletSemiHardLoss(),
        OSMCAALoss(3, 4),
    ],
)
def test_every_pair_loss_takes_a_memory(loss) -> None:
    memory = build_memory({"memory": "xbm", "memory_size": 10, "memory_start": 2}, loss, "loss")
    assert memory is not None and (memory.size, memory.start, memory.weight) == (10, 2, 1.0)
    assert build_memory({"memory": None}, loss, "loss") is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"memory": "xbn", "memory_size": 10}, "loss.memory=xbn is not a memory kind; use"),
        ({"memory": "xbm", "memory_size": 0}, "loss.memory_size must be >= 1"),
        ({"memory": "xbm", "memory_size": 8, "memory_start": -1}, "loss.memory_start must be >= 0"),
        (
            {"memory": "xbm", "memory_size": 8, "memory_weight": -1},
            "loss.memory_weight must be >= 0",
        ),
    ],
)
def test_bad_memory_settings_are_one_line(node, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_memory(node, ContrastiveHardLoss(), "loss")
