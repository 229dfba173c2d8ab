"""``softmine-eval``: evaluate a finished run, a checkpoint, or saved embeddings.

Examples::

    softmine-eval outputs/2026-11-28/12-00-00                # run folder: its last checkpoint
    softmine-eval outputs/.../checkpoints/last.pt           # a checkpoint file
    softmine-eval embeddings.npz                             # arrays `embeddings` and `labels`
    softmine-eval photos.parquet                             # softmine-embed output with labels
    softmine-eval reid.npz --ap market --rerank              # re-ID query/gallery arrays
    softmine-eval mars.npz --junk-pids=-1 --distractor-pids=0   # MARS / Market-1501 ids

An ``.npz`` holds either ``embeddings`` (n, d) and ``labels`` (n,) for leave-one-out
retrieval, or the re-ID arrays ``query`` (q, d), ``query_pids``, ``query_camids``,
``gallery`` (g, d), ``gallery_pids``, ``gallery_camids`` for CMC/mAP under the
Market-1501/MARS rules. Every identity is real unless ``--junk-pids`` (removed from
the gallery) or ``--distractor-pids`` (kept as never-matching negatives) name it.
A ``.parquet`` (or ``.npz``) written by ``softmine-embed`` with labels is evaluated
the same way. Prints the metrics as JSON; ``--out FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np

from softmine.cli import ArgumentParser, user_errors_exit
from softmine.engine.evaluator import Evaluator
from softmine.engine.setup import set_cpu_threads, set_tf32
from softmine.errors import ConfigError, DataError, SoftmineError
from softmine.evaluation import reid_metrics, retrieval_metrics
from softmine.inference.embeddings import load_embeddings
from softmine.inference.model import find_checkpoint, load_model

NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an empty one ends the list)
RETRIEVAL_ARRAYS = ("embeddings", "labels")
REID_ARRAYS = ("query", "query_pids", "query_camids", "gallery", "gallery_pids", "gallery_camids")


def evaluate_embeddings_file(
    path: Path,
    ks: list[int],
    *,
    ap: str = "standard",
    rerank: bool = False,
    junk_pids: tuple[int, ...] = (),
    distractor_pids: tuple[int, ...] = (),
) -> dict[str, float]:
    """Metrics of an ``.npz`` of retrieval arrays (``embeddings``, ``labels``) or re-ID arrays,
    or of a ``.parquet`` of ``softmine-embed``."""
    if path.suffix == ".parquet":
        emb = load_embeddings(path)
        if emb.labels is None:
            raise DataError(
                f"{path} has no labels to evaluate against; embed labelled images (one sub-folder "
                "per class, a list with labels, or --dataset-split)"
            )
        try:
            return retrieval_metrics(emb.vectors, emb.labels, ks)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from e
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    if head not in NPZ_MAGIC:
        kind = "empty" if not head else "not an .npz archive (a zip file written by np.savez)"
        raise DataError(f"{path} is {kind}; save the arrays with np.savez")
    try:
        data = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{path} is a damaged .npz archive ({str(e).splitlines()[0] if str(e) else e}); "
            "save the arrays again with np.savez"
        ) from e
    files = set(data.files)
    try:
        if set(REID_ARRAYS) <= files:
            return reid_metrics(
                *(data[k] for k in REID_ARRAYS),
                ap=ap,
                rerank=rerank,
                junk_pids=junk_pids,
                distractor_pids=distractor_pids,
            )
        if set(RETRIEVAL_ARRAYS) <= files:
            return retrieval_metrics(data["embeddings"], data["labels"], ks)
    except ValueError as e:  # inconsistent arrays: a data problem, reported in one line
        raise DataError(f"{path}: {e}") from e
    raise SoftmineError(
        f"{path} holds arrays {sorted(files)}; it needs either {list(RETRIEVAL_ARRAYS)} "
        f"(retrieval) or {list(REID_ARRAYS)} (re-ID); save them with np.savez"
    )


def evaluate_checkpoint(path: Path, device: str = "auto") -> dict[str, float]:
    """Rebuild the model and evaluation split(s) from the checkpoint's config and evaluate it.

    Uses the run's own protocol: leave-one-out retrieval, or re-ID query/gallery. Under the
    run's ``data.on_bad_image=skip`` an unreadable item is left out and counted
    (``dropped_items/<split>``), as in training.
    """
    loaded = load_model(path, device)
    set_cpu_threads(loaded.config.trainer.get("num_threads", "auto"))  # the run's own count
    if (
        "tf32" in loaded.config.trainer
    ):  # the run's own float32 (runs before the key: torch's defaults)
        set_tf32(bool(loaded.config.trainer.tf32))
    evaluator = Evaluator(loaded.config, loaded.device)
    metrics = evaluator.evaluate(loaded.model)
    return {**metrics, **evaluator.dropped_counts()}  # dropped_items/*, as in metrics.json


def _id_list(option: str, text: str) -> tuple[int, ...]:
    """``"-1,0"`` -> ``(-1, 0)``; an empty string is no identities."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"{option} takes comma-separated integer identities, e.g. {option}=-1,0; got {text!r}"
        ) from None


def _ks(text: str) -> list[int]:
    """``--ks 1,2,4,8`` -> ``[1, 2, 4, 8]``; anything but whole numbers >= 1 is a usage error."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(
            f"give comma-separated whole numbers >= 1, e.g. --ks 1,2,4,8 (got {text!r})"
        )
    return ks


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="softmine-eval", description=__doc__.split("\n")[0])
    parser.add_argument(
        "path", type=Path, help="run folder, checkpoint (.pt) or embeddings (.npz, .parquet)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument(
        "--ks", type=_ks, default="1,2,4,8", help="comma-separated K of Recall@K (npz only)"
    )
    parser.add_argument(
        "--ap",
        default="standard",
        choices=["standard", "market"],
        help="re-ID AP: standard (non-interpolated) or market (official MATLAB trapezoid)",
    )
    parser.add_argument("--rerank", action="store_true", help="re-ID: k-reciprocal re-ranking")
    parser.add_argument(
        "--junk-pids",
        default="",
        help="re-ID (npz only): comma-separated identities removed from the gallery (MARS: -1)",
    )
    parser.add_argument(
        "--distractor-pids",
        default="",
        help="re-ID (npz only): comma-separated identities that never match (MARS: 0)",
    )
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.path.suffix in (".npz", ".parquet"):
        metrics = evaluate_embeddings_file(
            args.path,
            args.ks,
            ap=args.ap,
            rerank=args.rerank,
            junk_pids=_id_list("--junk-pids", args.junk_pids),
            distractor_pids=_id_list("--distractor-pids", args.distractor_pids),
        )
    else:
        metrics = evaluate_checkpoint(find_checkpoint(args.path), args.device)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
