"""``softmine-export``: the embedding network of a trained model as an ONNX or TorchScript file.

Examples::

    softmine-export outputs/2026-12-01/12-00-00 --format onnx -o model.onnx
    softmine-export RUN --format torchscript -o model.pt

The file holds the whole network, input normalisation included: input ``images``,
float32 (N, C, H, W) in [0, 1] after the run's test transform (N dynamic, H x W
as printed), output ``embeddings`` (N, D). After writing, the file is run on random
inputs and compared with PyTorch; the largest absolute difference is printed and
must stay within ``--tolerance``. The file states the preprocessing a serving stack
must reproduce (resize, crop, value range, and the mean, std and channel order the
network applies itself): ONNX metadata key ``preprocessing``, TorchScript extra file
``preprocessing.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.inference.model import load_model
from softmine.inference.model_export import EXPORT_FORMATS, export_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="softmine-export", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="run folder or checkpoint (.pt)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx | torchscript")
    p.add_argument("-o", "--out", type=Path, required=True, help="file to write")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input height and width (default: what the run's test transform makes)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="max abs difference allowed (1e-4)"
    )
    return p


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    loaded = load_model(args.model, "cpu")
    report = export_model(
        loaded,
        args.format,
        args.out,
        input_size=tuple(args.input_size) if args.input_size else None,
        tolerance=args.tolerance,
        opset=args.opset,
    )
    c, h, w = report.input_shape
    print(
        f"wrote {report.path} ({report.format}): images (N, {c}, {h}, {w}) float32 in [0, 1] -> "
        f"embeddings (N, {loaded.embedding_dim}); max abs difference from PyTorch on random "
        f"inputs: {report.max_abs_diff:.3g}"
    )


if __name__ == "__main__":
    main()
