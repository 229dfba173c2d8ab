"""Write docs/configuration.md from the configs themselves: every group, option and key.

Every key of ``configs/`` is commented where it is defined; this script reads those
comments (the one on the key's line, the indented lines that continue it, and a
comment block right above it) together with each key's default value, and writes
one table per config file, under the name a user types on the command line
(``loss.margin``, ``dataset.transform.height``, ``trainer.epochs``)::

    python scripts/gen_config_docs.py                 # -> docs/configuration.md
    python scripts/gen_config_docs.py --out page.md

``make docs`` runs it before building the site, so the page follows the configs. The page
is committed (the README links to it on a fresh clone): after editing a config, run this
script and commit the page with it; ``tests/project/test_docs.py`` fails while they differ.
The keys it finds in a file must be exactly the keys YAML loads from that file
(a construct it cannot read is an error, never a silently missing row).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softmine.config import flatten

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
OUT = REPO / "docs" / "configuration.md"
MAX_VALUE = 60  # characters of a default value shown in a table cell
COMMANDS = ("softmine-train", "softmine-eval", "softmine-report", "python", "torchrun", "make")

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<item>- +)?(?P<key>[A-Za-z0-9_@./+~-]+): ?(?P<rest>.*)$")
GLOBAL = "_global_"

#: Groups whose files other files include (their defaults lists), never chosen on their own.
INCLUDED = ("loss/shared",)

#: What each group is for, in the order of the page.
GROUPS = {
    "": "The main config, `configs/train.yaml`: the defaults of every group, the seed, and the "
    "training, evaluation and Hydra settings.",
    "dataset": "Data set, split protocol and evaluation protocol.",
    "dataset/transform": "Image transforms of a data set (a group nested in `dataset/`, "
    "placed at `dataset.transform`).",
    "backbone": "The embedding network: trunk, embedding head, input normalisation.",
    "backbone/benchmark": "The fair benchmark's network on each data set (`experiment=tune|fair` "
    "pick `backbone=benchmark/<dataset>`).",
    "sampler": "How a training batch is drawn (P classes x K samples).",
    "loss": "The metric-learning loss.",
    "loss/shared": "Keys the pair losses share: each pair loss's file includes these in its "
    "defaults list, so they are set with the loss (`loss=contrastive loss.memory=xbm`); "
    'docs/losses.md, "Cross-batch memory".',
    "optimizer": "The optimizer and its parameter groups.",
    "scheduler": "The learning-rate schedule, stepped per iteration.",
    "experiment": "Named settings that override everything above for one published result "
    "(`@package _global_`: their keys are full paths).",
    "benchmark": "The fair benchmark's protocol on a data set, shared by `experiment=tune` and "
    "`experiment=fair` (docs/fair-benchmark.md).",
    "study": "A tuning study on a data set (`experiment=tune`): the trial budget, the sampler and "
    "the search ranges every loss shares.",
    "hparams_search": "A loss's own search ranges (`experiment=tune`).",
    "tuned": "The tuned setting of a loss on a data set, written by `make tune` "
    "(`tuned/<dataset>/<loss>.yaml`, read by `experiment=fair`).",
    "hydra/launcher": "Where the jobs of a sweep (`-m`) run.",
}


@dataclass
class Entry:
    """One key of one file: its full dotted path, default value and comment."""

    path: str
    value: Any
    comment: str
    mapping: bool = False  # a block mapping (its children have rows of their own)


@dataclass
class ConfigFile:
    source: str  # path shown to the reader: configs/loss/osm.yaml
    group: str  # "" for train.yaml, "dataset/transform", ...
    option: str
    path: Path
    package: str  # "" for global keys
    header: str
    defaults: list[tuple[str, str]] = field(default_factory=list)  # (entry, comment)
    entries: list[Entry] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment), leaving ``#`` inside quotes alone."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), ""


def read_config(path: Path, config_dir: Path = CONFIG_DIR) -> ConfigFile:
    """Parse one config file: header, defaults list and every key with its comment."""
    rel = path.relative_to(config_dir)
    group = "/".join(rel.parts[:-1])
    lines = path.read_text().splitlines()
    package_line = next((ln for ln in lines[:3] if ln.startswith("# @package")), None)
    if package_line is not None:
        package = package_line.split()[-1]
        package = "" if package == GLOBAL else package
    else:
        package = group.replace("/", ".") if group else ""
    header, i = [], 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        if lines[i].startswith("#") and not lines[i].startswith("# @package"):
            header.append(lines[i][2:].rstrip() if lines[i].startswith("# ") else "")
        i += 1
    source = "configs/" + rel.as_posix()
    cfg = ConfigFile(source, group, rel.stem, path, package, "\n".join(header))
    loaded = yaml.safe_load(path.read_text()) or {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # comment lines above the next key
    last: Entry | None = None  # the entry a continuation comment belongs to
    last_indent = -1  # indent of that entry's key
    hash_col: int | None = None  # column of the `#` of the last line's own comment
    in_defaults = False
    in_list_at: int | None = None  # indent of the key of a block list being skipped
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            pending, last, hash_col = [], None, None
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            if hash_col is not None and indent >= hash_col - 2:  # continues the line above
                if in_defaults:
                    entry, comment = cfg.defaults[-1]
                    cfg.defaults[-1] = (entry, f"{comment} {text}".strip())
                elif last is not None:
                    last.comment = f"{last.comment} {text}".strip()
            else:
                pending.append(text)
                hash_col = None
            continue
        if in_list_at is not None:
            if indent > in_list_at or (indent == in_list_at and stripped.startswith("- ")):
                continue  # inside a block list: the whole list is the key's value
            in_list_at = None
        if stripped.startswith("- "):
            item, comment = _split_comment(stripped[2:])
            if in_defaults:
                cfg.defaults.append((item.strip(), comment))
                hash_col = line.index("#") if comment else None
                continue
            if last is not None and last.mapping and indent >= last_indent:
                in_list_at, hash_col = last_indent, None  # `key:` followed by a block list
                continue
            raise ValueError(f"{path}: cannot read the list item {line!r}")
        match = KEY_LINE.match(line)
        if not match:
            raise ValueError(f"{path}: cannot read the line {line!r}")
        key, (value_text, comment) = match["key"], _split_comment(match["rest"])
        hash_col = len(line) - len(match["rest"]) + match["rest"].index("#") if comment else None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        in_defaults = indent == 0 and key == "defaults"
        if in_defaults:
            pending, last = [], None
            continue
        parents = [k for _, k in stack]
        path_key = ".".join([*([package] if package else []), *parents, key])
        text = " ".join([*pending, comment]).strip()
        pending = []
        entry = Entry(path_key, None, text, mapping=value_text == "")
        cfg.entries.append(entry)
        last, last_indent = entry, indent
        if value_text == "":
            stack.append((indent, key))
    _attach_values(cfg, loaded, path)
    return cfg


def _attach_values(cfg: ConfigFile, loaded: dict, path: Path) -> None:
    """Give every entry its loaded value; the leaves found must be YAML's leaves exactly."""
    body = {k: v for k, v in loaded.items() if k != "defaults"}
    prefix = cfg.package
    flat = flatten(body, f"{prefix}." if prefix else "") if body else {}
    parsed_leaves = set()
    for entry in cfg.entries:
        node: Any = body
        rel = entry.path[len(prefix) + 1 :] if prefix else entry.path
        for part in rel.split("."):
            node = node[part] if isinstance(node, dict) and part in node else None
        if entry.mapping and isinstance(node, list):
            entry.mapping = False  # a block list: one value
        if entry.mapping and not (isinstance(node, dict) and node):
            entry.mapping = False  # `key:` with nothing below it is null
        entry.value = node
        if not entry.mapping:
            parsed_leaves.add(entry.path)
    flat_leaves = set(flat)
    # a flow mapping `a: {x: 1}` is one row but several YAML leaves
    covered = {
        leaf
        for leaf in flat_leaves
        if leaf in parsed_leaves or any(leaf.startswith(p + ".") for p in parsed_leaves)
    }
    if covered != flat_leaves or not parsed_leaves <= set(flat) | _prefixes(flat_leaves):
        missing = sorted(flat_leaves - covered)
        extra = sorted(parsed_leaves - set(flat) - _prefixes(flat_leaves))
        raise ValueError(f"{path}: keys read {extra} / missed {missing}; fix the parser")


def _prefixes(paths: set[str]) -> set[str]:
    out = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def read_all(config_dir: Path = CONFIG_DIR) -> list[ConfigFile]:
    """Every config file, main config first, then by group and option."""
    files = [read_config(p, config_dir) for p in sorted(config_dir.rglob("*.yaml"))]
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(files, key=lambda f: (order.get(f.group, len(order)), f.group, f.option))


# ----------------------------------------------------------------------------- writing


def _text(text: str) -> str:
    """Comment text as Markdown: code spans kept, characters Markdown would act on escaped."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        p = parts[i].replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;")
        for ch in "*_[]":
            p = p.replace(ch, "\\" + ch)
        parts[i] = p
    return "`".join(parts) if len(parts) % 2 else text.replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return _text(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """Text for a code span in a table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _first_sentence(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    end = flat.find(". ")
    first = flat if end < 0 else flat[: end + 1]
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        shown = value
    else:
        shown = json.dumps(value, separators=(", ", ": "))
    if len(shown) > MAX_VALUE:
        shown = shown[: MAX_VALUE - 1] + "…"
    return f"`{_code(shown)}`"


def _description(entry: Entry) -> str:
    if entry.comment:
        return _cell(entry.comment)
    value = entry.value
    key = entry.path.rsplit(".", 1)[-1]
    if key == "_target_":
        return "the class or function this node builds"
    if key == "_partial_":
        return "build a function that takes the remaining arguments later (Hydra)"
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return "set from " + _cell(_interpolation_source(entry.path, value))
    return ""


def _interpolation_source(path: str, value: str) -> str:
    """``${..root}`` at ``dataset.test.root`` -> ``dataset.root`` (relative interpolations)."""
    inner = value[2:-1]
    if ":" in inner or not inner.startswith("."):
        return f"`{value}`"
    dots = len(inner) - len(inner.lstrip("."))
    parents = path.split(".")[:-1]
    base = parents[: len(parents) - (dots - 1)] if dots > 1 else parents
    return "`" + ".".join([*base, inner.lstrip(".")]) + "`"


def _anchor(cfg: ConfigFile) -> str:
    return f"{cfg.group.replace('/', '-')}-{cfg.option}" if cfg.group else "main"


def render(config_dir: Path = CONFIG_DIR) -> str:
    """The whole Markdown page."""
    files = read_all(config_dir)
    out = [
        "# Configuration",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from the comments in configs/; "
        "edit the configs, not this page. -->",
        "",
        "softmine is configured with [Hydra](https://hydra.cc). The configs live in `configs/` "
        "(installed with the package as `softmine/configs/`), one folder per group; the main "
        "config `configs/train.yaml` picks one option of each group. On the command line:",
        "",
        "```bash",
        "softmine-train loss=contrastive                 # pick another option of a group",
        "softmine-train loss.margin=1.0 seed=3           # set any key",
        "softmine-train dataset=cub dataset/transform=reid   # an option of a nested group",
        "softmine-train experiment=authors_cub           # a named setting that sets many keys",
        "softmine-train --cfg job                        # print the composed config",
        "softmine-train -m loss=osm_caa,contrastive seed=0,1,2   # a sweep over every combination",
        "```",
        "",
        "This page lists every group, every option and every key with its default and the "
        "comment it has where it is defined. It is generated from the configs "
        "(`python scripts/gen_config_docs.py`, run by `make docs`) and committed with them; a "
        "test fails when it is not what the configs give. Keys are shown under the name you type: a key `margin` of `configs/loss/osm.yaml` "
        "is `loss.margin`. A value `null` for `num_classes` or `embedding_dim` is filled at run "
        "time from the data and the backbone; a value `${...}` is taken from another key.",
        "",
        "Old names still work, and a run logs the new name once (`softmine.config` lists "
        "them): `loss=osm_caa_official[_video]` is `loss=osm_caa_authors[_video]`, "
        "`experiment=reproduce_*` is `experiment=authors_*`, and the sampler's "
        "`sampler.num_classes` / `sampler.num_samples` are `sampler.classes_per_batch` / "
        "`sampler.samples_per_class`.",
        "",
    ]
    for group in dict.fromkeys(f.group for f in files):
        members = [f for f in files if f.group == group]
        if not group:
            out += ["## Main config", "", GROUPS[""], ""]
        else:
            out += [f"## `{group}`", "", GROUPS.get(group, ""), ""]
            chooser = f"`{group}=NAME`"
            where = f"`{members[0].package}.`" if members[0].package else "their full paths"
            if group in INCLUDED:
                out += [f"Included by other files, not chosen; the keys live under {where}.", ""]
            else:
                out += [f"Choose with {chooser}; the keys live under {where}.", ""]
            out += ["| option | what it is |", "|---|---|"]
            for f in members:
                first = _first_sentence(f.header)
                out.append(f"| [`{f.option}`](#{_anchor(f)}) | {_cell(first)} |")
            out.append("")
        for f in members:
            out += _render_file(f, group)
    return "\n".join(out).rstrip() + "\n"


def _render_file(f: ConfigFile, group: str) -> list[str]:
    out = []
    if group:
        out += [f"### `{group}={f.option}` {{ #{_anchor(f)} }}", ""]
    out += [f"Defined in `{f.source}`.", ""]
    if f.header:
        out += _header(f.header) + [""]
    defaults = [(e, c) for e, c in f.defaults if e != "_self_"]
    if defaults:
        out += ["| default | what |", "|---|---|"]
        out += [f"| `{_code(e)}` | {_cell(c)} |" for e, c in defaults] + [""]
    if f.entries:
        out += ["| key | default | what |", "|---|---|---|"]
        for e in f.entries:
            if e.mapping and not e.comment:
                continue  # a section without a comment of its own: its keys have rows
            value = "" if e.mapping else _value(e.value)
            out.append(f"| `{e.path}` | {value} | {_description(e)} |")
        out.append("")
    return out


def _header(header: str) -> list[str]:
    """A file's opening comment as Markdown; its indented command lines as code blocks."""
    out: list[str] = []
    code = False
    for line in header.split("\n"):
        indented = line.startswith("  ") and line.split()[0] in COMMANDS
        if indented != code:
            out += ["", "```bash"] if indented else ["```", ""]
            code = indented
        out.append(line.strip() if code else _text(line))
    return out + (["```"] if code else [])


def undocumented(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Keys with neither a comment nor an obvious meaning (`_target_`, an interpolation)."""
    return [
        f"{f.path.relative_to(config_dir)}: {e.path}"
        for f in read_all(config_dir)
        for e in f.entries
        if not e.mapping and not _description(e)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="Markdown file to write")
    parser.add_argument("--configs", type=Path, default=CONFIG_DIR, help="the config folder")
    parser.add_argument(
        "--list-undocumented", action="store_true", help="list the keys without a comment"
    )
    args = parser.parse_args(argv)
    text = render(args.configs)
    if not args.out.exists() or args.out.read_text() != text:  # unchanged: no rebuild loop
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    bare = undocumented(args.configs)
    print(f"wrote {args.out} ({text.count(chr(10))} lines)", file=sys.stderr)
    if bare:
        print(f"{len(bare)} key(s) without a comment (--list-undocumented)", file=sys.stderr)
        for b in bare if args.list_undocumented else []:
            print(f"  {b}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
