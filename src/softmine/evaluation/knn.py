"""Exact k-nearest-neighbour search on L2-normalised embeddings with faiss, in bounded memory.

Cosine similarity is the inner product of L2-normalised vectors; it is searched
exactly with a flat inner-product index (``faiss.IndexFlatIP``, moved to the GPU
when faiss was built with GPU support and a GPU is visible). The database is
normalised and added to the index ``add_chunk`` rows at a time and the queries
are normalised and searched ``chunk`` rows at a time, so apart from the caller's
own arrays the memory holds one normalised copy of the database (the index),
one query chunk and its ``chunk x k`` results: never an N x N matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from softmine.errors import ConfigError

#: A numpy array, or a torch tensor (read through its ``detach``/``cpu``/``numpy`` methods,
#: so this module never imports torch).
ArrayLike = np.ndarray | Any

#: Largest k that faiss's GPU k-selection supports; larger searches run on the CPU.
GPU_MAX_K = 2048
#: Default bound on ``query rows x k`` of one search chunk (results are 12 bytes each).
MAX_CHUNK_ELEMENTS = 1 << 22
#: Default upper bound on the query rows of one search chunk.
CHUNK_ROWS = 16384
#: Database rows normalised and added to the index at a time.
ADD_CHUNK_ROWS = 8192

_GPU_RESOURCES: dict[int, object] = {}


class NonFiniteEmbeddings(ValueError):
    """Embeddings holding NaN or Inf (a model whose weights or activations overflowed)."""


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor, told without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def as_array(x: ArrayLike) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) numpy array, copied only when its type requires it."""
    if _is_tensor(x):
        x = x.detach().cpu().float().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (n, dim) array, got shape {x.shape}")
    return x


def normalized_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy of the rows ``x`` with unit L2 norm (all-zero rows stay zero); rejects NaN/Inf."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise NonFiniteEmbeddings("embeddings contain NaN or Inf; check the model's output")
    faiss.normalize_L2(out)
    return out


def as_float32(x: ArrayLike, normalize: bool = True) -> np.ndarray:
    """A C-contiguous float32 (n, d) numpy copy of ``x``, L2-normalised by default; rejects NaN/Inf."""
    x = as_array(x)
    if normalize:
        return normalized_rows(x)
    if not np.isfinite(x).all():
        raise NonFiniteEmbeddings("embeddings contain NaN or Inf; check the model's output")
    return x.copy()


def as_labels(y: ArrayLike) -> np.ndarray:
    """A 1-D int64 numpy copy of ``y`` (integer ids; whole-number floats are accepted)."""
    if _is_tensor(y):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError("labels must be whole numbers (class / identity ids)")
    if y.dtype.kind not in "iubf":
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return (
        hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    )


def resolve_faiss_device(device: str = "auto") -> int | None:
    """The GPU id faiss should use for ``device`` (``auto | cpu | cuda | cuda:N``), or None for the CPU."""
    if device == "cpu":
        return None
    if device == "auto":
        return 0 if faiss_gpu_available() else None
    if device == "cuda" or device.startswith("cuda:"):
        gpu = int(device.split(":", 1)[1]) if ":" in device else 0
        if not faiss_gpu_available():
            raise ConfigError(
                f"device={device!r} but this faiss has no GPU support or sees no GPU "
                "(faiss-cpu is installed by default); install faiss-gpu or use device=cpu"
            )
        return gpu
    raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def _gpu_resources(gpu: int) -> object:
    """One faiss ``StandardGpuResources`` per GPU, created on first use and kept (it owns scratch memory)."""
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[gpu]


def build_flat_index(
    base: ArrayLike,
    *,
    device: str = "auto",
    k: int | None = None,
    normalize: bool = True,
    add_chunk: int = ADD_CHUNK_ROWS,
) -> faiss.Index:
    """A flat inner-product index holding ``base`` (L2-normalised chunk by chunk when ``normalize``).

    It lives on the GPU when ``device`` resolves to one and ``k`` (the largest k that
    will be searched) is within :data:`GPU_MAX_K`; otherwise on the CPU.
    """
    base = as_array(base)
    n, d = base.shape
    index = faiss.IndexFlatIP(d)
    gpu = resolve_faiss_device(device)
    if gpu is not None and (k is None or k <= GPU_MAX_K):
        index = faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, index)
        for start in range(0, n, add_chunk):
            chunk = base[start : start + add_chunk]
            index.add(normalized_rows(chunk) if normalize else _finite(chunk))
        return index
    # CPU: size the flat storage (row-major float32, IndexFlat's layout) once and fill it in
    # place, instead of growing it add by add (each growth copies and briefly doubles it).
    index.codes.resize(n * d * 4)
    storage = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    for start in range(0, n, add_chunk):
        rows = storage[start : start + add_chunk]
        rows[:] = _finite(base[start : start + add_chunk])
        if normalize:
            faiss.normalize_L2(rows)
    index.ntotal = n
    return index


def _finite(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise NonFiniteEmbeddings("embeddings contain NaN or Inf; check the model's output")
    return x


def chunk_rows(k: int, chunk_size: int | None = None) -> int:
    """Query rows per search chunk: ``chunk_size`` if given, else the most that keep rows x k bounded."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, min(CHUNK_ROWS, MAX_CHUNK_ELEMENTS // max(k, 1)))


def iter_knn(
    queries: ArrayLike,
    gallery: ArrayLike | None = None,
    k: int = 8,
    *,
    exclude_self: bool = False,
    normalize: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, similarities, indices)`` per query chunk; both arrays (rows, min(k, available)).

    Rows are the queries ``start:start+rows`` in order, neighbours by decreasing cosine
    similarity. ``gallery=None`` searches the queries themselves; ``exclude_self=True``
    then drops each query's own index (by index, not by value, so exact duplicates of
    a query still count as its neighbours). When ``exclude_self`` and the query was not
    among the ``k + 1`` results (ties of duplicates), the last result is dropped instead.
    """
    q = as_array(queries)
    base = q if gallery is None else as_array(gallery)
    if exclude_self and gallery is not None:
        raise ValueError("exclude_self only applies to leave-one-out search (gallery=None)")
    if q.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but the gallery has dim {base.shape[1]}")
    if base.shape[0] == 0:
        raise ValueError("the gallery is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    extra = int(exclude_self)
    k_search = min(k + extra, base.shape[0])
    index = build_flat_index(base, device=device, k=k_search, normalize=normalize)
    rows = chunk_rows(k_search, chunk_size)
    for start in range(0, q.shape[0], rows):
        chunk = q[start : start + rows]
        s, i = index.search(normalized_rows(chunk) if normalize else _finite(chunk), k_search)
        if exclude_self:
            s, i = _drop_self(s, i, np.arange(start, start + len(chunk)))
        yield start, s, i


def knn_search(
    queries: ArrayLike,
    gallery: ArrayLike | None = None,
    k: int = 8,
    *,
    exclude_self: bool = False,
    normalize: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of every query: (similarities float32, indices int64), both (nq, k').

    ``k' = min(k, gallery size)`` (one less available with ``exclude_self``). Searched in
    chunks by :func:`iter_knn`; memory holds the index plus these (nq, k') results.
    """
    parts = list(
        iter_knn(
            queries,
            gallery,
            k,
            exclude_self=exclude_self,
            normalize=normalize,
            device=device,
            chunk_size=chunk_size,
        )
    )
    if not parts:
        return np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _drop_self(s: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index; rows where it was not returned lose their last column."""
    is_self = i == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    n, k = s.shape
    return s[keep].reshape(n, k - 1), i[keep].reshape(n, k - 1)
