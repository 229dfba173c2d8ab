"""What a loss needs from the model, declared on its class (the training objective reads it).

A loss module declares, instead of letting the objective probe its methods:

* ``requires``: the named model features its ``forward(..., features={name: tensor})``
  reads (e.g. the authors' heads on ``pool5`` / ``inception_3c``); empty for a loss of
  the embeddings alone;
* ``per_frame``: it wants those features per frame, (B, T, dim), from a video model;
* ``returns_details``: ``forward(..., return_details=True)`` returns ``(loss, details)``,
  whose scalar entries the trainer logs;
* ``classification_term``: its value includes a classification (cross-entropy) term,
  which puts it on another scale than a loss of pairs alone: ``softmine-report`` draws
  the training losses of the two kinds on separate axes (:func:`has_classification_term`
  reads it from a loss config);
* ``takes_memory``: a pair loss, whose ``forward(..., memory=References)`` compares the
  batch with a cross-batch memory (``loss.memory=xbm``, :mod:`softmine.losses.memory`);
  proxy and classifier losses do not;
* ``memory_fields``: the per-sample entries of its details the memory stores with each
  embedding (OSM+CAA: ``attention``).

:func:`softmine.engine.objective.check_contract` holds them against the model's
:class:`~softmine.models.FeatureInfo` once, when the run is built. A plain ``nn.Module``
loss declares nothing: it needs the embeddings and labels only and returns the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


class MetricLoss(nn.Module):
    """Base of softmine's losses: ``forward(embeddings, labels) -> loss`` and its declared needs."""

    #: named model features ``forward(..., features=...)`` reads; () for the embeddings alone
    requires: tuple[str, ...] = ()
    #: those features per frame (B, T, dim), from a video model
    per_frame: bool = False
    #: ``forward(..., return_details=True)`` returns ``(loss, details)``
    returns_details: bool = False
    #: the value holds a classification (cross-entropy) term: True, False, or the name of
    #: the argument that weighs it (the term is there when that weight is > 0)
    classification_term: bool | str = False
    #: ``forward(..., memory=References)`` gives the pair loss of the batch against the batch
    #: and a cross-batch memory (a pair loss; a proxy or classifier loss has no such pairs)
    takes_memory: bool = False
    #: per-sample (n,) entries of ``forward(..., return_details=True)``'s details the memory
    #: stores with each embedding, and hands back in ``References.fields``
    memory_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class LossNeeds:
    """What a loss declares it needs (see the module doc); :func:`needs_of` reads it."""

    requires: tuple[str, ...] = ()
    per_frame: bool = False
    returns_details: bool = False
    takes_memory: bool = False
    memory_fields: tuple[str, ...] = ()


def needs_of(loss: nn.Module) -> LossNeeds:
    """The declared needs of ``loss``; a loss that is no :class:`MetricLoss` declares none."""
    if not isinstance(loss, MetricLoss):
        return LossNeeds()
    return LossNeeds(
        tuple(loss.requires),
        bool(loss.per_frame),
        bool(loss.returns_details),
        bool(loss.takes_memory),
        tuple(loss.memory_fields),
    )


def has_classification_term(loss_config: Mapping[str, Any]) -> bool | None:
    """Whether the loss a config node builds (``_target_`` and its arguments) has a
    classification term, as its class declares (:attr:`MetricLoss.classification_term`),
    without building it. None when the config names no importable loss class."""
    from hydra.utils import get_class

    target = loss_config.get("_target_") if isinstance(loss_config, Mapping) else None
    if not target:
        return None
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - a class of another version or project: unknown
        return None
    term = getattr(cls, "classification_term", False) if issubclass(cls, MetricLoss) else False
    if not isinstance(term, str):
        return bool(term)
    if term in loss_config:
        weight = loss_config[term]
    else:
        param = inspect.signature(cls).parameters.get(term)
        weight = None if param is None else param.default
    return isinstance(weight, int | float) and weight > 0
