"""Derive ``googlenet_bn_layers.tsv`` from lim0606's ``train_val.prototxt`` (run once, by hand).

The tests need the layer list of the network the authors fine-tuned, but not the prototxt
itself (it is not part of this project, and its repository is not there when the tests
run). This script reads the prototxt, keeps the layers of Caffe's TRAIN phase (those a
saved ``.caffemodel`` holds, in its order), works out each blob's shape for a 224 x 224
input with Caffe's own rules (convolution: floor((H + 2p - k) / s) + 1; pooling: ceil,
then one less when the last window starts in the padding; ``InnerProduct`` flattens its
input; ``Concat`` adds channels) and writes, per layer, its name, type, bottom and top
blobs and the shapes of the parameter blobs Caffe stores for it:

* Convolution: (num_output, c_in, k, k), and (num_output,) with ``bias_term: true``;
* InnerProduct: (num_output, c_in * h * w), and (num_output,) unless ``bias_term: false``;
* BatchNorm: (C,), (C,), (1,) (mean * s, variance * s, s);
* Scale: (C,), and (C,) with ``bias_term: true``.

Usage (with the repository's git mirror)::

    git --git-dir=<lim0606/caffe-googlenet-bn>/.git show d19caf5:train_val.prototxt > tv.prototxt
    python tests/data/derive_googlenet_bn_layers.py tv.prototxt tests/data/googlenet_bn_layers.tsv
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

_TOKEN = re.compile(r'"[^"]*"|[{}]|[^\s{}:]+:|[^\s{}:"]+')


def parse(text: str) -> dict[str, list[Any]]:
    """Protobuf text format -> nested dicts of lists (every field may repeat)."""
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    tokens = _TOKEN.findall(text)
    stack: list[dict[str, list[Any]]] = [{}]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "}":
            stack.pop()
            i += 1
            continue
        key = tok.rstrip(":")
        if tokens[i + 1] == "{":
            child: dict[str, list[Any]] = {}
            stack[-1].setdefault(key, []).append(child)
            stack.append(child)
            i += 2
        else:
            stack[-1].setdefault(key, []).append(tokens[i + 1].strip('"'))
            i += 2
    return stack[0]


def _one(node: dict[str, list[Any]], key: str, default: Any = None) -> Any:
    return node.get(key, [default])[0]


def _in_train(layer: dict[str, list[Any]]) -> bool:
    phases = [_one(inc, "phase") for inc in layer.get("include", [])]
    return not phases or "TRAIN" in phases


def derive(prototxt: str, size: int = 224) -> list[tuple[str, str, str, str, str]]:
    """(name, type, bottoms, tops, parameter blob shapes) of every TRAIN-phase layer."""
    shapes: dict[str, tuple[int, int, int]] = {}  # blob -> (C, H, W)
    rows = []
    for layer in parse(prototxt)["layer"]:
        if not _in_train(layer):
            continue
        name, kind = _one(layer, "name"), _one(layer, "type")
        bottoms, tops = layer.get("bottom", []), layer.get("top", [])
        blobs: list[tuple[int, ...]] = []
        if kind == "Data":
            crop = int(_one(_one(layer, "transform_param", {}), "crop_size", size))
            shapes[tops[0]] = (3, crop, crop)
        elif kind == "Convolution":
            p = _one(layer, "convolution_param")
            c, h, w = shapes[bottoms[0]]
            n, k = int(_one(p, "num_output")), int(_one(p, "kernel_size"))
            s, pad = int(_one(p, "stride", 1)), int(_one(p, "pad", 0))
            blobs.append((n, c, k, k))
            if _one(p, "bias_term", "true") == "true":
                blobs.append((n,))
            out = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
            shapes[tops[0]] = (n, *out)
        elif kind == "Pooling":
            p = _one(layer, "pooling_param")
            c, h, w = shapes[bottoms[0]]
            k, s, pad = (
                int(_one(p, f, d)) for f, d in (("kernel_size", 0), ("stride", 1), ("pad", 0))
            )

            def pooled(x: int, k: int = k, s: int = s, pad: int = pad) -> int:
                o = math.ceil((x + 2 * pad - k) / s) + 1
                return o - 1 if pad and (o - 1) * s >= x + pad else o

            shapes[tops[0]] = (c, pooled(h), pooled(w))
        elif kind == "InnerProduct":
            p = _one(layer, "inner_product_param")
            n = int(_one(p, "num_output"))
            blobs.append((n, math.prod(shapes[bottoms[0]])))
            if _one(p, "bias_term", "true") == "true":
                blobs.append((n,))
            shapes[tops[0]] = (n, 1, 1)
        elif kind == "BatchNorm":
            c = shapes[bottoms[0]][0]
            blobs += [(c,), (c,), (1,)]
            shapes[tops[0]] = shapes[bottoms[0]]
        elif kind == "Scale":
            c = shapes[bottoms[0]][0]
            blobs.append((c,))
            if _one(_one(layer, "scale_param", {}), "bias_term", "false") == "true":
                blobs.append((c,))
            shapes[tops[0]] = shapes[bottoms[0]]
        elif kind == "Concat":
            parts = [shapes[b] for b in bottoms]
            assert len({p[1:] for p in parts}) == 1, name
            shapes[tops[0]] = (sum(p[0] for p in parts), *parts[0][1:])
        elif kind == "ReLU":
            shapes[tops[0]] = shapes[bottoms[0]]
        elif kind == "SoftmaxWithLoss":
            shapes[tops[0]] = (1, 1, 1)
        else:
            raise ValueError(f"layer {name!r}: type {kind} not handled")
        rows.append(
            (
                name,
                kind,
                ",".join(bottoms) or "-",
                ",".join(tops) or "-",
                ";".join("x".join(map(str, b)) for b in blobs) or "-",
            )
        )
    return rows


HEADER = """\
# The TRAIN-phase layers of lim0606's GoogLeNet-BN, the ImageNet network the OSM + CAA
# authors fine-tuned: derived from train_val.prototxt of github.com/lim0606/caffe-googlenet-bn
# (commit d19caf5) by tests/data/derive_googlenet_bn_layers.py, which works out each
# parameter blob's shape for 224 x 224 inputs with Caffe's shape rules. Not the prototxt:
# one line per layer, tab-separated: name, type, bottom blobs, top blobs, the shapes of
# the parameter blobs a .caffemodel stores for it ('-': none).
"""


def main(src: str, dst: str) -> None:
    rows = derive(Path(src).read_text())
    lines = ["\t".join(row) for row in rows]
    Path(dst).write_text(HEADER + "\n".join(lines) + "\n")
    weighted = sum(1 for row in rows if row[4] != "-")
    print(f"{len(rows)} layers, {weighted} with parameters -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
