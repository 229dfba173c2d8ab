"""Convert Caffe weights (.caffemodel) to a PyTorch state dict with softmine's names.

Usage::

    python scripts/convert_caffemodel.py googlenet_bn.caffemodel googlenet_bn.pth

Writes a plain ``{name: tensor}`` dict with ``torch.save`` and prints one line: the
layers read, the tensors and parameters written, and the BatchNorm layout found.
The result loads wherever ``backbone.pretrained`` takes a ``.pth`` file (the
``.caffemodel`` itself can be given there too; converting once saves the time).
Exits 2 with one ``error: ...`` line on a missing or unreadable input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from softmine.commands.common import user_errors_exit
from softmine.errors import DataError
from softmine.models.caffe import CaffeStateDict, caffemodel_to_state_dict


def summary(state: CaffeStateDict, source: Path, out: Path) -> str:
    """One line: layers, tensors, parameters (statistics excluded), BatchNorm layout."""
    params = sum(
        v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var"))
    )
    layouts = ", ".join(sorted(state.bn_layouts)) or "none"
    return (
        f"{source.name}: {state.caffe_layers} Caffe layers, {state.converted_layers} with weights"
        f" -> {len(state)} tensors, {params:,} parameters; BatchNorm layout: {layouts}; "
        f"written to {out}"
    )


def save_atomically(state: dict, out: Path) -> None:
    """``torch.save`` to a temporary file next to ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("caffemodel", type=Path, help="the Caffe weights (.caffemodel)")
    parser.add_argument("output", type=Path, help="where to write the state dict (.pth)")
    args = parser.parse_args(argv)
    source: Path = args.caffemodel.expanduser()
    out: Path = args.output.expanduser()
    if not source.is_file():
        raise DataError(f"Caffe model {str(source)!r} does not exist; give a .caffemodel file")
    state = caffemodel_to_state_dict(source)
    try:
        save_atomically(dict(state), out)
    except OSError as e:
        raise DataError(
            f"cannot write {str(out)!r} ({e.strerror or e}); choose another path"
        ) from e
    print(summary(state, source, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
