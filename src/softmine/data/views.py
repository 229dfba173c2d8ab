"""A wrapper that changes some of a dataset's attributes and forwards every other one.

:class:`~softmine.data.noise.NoisyLabels` (flipped labels) and
:class:`~softmine.data.splits.ClassSubset` (held-out classes) both wrap a training
split; the trainer and the samplers must see the wrapper as the dataset itself, so
any attribute the wrapper does not own is read from, and written to, the wrapped one.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch.utils.data import Dataset


class DatasetView(Dataset):
    """Owns the attributes named in ``OWN`` (plus ``dataset``); forwards the rest to ``dataset``.

    Subclasses set their own attributes with ``object.__setattr__`` in ``__init__``.
    """

    OWN: ClassVar[frozenset[str]] = frozenset({"dataset"})
    #: A view changes indices or labels, which the wrapped set's batched fetch (``get_batch``
    #: of an in-memory set) would bypass: a view has none unless it defines its own.
    get_batch: Any = None

    def __getattr__(self, name: str) -> Any:
        # Called only for names not found on the wrapper: forward them to the dataset.
        if name in self.OWN or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)
