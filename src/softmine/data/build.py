"""A dataset config's split nodes built into datasets, with the loading options given once.

A dataset config (``configs/dataset/*.yaml``) says where the data lie and how to load
them once, at its top level: the :data:`LOADING_KEYS` ``root``, ``on_bad_image``,
``cache``, ``cache_size`` and ``cache_dir``. Its split nodes (``train``, ``test``,
``query``, ``gallery``) say only what differs per split: the reader, which split it
reads, the transform. :func:`build_split` joins the two: each loading option of the
dataset node reaches the reader of the split (the innermost node, inside wrappers such
as label noise) when the reader takes it as an argument and the split node does not set
it itself. So ``dataset.cache=ram`` or ``dataset.root=...`` on the command line reaches
every split, and a config written before (its split nodes forwarding each option with
``${..root}``) builds the same datasets.

The option names (:data:`softmine.config.LOADING_KEYS`) live with the other config
basics, so that the resume guard can compare a record of either layout.

Every caller that turns a split node into a dataset (training, validation, evaluation,
``softmine-embed --dataset-split``) goes through :func:`split_node` / :func:`build_split`.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from softmine.config import LOADING_KEYS, build


def wrapper_chain(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The split node and the nodes it wraps (a wrapper takes its dataset as ``dataset``).

    The last element is the reader, the node that parses the files.
    """
    chain = [node]
    while isinstance(chain[-1].get("dataset"), dict) and "_target_" in chain[-1]["dataset"]:
        chain.append(chain[-1]["dataset"])
    return chain


def _takes(target: Any, key: str) -> bool:
    """Whether the callable named by ``_target_`` takes ``key`` as an argument."""
    if not isinstance(target, str):
        return False
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return False  # not found: building the node names the problem
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def split_node(dataset_cfg: DictConfig, split: str) -> dict[str, Any]:
    """The split node ``split`` of ``dataset_cfg``, resolved, with the loading options in its reader.

    A loading option (:data:`LOADING_KEYS`) the dataset node defines goes to the reader
    when the reader takes it and the node does not set it already (a node that sets it
    keeps its own value).
    """
    node: dict[str, Any] = OmegaConf.to_container(dataset_cfg[split], resolve=True)  # type: ignore[assignment]
    reader = wrapper_chain(node)[-1]
    for key in LOADING_KEYS:
        if key in dataset_cfg and key not in reader and _takes(reader.get("_target_"), key):
            value = dataset_cfg[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            reader[key] = value
    return node


def build_split(dataset_cfg: DictConfig, split: str, **kwargs: Any) -> Any:
    """The dataset of split ``split`` (``train``, ``test``, ``query``, ``gallery``) of ``dataset_cfg``.

    ``kwargs`` go to the outermost node's constructor (as :func:`softmine.config.build`).
    """
    return build(OmegaConf.create(split_node(dataset_cfg, split)), f"dataset.{split}", **kwargs)
