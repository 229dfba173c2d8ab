"""A faiss index of embeddings for cosine-similarity search, saved as a folder.

Vectors are L2-normalised and searched by inner product, so every score is a
cosine similarity in [-1, 1]. Index types:

* ``flat``: exact search (``IndexFlatIP``), every vector compared;
* ``hnsw``: a graph of the vectors (``IndexHNSWFlat``; ``hnsw_m`` links per node,
  ``ef_construction`` / ``ef_search`` candidates while building / searching),
  approximate but fast on millions of vectors, full vectors kept;
* ``ivfpq``: ``nlist`` k-means cells, each vector stored as ``pq_m`` codes of
  ``nbits`` bits (``IndexIVFPQ``), ``nprobe`` cells searched: approximate and compact;
  it needs at least ``2 ** nbits`` vectors to train its codebooks.

For the approximate types, :meth:`EmbeddingIndex.build` measures recall@10 against
exact search on a sample of the indexed vectors used as queries.

The folder holds ``index.faiss`` (the faiss index), ``items.npz`` (``paths``, and
``labels`` / ``classes`` when known) and ``index.json`` (type, settings, size,
recall, and the model and embedding settings that made the vectors).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from softmine.errors import ConfigError, DataError
from softmine.inference.embeddings import Embeddings

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_FILE, ITEMS_FILE, INFO_FILE = "index.faiss", "items.npz", "index.json"
RECALL_K, RECALL_SAMPLE = 10, 1000
FORMAT = 1


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 and contiguous, as faiss takes them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def require_finite(x: np.ndarray, paths: list[str], what: str) -> None:
    """Refuse vectors holding NaN or Inf: faiss would never return such an item, and such a
    query would match nothing (``what`` names them in the error, e.g. ``the queries``)."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        name = paths[first] if first < len(paths) else f"row {first}"
        raise DataError(
            f"{what} hold NaN or Inf in {int(bad.sum())} of {len(x)} rows (the first: {name}); "
            "embed them again with a model whose outputs are finite (softmine-embed)"
        )


def _auto_nlist(n: int) -> int:
    """Cells of an IVF index: about 4 sqrt(n), with at least 39 training vectors per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _auto_pq_m(d: int) -> int:
    """Sub-quantisers of a PQ code: 4-dimensional pieces when d allows, else the largest divisor <= d/4."""
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


@dataclass
class Hit:
    """One neighbour of a query: its rank (1 = nearest), item, path, cosine score and label."""

    rank: int
    item: int
    path: str
    score: float
    label: str | int | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "path": self.path, "score": self.score}
        if self.label is not None:
            out["label"] = self.label
        return out


class EmbeddingIndex:
    """A faiss index over the embeddings of ``items`` (paths and labels), with its ``info`` record."""

    def __init__(self, index: faiss.Index, items: Embeddings, info: dict[str, Any]) -> None:
        self.index, self.items, self.info = index, items, info

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        emb: Embeddings,
        kind: str = "flat",
        *,
        source: str = "the embeddings",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int | None = None,
        nbits: int = 8,
        nprobe: int | None = None,
        seed: int = 0,
    ) -> EmbeddingIndex:
        """Index ``emb`` with faiss; see the module docstring for the types and their settings.

        ``source`` names the embeddings in an error (their file, say).
        """
        if kind not in INDEX_TYPES:
            raise ConfigError(f"--type must be one of {INDEX_TYPES} (got {kind!r})")
        require_finite(emb.vectors, emb.paths, source)
        x = normalize(emb.vectors)
        n, d = x.shape
        if n == 0:
            raise DataError("no embeddings to index")
        settings: dict[str, Any] = {}
        if kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
            index.hnsw.efSearch = int(ef_search)
            settings = {
                "hnsw_m": int(hnsw_m),
                "ef_construction": int(ef_construction),
                "ef_search": int(ef_search),
            }
        else:
            index, settings = _ivfpq(x, nlist, pq_m, nbits, nprobe, seed)
        index.add(x)
        info: dict[str, Any] = {
            "format": FORMAT,
            "type": kind,
            "metric": "cosine",
            "count": n,
            "dim": d,
            "settings": settings,
            "embeddings": emb.meta,
        }
        built = cls(index, emb, info)
        if kind != "flat":
            info["recall@10"], info["recall_sample"] = built.recall_against_exact(x, seed=seed)
        return built

    def recall_against_exact(
        self, x: np.ndarray, k: int = RECALL_K, sample: int = RECALL_SAMPLE, seed: int = 0
    ) -> tuple[float, int]:
        """(recall@k of this index against exact search, number of queries), on a seeded sample of ``x``.

        Recall@k here is the usual one for approximate search: the fraction of the
        exact k nearest neighbours that this index also returns in its top k.
        """
        x = normalize(x)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
        k = min(k, len(x))
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        _, want = exact.search(x[pick], k)
        _, got = self.index.search(x[pick], k)
        found = [len(set(w.tolist()) & set(g.tolist())) for w, g in zip(want, got, strict=True)]
        return float(np.sum(found) / (k * len(pick))), len(pick)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        """Write the index folder (created if needed; files replaced atomically)."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot create the index folder {folder} ({e.strerror or e})"
            ) from None
        tmp = folder / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, folder / INDEX_FILE)
        arrays: dict[str, np.ndarray] = {"paths": np.array(self.items.paths, dtype=str)}
        if self.items.labels is not None:
            arrays["labels"] = np.asarray(self.items.labels, dtype=np.int64)
        if self.items.classes is not None:
            arrays["classes"] = np.array(self.items.classes, dtype=str)
        tmp = folder / (ITEMS_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / ITEMS_FILE)
        tmp = folder / (INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(self.info, indent=2) + "\n")
        os.replace(tmp, folder / INFO_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        """Read an index folder written by :meth:`save`."""
        folder = Path(folder)
        missing = [f for f in (INDEX_FILE, ITEMS_FILE, INFO_FILE) if not (folder / f).is_file()]
        if not folder.is_dir() or missing:
            raise DataError(
                f"{folder} is not an index folder (missing {', '.join(missing) or 'the folder'}); "
                "build one with softmine-index build EMBEDDINGS -o FOLDER"
            )
        try:
            info = json.loads((folder / INFO_FILE).read_text())
            index = faiss.read_index(str(folder / INDEX_FILE))
            with np.load(folder / ITEMS_FILE, allow_pickle=False) as data:
                paths = [str(p) for p in data["paths"]]
                labels = data["labels"].astype(np.int64) if "labels" in data.files else None
                classes = [str(c) for c in data["classes"]] if "classes" in data.files else None
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise DataError(
                f"cannot read the index folder {folder} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "rebuild it with softmine-index build"
            ) from None
        if index.ntotal != len(paths):
            raise DataError(
                f"{folder}: the index holds {index.ntotal} vectors but {ITEMS_FILE} lists "
                f"{len(paths)} items; rebuild it with softmine-index build"
            )
        items = Embeddings(np.zeros((len(paths), 0), np.float32), paths, labels, classes)
        return cls(index, items, info)

    # ------------------------------------------------------------------ search
    def model_fingerprint(self) -> str | None:
        """Weight fingerprint of the model that made the indexed embeddings (None if unknown)."""
        return (self.info.get("embeddings") or {}).get("model", {}).get("fingerprint")

    def check_queries_from(self, model: dict[str, Any] | None, what: str) -> None:
        """Refuse queries embedded by another model than the indexed vectors (``model``: its ``describe()``)."""
        if not model:
            return
        dim = model.get("embedding_dim")
        if dim is not None and int(dim) != self.dim:
            raise DataError(
                f"index/model mismatch: {what} makes {dim}-d embeddings but the index holds "
                f"{self.dim}-d ones; query with the model the index was built from"
            )
        mine = self.model_fingerprint()
        theirs = model.get("fingerprint")
        if mine and theirs and mine != theirs:
            built = (self.info.get("embeddings") or {}).get("model", {}).get("checkpoint", "?")
            raise DataError(
                f"index/model mismatch: {what} (weights {theirs}) is not the model the index was "
                f"built from ({built}, weights {mine}); query with that model, or rebuild the index "
                "from embeddings of this one"
            )

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Search-time settings: cells visited (ivfpq) or graph candidates (hnsw); more is slower and more exact."""
        if nprobe is not None and hasattr(self.index, "nprobe"):
            self.index.nprobe = int(nprobe)
        if ef_search is not None and hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = int(ef_search)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        names: list[str] | None = None,
        source: str = "the queries",
    ) -> list[list[Hit]]:
        """The ``k`` nearest items of each query by cosine similarity, best first.

        ``names`` (a path per query) and ``source`` name a non-finite query in the error.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(
                f"queries of dimension {queries.shape[-1] if queries.ndim else 0} do not fit this "
                f"index of {self.dim}-d embeddings; embed them with the model the index was built from"
            )
        if int(k) < 1:
            raise ConfigError(f"-k must be >= 1 (got {k})")
        require_finite(queries, names or [], source)
        k = min(int(k), len(self))
        scores, ids = self.index.search(normalize(queries), k)
        return [
            [
                Hit(r + 1, int(i), self.items.paths[i], float(s), self.items.label_name(int(i)))
                for r, (s, i) in enumerate(zip(row_s, row_i, strict=True))
                if i >= 0
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


def _ivfpq(
    x: np.ndarray, nlist: int | None, pq_m: int | None, nbits: int, nprobe: int | None, seed: int
) -> tuple[faiss.Index, dict[str, Any]]:
    n, d = x.shape
    nlist = int(nlist) if nlist else _auto_nlist(n)
    pq_m = int(pq_m) if pq_m else _auto_pq_m(d)
    nbits = int(nbits)
    if d % pq_m:
        raise ConfigError(f"--pq-m {pq_m} must divide the embedding dimension {d}")
    need = max(nlist, 2**nbits)
    if n < need:
        raise ConfigError(
            f"an ivfpq index of {nlist} cells and {nbits}-bit codes needs at least {need} "
            f"embeddings to train, got {n}; use --type flat or hnsw, or lower --nbits / --nlist"
        )
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    for cp in (index.cp, index.pq.cp):  # k-means of the cells and of the codebooks
        cp.seed = seed
        cp.min_points_per_centroid = 1  # no faiss warning per codebook: the recall printed tells
    index.train(x)
    nprobe = int(nprobe) if nprobe else min(nlist, max(1, nlist // 4))
    index.nprobe = nprobe
    return index, {"nlist": nlist, "pq_m": pq_m, "nbits": nbits, "nprobe": nprobe}
