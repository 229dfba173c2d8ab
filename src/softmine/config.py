"""Building objects from Hydra configs with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

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

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])
