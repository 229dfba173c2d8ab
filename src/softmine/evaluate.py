"""``softmine-eval``: evaluate a finished run, a checkpoint, or saved embeddings.

Examples::

    softmine-eval outputs/2026-11-28/12-00-00                # run folder: its last checkpoint
    softmine-eval outputs/.../checkpoints/last.pt           # a checkpoint file
    softmine-eval embeddings.npz                             # arrays `embeddings` and `labels`
    softmine-eval reid.npz --ap market --rerank              # re-ID query/gallery arrays

An ``.npz`` holds either ``embeddings`` (n, d) and ``labels`` (n,) for leave-one-out
retrieval, or the re-ID arrays ``query`` (q, d), ``query_pids``, ``query_camids``,
``gallery`` (g, d), ``gallery_pids``, ``gallery_camids`` for CMC/mAP under the
Market-1501/MARS rules. Prints the metrics as JSON; ``--out FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from softmine.cli import user_errors_exit
from softmine.config import build
from softmine.engine.checkpoint import load_checkpoint, load_state_checked
from softmine.engine.evaluator import Evaluator
from softmine.engine.setup import resolve_device
from softmine.engine.trainer import CHECKPOINT_DIR, run_time_sizes
from softmine.errors import DataError, SoftmineError
from softmine.evaluation import reid_metrics, retrieval_metrics


def _find_checkpoint(path: Path) -> Path:
    if path.is_dir():
        ckpt = path / CHECKPOINT_DIR / "last.pt"
        if not ckpt.exists():
            raise SoftmineError(f"no checkpoint at {ckpt}; is {path} a softmine run folder?")
        return ckpt
    if not path.exists():
        raise SoftmineError(f"{path} does not exist; give a run folder, a .pt checkpoint or a .npz")
    return path


NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an empty one ends the list)
RETRIEVAL_ARRAYS = ("embeddings", "labels")
REID_ARRAYS = ("query", "query_pids", "query_camids", "gallery", "gallery_pids", "gallery_camids")


def evaluate_embeddings_file(
    path: Path, ks: list[int], *, ap: str = "standard", rerank: bool = False
) -> dict[str, float]:
    """Metrics of an ``.npz`` of retrieval arrays (``embeddings``, ``labels``) or re-ID arrays."""
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
            return reid_metrics(*(data[k] for k in REID_ARRAYS), ap=ap, rerank=rerank)
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

    Uses the run's own protocol: leave-one-out retrieval, or re-ID query/gallery.
    """
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise SoftmineError(f"{path} is not a softmine checkpoint (no 'config'/'model' entries)")
    cfg = OmegaConf.create(state["config"])
    dev = resolve_device(device)
    evaluator = Evaluator(cfg, dev)
    sizes = run_time_sizes(
        cfg.backbone, int(state.get("num_classes", 0)) or None, int(cfg.backbone.embedding_dim)
    )
    model = build(cfg.backbone, "backbone", **sizes)
    load_state_checked(model, state["model"], "model", path)
    return evaluator.evaluate(model.to(dev))


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="softmine-eval", description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="run folder, checkpoint (.pt) or embeddings (.npz)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--ks", default="1,2,4,8", help="comma-separated K of Recall@K (npz only)")
    parser.add_argument(
        "--ap",
        default="standard",
        choices=["standard", "market"],
        help="re-ID AP: standard (non-interpolated) or market (official MATLAB trapezoid)",
    )
    parser.add_argument("--rerank", action="store_true", help="re-ID: k-reciprocal re-ranking")
    parser.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.path.suffix == ".npz":
        ks = [int(k) for k in args.ks.split(",")]
        metrics = evaluate_embeddings_file(args.path, ks, ap=args.ap, rerank=args.rerank)
    else:
        metrics = evaluate_checkpoint(_find_checkpoint(args.path), args.device)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
