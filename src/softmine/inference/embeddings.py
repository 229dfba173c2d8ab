"""Saved embeddings: the vectors with their image paths, labels when known, and how they were made.

Two file formats, chosen by the suffix:

* ``.npz`` (NumPy): arrays ``embeddings`` (n, d) float32, ``paths`` (n,) str,
  ``labels`` (n,) int64 when known, ``classes`` (C,) str when the labels are
  indices of names, and ``meta`` (a JSON string). ``softmine-eval`` reads
  ``embeddings`` and ``labels`` from it like any retrieval archive.
* ``.parquet`` (Apache Arrow): one row per image with columns ``path``,
  ``label`` and ``class`` (when known) and ``embedding`` (a fixed-size list of
  float32); ``meta`` in the schema metadata under the key ``softmine``.

``meta`` records the model (checkpoint, weight fingerprint, backbone, embedding
size) and the settings (test-time flip, precision), so an index built from the
file can refuse queries embedded by another model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softmine.errors import ConfigError, DataError

FORMATS = (".npz", ".parquet")
META_KEY = b"softmine"


@dataclass
class Embeddings:
    """Embeddings of ``n`` items.

    Attributes:
        vectors: (n, d) float32.
        paths: where each item came from (an image path, or ``split/index`` for in-memory sets).
        labels: (n,) int64, or None when unknown.
        classes: names of the labels (``classes[label]``), or None when the labels are their own names.
        meta: the model and settings that made the vectors.
    """

    vectors: np.ndarray
    paths: list[str]
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise DataError(
                f"embeddings must be a 2-D array (n, d), got shape {self.vectors.shape}"
            )
        n = len(self.vectors)
        if len(self.paths) != n or (self.labels is not None and len(self.labels) != n):
            raise DataError(
                f"{n} embeddings but {len(self.paths)} paths"
                + ("" if self.labels is None else f" and {len(self.labels)} labels")
            )

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def label_name(self, i: int) -> str | int | None:
        """The label of item ``i`` as a user knows it: its class name, or the integer label."""
        if self.labels is None:
            return None
        label = int(self.labels[i])
        return self.classes[label] if self.classes is not None else label


def check_output_path(path: str | Path) -> Path:
    """Fail before any work when ``path`` has an unknown suffix or its folder cannot be written."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ConfigError(f"-o {path}: the output must end in {' or '.join(FORMATS)}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-o {path}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"-o {path}: its folder {folder} is not writable")
    return path


def save_embeddings(emb: Embeddings, path: str | Path) -> Path:
    """Write ``emb`` to ``.npz`` or ``.parquet`` (by the suffix) through a temporary file and a rename."""
    path = check_output_path(path)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    if path.suffix == ".npz":
        arrays: dict[str, np.ndarray] = {
            "embeddings": emb.vectors,
            "paths": np.array(emb.paths, dtype=str),
            "meta": np.array(json.dumps(emb.meta)),
        }
        if emb.labels is not None:
            arrays["labels"] = np.asarray(emb.labels, dtype=np.int64)
        if emb.classes is not None:
            arrays["classes"] = np.array(emb.classes, dtype=str)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, Any] = {"path": pa.array(emb.paths, type=pa.string())}
        if emb.labels is not None:
            columns["label"] = pa.array(np.asarray(emb.labels, dtype=np.int64))
            if emb.classes is not None:
                columns["class"] = pa.array([emb.classes[int(y)] for y in emb.labels])
        flat = pa.array(emb.vectors.reshape(-1), type=pa.float32())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, emb.dim)
        table = pa.table(columns).replace_schema_metadata(
            {META_KEY: json.dumps({**emb.meta, "classes": emb.classes})}
        )
        pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a file written by :func:`save_embeddings` (or any ``.npz`` with an ``embeddings`` array)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist; write one with softmine-embed")
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: embeddings files end in {' or '.join(FORMATS)}")
    try:
        if path.suffix == ".npz":
            return _load_npz(path)
        return _load_parquet(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"cannot read {path} as embeddings ({type(e).__name__}: {e}); write it with softmine-embed"
        ) from None


def _load_npz(path: Path) -> Embeddings:
    with np.load(path, allow_pickle=False) as data:
        if "embeddings" not in data.files:
            raise DataError(f"{path} has no `embeddings` array (it holds {sorted(data.files)})")
        vectors = data["embeddings"]
        paths = (
            [str(p) for p in data["paths"]]
            if "paths" in data.files
            else [f"{path.name}/{i}" for i in range(len(vectors))]
        )
        labels = data["labels"].astype(np.int64) if "labels" in data.files else None
        classes = [str(c) for c in data["classes"]] if "classes" in data.files else None
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    return Embeddings(vectors, paths, labels, classes, meta)


def _load_parquet(path: Path) -> Embeddings:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "embedding" not in table.column_names:
        raise DataError(f"{path} has no `embedding` column (it has {table.column_names})")
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size if hasattr(column.type, "list_size") else None
    values = column.flatten().to_numpy(zero_copy_only=False)
    if dim is None or dim <= 0:
        dim = len(values) // max(len(table), 1)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    classes = meta.pop("classes", None)
    labels = (
        table.column("label").to_numpy().astype(np.int64) if "label" in table.column_names else None
    )
    paths = (
        [str(p) for p in table.column("path").to_pylist()] if "path" in table.column_names else []
    )
    return Embeddings(values.reshape(len(table), dim), paths, labels, classes, meta)
