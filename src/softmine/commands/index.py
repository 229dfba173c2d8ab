"""``softmine-index``: build a faiss index of saved embeddings, and search it by image or by embeddings.

Examples::

    softmine-index build photos.npz -o photos.index --type hnsw
    softmine-index search photos.index --image query.jpg -k 5
    softmine-index search photos.index --embeddings queries.parquet --json

``build`` reads a file of ``softmine-embed`` (``.npz`` or ``.parquet``) and writes
a folder with the index, the paths and labels, and ``index.json`` (the model and
settings); for ``hnsw`` and ``ivfpq`` it prints their recall@10 against exact
search. ``search`` prints each query's nearest items with their cosine scores
(``--json``: one list per query of ``{rank, path, score, label}`` objects). Query
images are embedded by the model the index was built from (or ``--model``), with
the same flip and precision settings; another model is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.errors import ConfigError
from softmine.inference.embeddings import load_embeddings
from softmine.inference.search_index import INDEX_TYPES, EmbeddingIndex, Hit


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="softmine-index", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,search}")
    b = sub.add_parser("build", help="index a file of embeddings")
    b.add_argument("embeddings", type=Path, help="output of softmine-embed (.npz or .parquet)")
    b.add_argument("-o", "--out", type=Path, required=True, help="index folder to write")
    b.add_argument("--type", default="flat", choices=INDEX_TYPES, help="default: flat (exact)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per vector (default: 32)")
    b.add_argument("--ef-construction", type=int, default=200, help="hnsw: build candidates (200)")
    b.add_argument("--ef-search", type=int, default=128, help="hnsw: search candidates (128)")
    b.add_argument("--nlist", type=int, help="ivfpq: k-means cells (default: ~4 sqrt(n))")
    b.add_argument("--pq-m", type=int, help="ivfpq: codes per vector (default: dimension / 4)")
    b.add_argument("--nbits", type=int, default=8, help="ivfpq: bits per code (default: 8)")
    b.add_argument("--nprobe", type=int, help="ivfpq: cells searched (default: nlist / 4)")
    b.add_argument("--seed", type=int, default=0, help="k-means and recall sample seed (0)")
    s = sub.add_parser("search", help="nearest items of query images or embeddings")
    s.add_argument("index", type=Path, help="index folder (softmine-index build)")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument(
        "--image", type=Path, action="append", metavar="PATH", help="query image (repeatable)"
    )
    q.add_argument(
        "--embeddings", type=Path, metavar="FILE", help="query embeddings (.npz/.parquet)"
    )
    s.add_argument(
        "--model", type=Path, help="with --image: run folder or checkpoint (default: the index's)"
    )
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    s.add_argument("--json", action="store_true", help="print JSON: a list of hits per query")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    s.add_argument("--nprobe", type=int, help="ivfpq: cells searched (default: as built)")
    s.add_argument("--ef-search", type=int, help="hnsw: search candidates (default: as built)")
    return p


def cmd_build(args) -> None:  # noqa: ANN001 - argparse namespace
    emb = load_embeddings(args.embeddings)
    index = EmbeddingIndex.build(
        emb,
        args.type,
        source=f"the embeddings in {args.embeddings}",
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        pq_m=args.pq_m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        seed=args.seed,
    )
    index.info["source"] = str(args.embeddings)
    index.save(args.out)
    line = f"indexed {len(index)} embeddings ({index.dim}-d, {args.type}) in {args.out}"
    if "recall@10" in index.info:
        line += (
            f"; recall@10 against exact search: {index.info['recall@10']:.4f} "
            f"({index.info['recall_sample']} sampled queries)"
        )
    print(line)


def _query_images(index: EmbeddingIndex, args) -> tuple[np.ndarray, list[str]]:  # noqa: ANN001
    from softmine.inference.extract import embed_images
    from softmine.inference.model import load_model

    made = (index.info.get("embeddings") or {}).get("model") or {}
    model = args.model
    if model is None:
        if not made.get("checkpoint"):
            raise ConfigError(
                f"{args.index} does not record the model its embeddings came from; pass --model"
            )
        model = Path(made["checkpoint"])
        if not model.exists():
            raise ConfigError(
                f"the index's model {model} is no longer there; pass --model RUN_OR_CHECKPOINT"
            )
    loaded = load_model(model, args.device)
    index.check_queries_from(loaded.describe(), f"the model {model}")
    settings = index.info.get("embeddings") or {}
    result = embed_images(
        loaded,
        [str(p) for p in args.image],
        flip=bool(settings.get("flip", False)),
        precision=str(settings.get("precision", "32")),
        num_workers=0,
        progress=False,
        bad_image_hint="give a readable query image",
    )
    return result.embeddings.vectors, [str(p) for p in args.image]


def cmd_search(args) -> None:  # noqa: ANN001 - argparse namespace
    index = EmbeddingIndex.load(args.index)
    index.tune(nprobe=args.nprobe, ef_search=args.ef_search)
    if args.image:
        queries, names = _query_images(index, args)
        source = "the query images' embeddings"
    else:
        emb = load_embeddings(args.embeddings)
        index.check_queries_from(
            {"embedding_dim": emb.dim, **(emb.meta.get("model") or {})},
            f"the embeddings {args.embeddings}",
        )
        queries, names = emb.vectors, emb.paths
        source = f"the query embeddings in {args.embeddings}"
    hits = index.search(queries, args.k, names, source)
    if args.json:
        print(json.dumps([[h.as_dict() for h in row] for row in hits], indent=2))
        return
    for name, row in zip(names, hits, strict=True):
        print(format_hits(name, row))


def format_hits(query: str, hits: list[Hit]) -> str:
    """A query's neighbours as a small table: rank, cosine score, label, path."""
    lines = [f"query {query}", f"{'rank':>6}  {'score':>7}  {'label':<12}  path"]
    for h in hits:
        label = "" if h.label is None else str(h.label)
        lines.append(f"{h.rank:>6}  {h.score:7.4f}  {label:<12}  {h.path}")
    return "\n".join(lines)


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        cmd_build(args)
    else:
        cmd_search(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
