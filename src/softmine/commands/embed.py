"""``softmine-embed``: embed images with a trained model, to ``.npz`` or ``.parquet``.

Examples::

    softmine-embed outputs/2026-12-01/12-00-00 --images photos/ -o photos.npz
    softmine-embed RUN --images 'shots/*.jpg' extra/query.png more_photos/ -o mixed.npz
    softmine-embed RUN --list files.txt -o emb.parquet --flip --precision bf16
    softmine-embed RUN --dataset-split test -o test.npz && softmine-eval test.npz

MODEL is a run folder or a ``.pt`` checkpoint. Images go through the run's own
test transform and input normalisation, in batches, on the GPU when there is one.
``--images PATH ...`` takes folders (every image file below one, sub-folders included;
the first sub-folder's name is the label), image files and quoted glob patterns
(``'photos/*.jpg'``, ``'shots/**/*.png'``), mixed; labels are kept when every PATH is
a folder that gives them. ``--list FILE`` takes ``PATH`` or ``PATH<TAB>LABEL``
lines; ``--dataset-split`` embeds a split of the run's own dataset with its labels.
The output holds the embeddings, the paths, the labels when known and the model's
fingerprint; ``softmine-eval`` and ``softmine-index build`` read it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.data.images import BAD_IMAGE_POLICIES
from softmine.engine.precision import PRECISIONS
from softmine.inference.embeddings import check_output_path, save_embeddings
from softmine.inference.extract import embed_images, embed_split
from softmine.inference.image_files import collect_images, read_image_list
from softmine.inference.model import find_checkpoint, load_model
from softmine.runs.layout import bad_images_beside

SHOWN_BAD = 3  # unreadable files named in the warning line (all of them go to the list file)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="softmine-embed", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="run folder or checkpoint (.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="folders (every image below), image files and quoted glob patterns ('photos/*.jpg')",
    )
    src.add_argument("--list", type=Path, metavar="FILE", help="PATH or PATH<TAB>LABEL lines")
    src.add_argument(
        "--dataset-split", metavar="SPLIT", help="a split of the run's dataset: test, train, ..."
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output file: .npz or .parquet")
    p.add_argument(
        "--flip", action="store_true", help="average with the mirrored image's embedding"
    )
    p.add_argument("--precision", default="32", choices=list(PRECISIONS), help="default: 32")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--num-workers", default="auto", help="image-decoding processes (default: auto)")
    p.add_argument(
        "--on-bad-image",
        default="error",
        choices=BAD_IMAGE_POLICIES,
        help="unreadable file: error (stop, naming it) | skip (leave out, list them); default: error",
    )
    p.add_argument("--dataset-root", help="with --dataset-split: the dataset folder, if it moved")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = check_output_path(args.out)
    checkpoint = find_checkpoint(args.model)  # cheap checks first, the model loads last
    images = None
    if args.images is not None:
        images = collect_images(args.images)
    elif args.list is not None:
        images = read_image_list(args.list)
    loaded = load_model(checkpoint, args.device)
    progress = False if args.no_progress else None
    common = dict(
        batch_size=args.batch_size,
        flip=args.flip,
        precision=args.precision,
        num_workers=args.num_workers,
        progress=progress,
    )
    if images is not None:
        source = (
            f"--images {' '.join(args.images)}"
            if args.images is not None
            else f"--list {args.list}"
        )
        result = embed_images(
            loaded, images, on_bad_image=args.on_bad_image, source=source, **common
        )
    else:
        result = embed_split(
            loaded,
            args.dataset_split,
            root=args.dataset_root,
            on_bad_image=args.on_bad_image,
            **common,
        )
    save_embeddings(result.embeddings, out)
    emb = result.embeddings
    labels = "with labels" if emb.labels is not None else "without labels"
    rate = len(emb) / max(result.seconds, 1e-9)
    print(
        f"wrote {len(emb)} embeddings ({emb.dim}-d, {labels}) to {out} "
        f"in {result.seconds:.1f} s ({rate:.3g} images/s on {loaded.device})"
    )
    if result.bad:
        listing = bad_images_beside(out)
        listing.write_text("".join(f"{path}\t{reason}\n" for path, reason in result.bad))
        shown = ", ".join(path for path, _ in result.bad[:SHOWN_BAD])
        more = "" if len(result.bad) <= SHOWN_BAD else ", ..."
        print(
            f"warning: {len(result.bad)} unreadable image(s) skipped ({shown}{more}); "
            f"all listed in {listing}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
