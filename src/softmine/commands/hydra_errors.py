"""Hydra's own errors (a mistyped key, group option or override) as one line naming the fix.

Hydra prints these with a traceback hint and exits 1; ``softmine-train`` turns them
into ``error: ...`` and exit 2 like its other user errors, and names the closest
valid key or option (``difflib``) when there is one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError

from softmine.config import CONFIG_DIR, flatten, override_key

GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def config_groups() -> list[str]:
    """The config groups of ``softmine-train`` (folders of the config directory), e.g. ``loss``."""
    root = Path(CONFIG_DIR)
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))
    )


def known_keys(argv: Sequence[str], bad_key: str) -> list[str]:
    """Every key of the config the command's group choices compose, plus the group names."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = config_groups()
    choices = [
        a
        for a in argv
        if "=" in a
        and not a.startswith(("+", "~"))
        and override_key(a) in groups
        and override_key(a) != bad_key
    ]
    keys: list[str] = []
    GlobalHydra.instance().clear()
    for attempt in (choices, []):
        try:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose("train", overrides=list(attempt), return_hydra_config=True)
            container = OmegaConf.to_container(cfg, resolve=False)
            keys = list(flatten(container))
            break
        except Exception:  # a choice that does not compose either: fall back to the defaults
            GlobalHydra.instance().clear()
    prefixes = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    return sorted({*keys, *prefixes, *(g.replace("/", ".") for g in groups)})


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


#: Characters of an unquoted value that Hydra's override grammar reads as syntax.
SPECIAL = re.compile(r"""[\s()\[\]{}'",=:\\]""")


def shell_quoted(text: str) -> str:
    """``text`` as one shell word: in single quotes, or in double quotes when it holds one."""
    if "'" not in text:
        return f"'{text}'"
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in text)
    return f'"{escaped}"'


def quoting_hint(override: str, argv: Sequence[str]) -> str:
    """How to quote an override Hydra could not parse, or "" when quoting is not the fix.

    An unquoted path with spaces reaches Hydra as several arguments (``dataset.root=/tmp/my``
    and ``photos``): the words after the override are joined back into it. A value with
    characters of the override grammar (parentheses, ``=``, quotes) is quoted for Hydra.
    """
    words = list(argv)
    if "=" not in override and not override.startswith("~") and override in words:
        i = words.index(override)
        start = i
        while start > 0 and "=" not in words[start - 1]:
            start -= 1
        if start == 0:
            return f"; overrides are key=value, e.g. trainer.epochs=5 (got {override!r})"
        end = i + 1
        while end < len(words) and "=" not in words[end]:
            end += 1
        joined = " ".join(words[start - 1 : end])
        return (
            f"; {override!r} is not key=value: a value with spaces must be quoted as one "
            f"argument, {shell_quoted(joined)}"
        )
    key, eq, value = override.partition("=")
    if eq and value and SPECIAL.search(value) and value[0] not in "'\"[{":
        quote = '"' if "'" in value else "'"
        return f"; quote the value for Hydra: {shell_quoted(f'{key}={quote}{value}{quote}')}"
    return ""


#: Groups experiment=tune|fair choose from the data set (or the loss) by interpolation.
BENCHMARK_GROUPS = ("benchmark", "study", "backbone/benchmark", "hparams_search")


def _no_benchmark(group: str, option: str, options: Sequence[str]) -> str:
    """A data set (or loss) the fair benchmark has no config for, named with the ones it has."""
    have = ", ".join(sorted(options)) or "none"
    if group == "hparams_search":
        return (
            f"experiment=tune has no search space for loss={option} "
            f"(configs/hparams_search/{option}.yaml); losses with one: {have}"
        )
    return (
        f"the fair benchmark (experiment=tune|fair) has no protocol for dataset={option} "
        f"(configs/{group}/{option}.yaml); data sets with one: {have}"
    )


def memory_losses() -> list[str]:
    """The ``loss=`` options that take a cross-batch memory: those whose defaults list
    includes ``loss/shared/memory.yaml`` (directly or through another loss file)."""
    root = Path(CONFIG_DIR) / "loss"

    def includes(name: str) -> bool:
        path = root / f"{name}.yaml"
        entries = OmegaConf.load(path).get("defaults", []) if path.exists() else []
        return any(
            "shared/memory" in str(e) or (str(e) != "_self_" and includes(str(e))) for e in entries
        )

    return sorted(p.stem for p in root.glob("*.yaml") if includes(p.stem))


def _no_memory(key: str, argv: Sequence[str]) -> str:
    """``loss.memory*`` given to a loss that takes no memory (a proxy or classifier loss, circle)."""
    words = [a for a in argv if not a.startswith(("+", "~")) and override_key(a) == "loss"]
    loss = f"loss={words[-1].partition('=')[2]}" if words else "this loss"
    return (
        f"{loss} does not take a cross-batch memory ({key} is a key of the losses that do: "
        f"{', '.join(memory_losses())}); use one of them or drop {key}"
    )


def describe(e: BaseException, argv: Sequence[str]) -> str:
    """One sentence for a Hydra composition or override error of the command ``argv``."""
    if isinstance(e, OverrideParseException):
        return (
            f"cannot parse the override {e.override!r} ({_first_line(e.message)})"
            f"{quoting_hint(str(e.override), argv)}; see {GRAMMAR_URL}"
        )
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        options = [str(o) for o in (e.options or [])]
        if group in BENCHMARK_GROUPS:
            return _no_benchmark(group, option, options)
        if group and options:
            close = _closest(option, options)
            hint = f"did you mean {group}={close}? " if close else ""
            return (
                f"{group}={option}: the config group {group} has no option {option!r}; "
                f"{hint}options: {', '.join(options)}"
            )
    cause = e.__cause__
    text = str(e)
    match = re.search(r"override '([^']+)'", text)
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) or (
        match and "No match in the defaults list" in text
    ):
        key = str(getattr(cause, "full_key", "") or (match.group(1) if match else ""))
        if key.startswith("loss.memory"):
            return _no_memory(key, argv)
        if key:
            close = _closest(key, known_keys(argv, key))
            hint = f"did you mean {close}? " if close and close != key else ""
            return (
                f"unknown config key {key!r}; {hint}`softmine-train --cfg job` prints every key "
                f"(+{key}=... adds a new one)"
            )
    taken = re.search(r"An item is already at '([^']+)'", text)
    if taken:
        key = taken.group(1)
        return f"{key} already exists; set it with {key}=... (without the +)"
    if isinstance(e, InterpolationResolutionError):
        where = getattr(e, "full_key", "") or ""
        return f"cannot resolve {where or 'a value'}: {_first_line(text)}"
    detail = _first_line(str(cause)) if cause is not None else ""
    head = _first_line(text)
    return f"{head} ({detail})" if detail and detail not in head else head or type(e).__name__
