"""``softmine-eval``: evaluate a finished run, a checkpoint, or saved embeddings.

Examples::

    softmine-eval outputs/2026-11-28/12-00-00                # run folder: its last checkpoint
    softmine-eval outputs/.../checkpoints/last.pt           # a checkpoint file
    softmine-eval embeddings.npz                             # arrays `embeddings` and `labels`
    softmine-eval photos.parquet                             # softmine-embed output with labels
    softmine-eval reid.npz --ap market --rerank              # re-ID query/gallery arrays
    softmine-eval mars.npz --junk-pids=-1 --distractor-pids=0   # MARS / Market-1501 ids
    softmine-eval mars.npz --rerank --rerank-k1 7 --rerank-k2 3 --rerank-lambda 0.85

An ``.npz`` holds either ``embeddings`` (n, d) and ``labels`` (n,) for leave-one-out
retrieval, or the re-ID arrays ``query`` (q, d), ``query_pids``, ``query_camids``,
``gallery`` (g, d), ``gallery_pids``, ``gallery_camids`` for CMC/mAP under the
Market-1501/MARS rules. Every identity is real unless ``--junk-pids`` (removed from
the gallery) or ``--distractor-pids`` (kept as never-matching negatives) name it.
A ``.parquet`` (or ``.npz``) written by ``softmine-embed`` with labels is evaluated
the same way. ``--rerank`` adds the re-ID metrics after k-reciprocal re-ranking as
``rerank/<metric>`` beside the plain ones, with ``--rerank-k1``, ``--rerank-k2`` and
``--rerank-lambda`` (``evaluation.rerank_*`` of a run; for a run folder or checkpoint,
``--rerank`` replaces the run's own re-ranking settings). Prints the metrics as JSON;
``--out FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import open_dict

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.engine.evaluator import (
    REID_ARRAYS,
    RERANK_DEFAULTS,
    RETRIEVAL_ARRAYS,
    Evaluator,
    Scoring,
    reid_rule,
    score_embeddings,
)
from softmine.engine.setup import set_cpu_threads, set_tf32
from softmine.errors import ConfigError, DataError, SoftmineError
from softmine.inference.embeddings import load_embeddings
from softmine.inference.model import find_checkpoint, load_model

NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an empty one ends the list)


def evaluate_embeddings_file(
    path: Path,
    ks: list[int],
    *,
    ap: str = "standard",
    rerank: dict[str, float] | None = None,
    junk_pids: tuple[int, ...] = (),
    distractor_pids: tuple[int, ...] = (),
) -> dict[str, float]:
    """Metrics of an ``.npz`` of retrieval arrays (``embeddings``, ``labels``) or re-ID arrays,
    or of a ``.parquet`` of ``softmine-embed``. ``rerank``: ``{k1, k2, lambda_value}`` to add
    the re-ranked re-ID metrics (``rerank/*``), None for the plain ones alone.

    Scored by :func:`~softmine.engine.evaluator.score_embeddings`, the trainer's own
    scoring, under the :class:`~softmine.engine.evaluator.Scoring` these options give.
    """
    retrieval = Scoring("retrieval", ks=tuple(int(k) for k in ks))
    if path.suffix == ".parquet":
        emb = load_embeddings(path)
        if emb.labels is None:
            raise DataError(
                f"{path} has no labels to evaluate against; embed labelled images (one sub-folder "
                "per class, a list with labels, or --dataset-split)"
            )
        try:
            return score_embeddings({"embeddings": emb.vectors, "labels": emb.labels}, retrieval)
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
            reid = Scoring(
                "reid", rules={"": reid_rule(ap, junk_pids, distractor_pids)}, rerank=rerank
            )
            return score_embeddings({k: data[k] for k in REID_ARRAYS}, reid)
        if set(RETRIEVAL_ARRAYS) <= files:
            return score_embeddings({k: data[k] for k in RETRIEVAL_ARRAYS}, retrieval)
    except ValueError as e:  # inconsistent arrays: a data problem, reported in one line
        raise DataError(f"{path}: {e}") from e
    raise SoftmineError(
        f"{path} holds arrays {sorted(files)}; it needs either {list(RETRIEVAL_ARRAYS)} "
        f"(retrieval) or {list(REID_ARRAYS)} (re-ID); save them with np.savez"
    )


def evaluate_checkpoint(
    path: Path, device: str = "auto", rerank: dict[str, float] | None = None
) -> dict[str, float]:
    """Rebuild the model and evaluation split(s) from the checkpoint's config and evaluate it.

    Uses the run's own protocol: leave-one-out retrieval, or re-ID query/gallery. Under the
    run's ``data.on_bad_image=skip`` an unreadable item is left out and counted
    (``dropped_items/<split>``), as in training. ``rerank`` (``{k1, k2, lambda_value}``)
    turns re-ranking on with these settings in place of the run's ``evaluation.rerank*``.
    """
    loaded = load_model(path, device)
    if rerank is not None:
        with open_dict(loaded.config):
            loaded.config.evaluation.rerank = True
            loaded.config.evaluation.rerank_k1 = int(rerank["k1"])
            loaded.config.evaluation.rerank_k2 = int(rerank["k2"])
            loaded.config.evaluation.rerank_lambda = float(rerank["lambda_value"])
    set_cpu_threads(loaded.config.trainer.get("num_threads", "auto"))  # the run's own count
    if "tf32" in loaded.config.trainer:  # the run's own float32 (older runs: torch's default)
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


def _rerank(args: argparse.Namespace) -> dict[str, float] | None:
    """``--rerank`` and its settings as keyword arguments of the re-ranking; None without it."""
    given = {
        "--rerank-k1": args.rerank_k1,
        "--rerank-k2": args.rerank_k2,
        "--rerank-lambda": args.rerank_lambda,
    }
    if not args.rerank:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise ConfigError(f"{named[0]} sets the re-ranking; add --rerank to re-rank")
        return None
    k1, k2, lam = (
        d if v is None else v for v, d in zip(given.values(), RERANK_DEFAULTS.values(), strict=True)
    )
    if k1 < 1 or not 1 <= k2 <= k1 + 1 or not 0.0 <= lam <= 1.0:
        raise ConfigError(
            f"--rerank-k1 must be >= 1, --rerank-k2 in 1..k1+1 and --rerank-lambda in [0, 1] "
            f"(got {k1}, {k2}, {lam:g})"
        )
    return {"k1": int(k1), "k2": int(k2), "lambda_value": float(lam)}


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
    parser.add_argument(
        "--rerank",
        action="store_true",
        help="re-ID: also report the metrics after k-reciprocal re-ranking (rerank/<metric>)",
    )
    parser.add_argument(
        "--rerank-k1",
        type=int,
        help=f"with --rerank: size of the k-reciprocal sets (default {RERANK_DEFAULTS['k1']})",
    )
    parser.add_argument(
        "--rerank-k2",
        type=int,
        help=f"with --rerank: query-expansion neighbours, 1..k1+1 (default {RERANK_DEFAULTS['k2']})",
    )
    parser.add_argument(
        "--rerank-lambda",
        type=float,
        help="with --rerank: weight of the original distance, 0..1 "
        f"(default {RERANK_DEFAULTS['lambda_value']})",
    )
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
    rerank = _rerank(args)
    if args.path.suffix in (".npz", ".parquet"):
        metrics = evaluate_embeddings_file(
            args.path,
            args.ks,
            ap=args.ap,
            rerank=rerank,
            junk_pids=_id_list("--junk-pids", args.junk_pids),
            distractor_pids=_id_list("--distractor-pids", args.distractor_pids),
        )
    else:
        metrics = evaluate_checkpoint(find_checkpoint(args.path), args.device, rerank)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
