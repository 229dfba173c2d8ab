"""Cross-batch memory (XBM) for any pair loss: a FIFO queue of recent embeddings joins the pairs.

Wang, Zhang, Huang, Scott. "Cross-Batch Memory for Embedding Learning". CVPR 2020,
https://arxiv.org/abs/1912.06798; the authors' code: github.com/msight-tech/research-xbm.

Embeddings drift slowly once the first iterations are past (the paper's "slow drift"),
so those of recent batches stand in for what the model would give them now. The memory
keeps the last ``size`` of them (detached, with their labels and whatever per-sample
values the loss declares in ``memory_fields``) in a ring buffer on the training device.
Each training step, after ``start`` steps of warm-up, the loss's anchors, the batch, are
also paired with the memory:

    total = L(batch, batch) + weight * L(batch, batch ∪ memory),

where the second term is the loss module called with ``memory=References`` (the batch's
own columns detached, :func:`~softmine.losses.pairwise.reference_rows`), and then the
batch is enqueued. That is the authors' trainer (research-xbm ``engine/trainer.py``:
``loss = criterion(batch) + XBM.WEIGHT * criterion(batch, memory)``, the memory
enqueued with the batch first and no memory before ``XBM.START_ITERATION``). Their
memory of ``XBM.SIZE`` entries counts the current batch; here ``size`` counts the
samples of earlier batches, the batch's own are always among the references.

The memory is part of a run's checkpoint (:meth:`CrossBatchMemory.state`), so a resumed
run continues with the queue it stopped with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import needs_of
from softmine.losses.pairwise import References

#: the kinds ``loss.memory`` can name (null: none)
MEMORY_KINDS = ("xbm",)

#: the memory's config keys in a pair loss's node (configs/loss/shared/memory.yaml)
MEMORY_KEYS = ("memory", "memory_size", "memory_start", "memory_weight")


class CrossBatchMemory(nn.Module):
    """A FIFO ring buffer of detached embeddings, labels and per-sample fields, and the XBM term.

    Args:
        size: how many embeddings of earlier batches it keeps (the queue length).
        start: training steps before memory pairs join (warm-up): from step ``start + 1``
            on, counting from 1, the batch is paired with the memory and enqueued.
        weight: weight of the memory term added to the batch loss.
        fields: the per-sample values stored with each embedding (the loss's ``memory_fields``).
        device: where the queue lives (the model's device); None: the first batch's.

    The queue is allocated at the first enqueue, in the embeddings' dtype. It is no
    parameter or buffer (DDP would broadcast it every step, and every rank computes the
    same queue from the gathered batch anyway): :meth:`state` / :meth:`load_state` carry
    it in the checkpoint.
    """

    def __init__(
        self,
        size: int,
        start: int = 0,
        weight: float = 1.0,
        fields: tuple[str, ...] = (),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # ring-buffer bookkeeping on the host: no graph for torch.compile. Wrapped here, not
        # decorated on the class: the decorator imports torch._dynamo (1.3 s) in every
        # command that imports the losses, memory or not
        self.forward = torch.compiler.disable(self.forward)  # type: ignore[method-assign]
        if int(size) < 1:
            raise ConfigError(f"loss.memory_size must be >= 1 embedding (got {size})")
        if int(start) < 0:
            raise ConfigError(f"loss.memory_start must be >= 0 steps (got {start})")
        if not float(weight) >= 0:
            raise ConfigError(f"loss.memory_weight must be >= 0 (got {weight}); the authors use 1")
        self.size, self.start, self.weight = int(size), int(start), float(weight)
        self.fields = tuple(fields)
        self.device = None if device is None else torch.device(device)
        self.embeddings: Tensor | None = None  # (size, dim) storage, slots in ring order
        self.labels: Tensor | None = None
        self.values: dict[str, Tensor] = {}
        self.ptr = 0  # the slot the next sample goes to
        self.filled = 0  # slots holding a sample
        self.iteration = 0  # training steps seen (the warm-up counts them)
        self._undo: dict[str, Any] | None = None  # what the last enqueue overwrote

    # ------------------------------------------------------------------ the queue
    def references(self) -> References:
        """The stored samples as the loss's :class:`References`, in slot order (not oldest
        first once the queue has wrapped: the pairs do not depend on the order)."""
        if self.embeddings is None or self.labels is None:
            raise RuntimeError("the memory is empty: nothing was enqueued yet")
        k = self.filled
        return References(
            self.embeddings[:k], self.labels[:k], {f: v[:k] for f, v in self.values.items()}
        )

    def contents(self) -> References:
        """The stored samples oldest first (for inspection and tests; copies the queue)."""
        refs = self.references()
        if self.filled < self.size:
            return refs
        order = torch.arange(self.size, device=refs.labels.device).add_(self.ptr) % self.size
        fields = {f: v[order] for f, v in refs.fields.items()}
        return References(refs.embeddings[order], refs.labels[order], fields)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, fields: dict[str, Tensor]) -> None:
        """Write a batch over the oldest slots (one vectorised index copy per tensor).

        A batch larger than the queue leaves its last ``size`` samples.
        """
        emb = embeddings.detach()
        fields = {f: fields[f].detach().reshape(-1) for f in self.fields}
        if self.embeddings is None:
            self._allocate(emb, labels, fields)
        assert self.embeddings is not None and self.labels is not None
        n = emb.shape[0]
        if n > self.size:
            emb, labels = emb[-self.size :], labels[-self.size :]
            fields = {f: v[-self.size :] for f, v in fields.items()}
            n = self.size
        slots = torch.arange(n, device=self.embeddings.device).add_(self.ptr) % self.size
        self._undo = {
            "slots": slots,
            "embeddings": self.embeddings[slots],
            "labels": self.labels[slots],
            "values": {f: v[slots] for f, v in self.values.items()},
            "ptr": self.ptr,
            "filled": self.filled,
        }
        self.embeddings.index_copy_(0, slots, emb.to(self.embeddings))
        self.labels.index_copy_(0, slots, labels.to(self.labels))
        for f, v in self.values.items():
            v.index_copy_(0, slots, fields[f].to(v))
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def discard_last(self) -> None:
        """Undo the last enqueue (a step skipped for a non-finite loss keeps its batch out)."""
        undo, self._undo = self._undo, None
        if undo is None or self.embeddings is None or self.labels is None:
            return
        slots = undo["slots"]
        self.embeddings.index_copy_(0, slots, undo["embeddings"])
        self.labels.index_copy_(0, slots, undo["labels"])
        for f, v in self.values.items():
            v.index_copy_(0, slots, undo["values"][f])
        self.ptr, self.filled = undo["ptr"], undo["filled"]

    def _allocate(self, emb: Tensor, labels: Tensor, fields: dict[str, Tensor]) -> None:
        device = self.device or emb.device
        self.embeddings = torch.zeros(self.size, emb.shape[1], dtype=emb.dtype, device=device)
        self.labels = torch.zeros(self.size, dtype=labels.dtype, device=device)
        self.values = {
            f: torch.zeros(self.size, dtype=v.dtype, device=device) for f, v in fields.items()
        }

    # ------------------------------------------------------------------ training
    def forward(
        self,
        loss_fn: nn.Module,
        loss: Tensor,
        details: dict[str, Tensor],
        embeddings: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step: the batch ``loss`` plus the memory term, and the batch enqueued.

        ``details`` (the batch loss's) gives the ``fields`` to store; the memory term is
        logged as ``memory_loss`` (0 during the warm-up, so the log's columns stay fixed).
        """
        self.iteration += 1
        details = dict(details)
        if self.iteration <= self.start:
            details["memory_loss"] = torch.zeros((), dtype=loss.dtype, device=loss.device)
            return loss, details
        missing = [f for f in self.fields if f not in details]
        if missing:
            raise RuntimeError(f"the loss returned no {missing} for the memory to store")
        refs = None if self.filled == 0 else self.references()
        if refs is None:  # the first memory step: the batch against itself (detached copy)
            refs = References(
                embeddings[:0].detach(),
                labels[:0],
                {f: details[f][:0].detach() for f in self.fields},
            )
        term = loss_fn(embeddings, labels, memory=refs)
        self.enqueue(embeddings, labels, {f: details[f] for f in self.fields})
        details["memory_loss"] = term.detach()
        return loss + self.weight * term, details

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        """The queue (oldest first) and counters, as tensors and ints (``weights_only`` loads it)."""
        out: dict[str, Any] = {"iteration": self.iteration, "size": self.size}
        if self.filled:
            refs = self.contents()
            out["embeddings"] = refs.embeddings.detach().cpu().clone()
            out["labels"] = refs.labels.cpu().clone()
            out["fields"] = {f: v.cpu().clone() for f, v in refs.fields.items()}
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state`: the queue refilled oldest first, the counters restored."""
        if int(state["size"]) != self.size:
            raise ConfigError(
                f"the checkpoint's memory holds {state['size']} embeddings, this config "
                f"loss.memory_size={self.size}; resume with the size it was trained with"
            )
        self.embeddings = self.labels = None
        self.values, self.ptr, self.filled, self._undo = {}, 0, 0, None
        if "embeddings" in state:
            device = self.device or torch.device("cpu")
            fields = {f: v.to(device) for f, v in state["fields"].items()}
            self.enqueue(state["embeddings"].to(device), state["labels"].to(device), fields)
            self._undo = None
        self.iteration = int(state["iteration"])


def build_memory(
    node: Any, loss: nn.Module, loss_side: str, device: torch.device | str | None = None
) -> CrossBatchMemory | None:
    """The memory a loss config node asks for (``loss.memory``), or None; a one-line
    :class:`ConfigError` for a kind it does not know or a loss that has no pairs to join.

    ``loss_side`` names the loss in the error (``loss=proxy_anchor``).
    """
    kind = node.get("memory") if hasattr(node, "get") else None
    if kind is None:
        return None
    if kind not in MEMORY_KINDS:
        raise ConfigError(
            f"loss.memory={kind} is not a memory kind; use loss.memory=xbm or loss.memory=null"
        )
    needs = needs_of(loss)
    if not needs.takes_memory:
        raise ConfigError(
            f"{loss_side} does not take a cross-batch memory (loss.memory={kind} pairs the "
            "batch with stored embeddings, which pair losses such as contrastive, "
            "multi_similarity and osm_caa use); use one of them or drop loss.memory"
        )
    return CrossBatchMemory(
        size=node["memory_size"],
        start=node.get("memory_start", 0),
        weight=node.get("memory_weight", 1.0),
        fields=needs.memory_fields,
        device=device,
    )
