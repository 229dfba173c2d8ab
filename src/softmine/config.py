"""Building objects from Hydra configs with errors a user can act on, and the config names
that were renamed (old names still work, and a run logs their new names once)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from softmine.errors import ConfigError, SoftmineError


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, re-raising our own errors unwrapped.

    Hydra wraps every constructor error; a :class:`SoftmineError` inside is raised
    as it is, anything else becomes a :class:`ConfigError` naming the config group.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, SoftmineError):
                raise cause from None
            cause = cause.__cause__
        msg = str(e).strip().splitlines()
        raise ConfigError(
            f"could not build `{what}` from its config: {' '.join(msg)} "
            "(set SOFTMINE_DEBUG=1 for the traceback)"
        ) from e


#: The options of a dataset config given once, at its top level, that every split's reader
#: receives (:mod:`softmine.data.build`).
LOADING_KEYS = ("root", "on_bad_image", "cache", "cache_size", "cache_dir")

#: The split nodes a dataset config may have.
SPLIT_NODES = ("train", "test", "query", "gallery")


def loading_option(key: str) -> str | None:
    """The dataset option that a split's reader key is given from, or None.

    ``dataset.test.root`` and ``dataset.train.dataset.cache`` (a reader inside a wrapper)
    -> ``dataset.root``, ``dataset.cache``: a run recorded when the split nodes forwarded
    these keys compares them with the option given once (:mod:`softmine.runs.folder`).
    """
    parts = key.split(".")
    if (
        len(parts) >= 3
        and parts[0] == "dataset"
        and parts[1] in SPLIT_NODES
        and parts[-1] in LOADING_KEYS
        and all(p == "dataset" for p in parts[2:-1])
    ):
        return f"dataset.{parts[-1]}"
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config container as ``{"a.b.c": leaf}`` (lists are leaves, an empty mapping too)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: node}


def override_key(item: str) -> str:
    """The key of a Hydra override string: ``+a.b=1`` -> ``a.b``, ``~c`` -> ``c``."""
    return parse_override(item)[0]


def parse_override(item: str) -> tuple[str, str]:
    """A Hydra override string as ``(key, value)``: ``+a.b=1`` -> ``("a.b", "1")``, ``~c`` -> ``("c", "")``."""
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value


CONFIG_DIR = str((Path(__file__).parent / "configs").resolve())


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The config ``softmine-train`` would build for these overrides (for scripts, notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    overrides, notes = upgrade_overrides(overrides or [])
    log_old_names(notes)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


# ----------------------------------------------------------------------------- old names

log = logging.getLogger(__name__)

_AUTHORS_EXPERIMENTS = ("cub", "cars", "cub_bbox", "cars_bbox", "mars", "ilidsvid", "lpw")

#: Config options renamed by issue 24 (one name, "authors", for the authors' released code):
#: group -> {old option: new option}. Each old option is a file whose defaults list is the new
#: one (configs/loss/osm_caa_official.yaml: ``defaults: [osm_caa_authors]``), so both compose
#: the same config; Hydra's group choices (``hydra.runtime.choices``) keep the name that was
#: given, which is how a run tells that an old name was used.
OLD_CONFIG_NAMES: dict[str, dict[str, str]] = {
    "loss": {
        "osm_caa_official": "osm_caa_authors",
        "osm_caa_official_video": "osm_caa_authors_video",
    },
    "experiment": {f"reproduce_{name}": f"authors_{name}" for name in _AUTHORS_EXPERIMENTS},
}

#: Config keys renamed by issue 24: old dotted key -> new one (the P x K sampler's P and K).
OLD_KEYS: dict[str, str] = {
    "sampler.num_classes": "sampler.classes_per_batch",
    "sampler.num_samples": "sampler.samples_per_class",
}

#: Classes renamed by issue 24, as a recorded config's ``_target_`` names them -> today's name
#: (the old names still import, as aliases of the new classes).
OLD_TARGETS: dict[str, str] = {
    f"softmine.losses.{module}{old}": f"softmine.losses.{new}"
    for module in ("", "osm_caa_official.")
    for old, new in (
        ("OSMCAAOfficialLoss", "OSMCAAAuthorsLoss"),
        ("OSMCAAOfficialVideoLoss", "OSMCAAAuthorsVideoLoss"),
    )
}


def _old_name_note(old: str, new: str) -> str:
    return f"{old} is an old name for {new}"


def current_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
    """Hydra's group choices with every old option name replaced by its new one."""
    return {
        group: OLD_CONFIG_NAMES.get(group, {}).get(option, option)
        if isinstance(option, str)
        else option
        for group, option in choices.items()
    }


def old_choice_notes(choices: Mapping[str, Any]) -> list[str]:
    """One sentence per group whose choice is an old name (``loss=osm_caa_official is ...``)."""
    return [
        _old_name_note(f"{group}={option}", f"{group}={new}")
        for group, option in choices.items()
        if isinstance(option, str) and (new := OLD_CONFIG_NAMES.get(group, {}).get(option))
    ]


def upgrade_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides with old keys renamed (``sampler.num_classes=4`` ->
    ``sampler.classes_per_batch=4``), and one sentence per old key that was renamed.

    Hydra refuses a key its config does not hold, so an old key is renamed before Hydra sees it.
    """
    out: list[str] = []
    notes: list[str] = []
    for item in overrides:
        text = str(item)
        key, eq, value = text.partition("=")
        bare = key.lstrip("+~")
        new = OLD_KEYS.get(bare)
        if new is not None:
            text = f"{key[: len(key) - len(bare)]}{new}{eq}{value}"
            note = _old_name_note(bare, new)
            if note not in notes:
                notes.append(note)
        out.append(text)
    return out, notes


def upgrade_config(cfg: MutableMapping[str, Any]) -> list[str]:
    """Rename old keys and old class names in ``cfg`` (a composed or a recorded config) in place.

    An old key's value replaces the new key's (a config that names the old key meant it);
    returns one sentence per old name found.
    """
    notes: list[str] = []
    for old, new in OLD_KEYS.items():
        node_key, _, old_leaf = old.rpartition(".")
        new_leaf = new.rpartition(".")[2]
        node = cfg.get(node_key) if node_key else cfg
        if isinstance(node, (MutableMapping, DictConfig)) and old_leaf in node:
            with _writable(node):
                node[new_leaf] = _raw(node, old_leaf)
                del node[old_leaf]
            notes.append(_old_name_note(old, new))
    notes.extend(_upgrade_targets(cfg))
    return notes


def _upgrade_targets(cfg: Any) -> list[str]:
    """Rename the old class names of every ``_target_`` in ``cfg``, reading it as written (a
    value that cannot be resolved here, ``???`` or ``${hydra:...}``, is left alone)."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    notes: list[str] = []
    for path, old in _old_targets(raw):
        node = cfg
        for key in path:
            node = node[key]
        with _writable(node):
            node["_target_"] = OLD_TARGETS[old]
        notes.append(_old_name_note(old, OLD_TARGETS[old]))
    return notes


def _old_targets(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path, old class name) of every node below ``node`` whose ``_target_`` is an old name."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str) and target in OLD_TARGETS:
            yield path, target
        for key, value in node.items():
            yield from _old_targets(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _old_targets(value, (*path, i))


def _writable(node: Any) -> AbstractContextManager[Any]:
    """``open_dict`` for a :class:`DictConfig` (Hydra makes it struct), nothing for a dict."""
    return open_dict(node) if isinstance(node, DictConfig) else nullcontext()


def _raw(node: Any, key: str) -> Any:
    """``node[key]`` as written (an interpolation stays one)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=False)[key]  # type: ignore[index]
    return node[key]


def log_old_names(notes: Iterable[str]) -> None:
    """Log each sentence once (old names still work; the new one is what to write)."""
    for note in dict.fromkeys(notes):
        log.warning("%s (old names still work; write the new one)", note)
