"""The optimizer from its config, with per-parameter-group rules by parameter name.

Caffe gives every parameter blob an ``lr_mult`` and a ``decay_mult``; the authors'
prototxts train the classifiers' biases at twice the learning rate and without
weight decay (``param { lr_mult: 2 decay_mult: 0 }``). ``optimizer.param_groups`` is a
list of rules ``{pattern, lr_mult, decay_mult}``; a parameter takes the first rule
whose glob ``pattern`` matches its name (``model.<module path>`` for the network,
``loss.<module path>`` for the loss's own parameters, e.g. ``loss.heads.*.linear.bias``),
and the default group (multipliers 1) takes the rest.

A rule may also hold its parameters still for the first optimizer steps,
``frozen_iters: N``: their gradients are dropped before each of the first N steps, so
the optimizer neither moves them nor keeps state for them (no momentum, no weight
decay), exactly as if they did not require gradients. Proxy-Anchor's recipe (Kim et al.,
CVPR 2020, ``--warm``) trains only the new embedding layer and the proxies at first;
``{pattern: "model.trunk.*", frozen_iters: N}`` does that. The count of steps taken lives
in the parameter group, so it is saved with the optimizer and survives a resume.

A rule that matches no parameter is an error (a typo must not pass silently), unless
it says ``optional: true``: an experiment whose loss is a choice can give "the loss's
own parameters" (``loss.*``: Proxy-Anchor's proxies, OSM+CAA's class vectors) their own
rate and still run a loss that has none.

:class:`CaffeSGD` (``optimizer=caffe_sgd``) is SGD with momentum in Caffe's form, the
learning rate inside the momentum history: the ``authors_*`` experiments train with it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.optim import Optimizer

from softmine.config import build
from softmine.errors import ConfigError

_RULE_KEYS = {"pattern", "lr_mult", "decay_mult", "frozen_iters", "optional"}
FROZEN_ITERS, STEPS = "frozen_iters", "steps_taken"  # keys of an optimizer parameter group


def group_parameters(
    named: Iterable[tuple[str, nn.Parameter]],
    rules: Sequence[Mapping[str, Any]],
    lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per rule that matches something, then the rest.

    Each group carries its own ``lr`` (= ``lr * lr_mult``) and ``weight_decay``
    (= ``weight_decay * decay_mult``), and ``frozen_iters`` when the rule sets it. A rule
    that matches no parameter is a :class:`ConfigError` (a typo in a pattern must not pass
    silently) unless it is ``optional``.
    """
    checked = []
    for i, rule in enumerate(rules):
        rule = dict(rule)
        unknown = set(rule) - _RULE_KEYS
        if unknown or "pattern" not in rule:
            raise ConfigError(
                f"optimizer.param_groups[{i}] must be {{pattern, lr_mult, decay_mult, "
                f"frozen_iters, optional}} (got keys {sorted(rule)})"
            )
        for key in ("lr_mult", "decay_mult", FROZEN_ITERS):
            if not float(rule.get(key, 0.0 if key == FROZEN_ITERS else 1.0)) >= 0:
                raise ConfigError(f"optimizer.param_groups[{i}].{key} must be >= 0")
        checked.append(rule)
    buckets: list[list[nn.Parameter]] = [[] for _ in checked]
    rest: list[nn.Parameter] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        for i, rule in enumerate(checked):
            if fnmatch.fnmatchcase(name, str(rule["pattern"])):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    groups = []
    for i, (rule, params) in enumerate(zip(checked, buckets, strict=True)):
        if not params and bool(rule.get("optional", False)):
            continue
        if not params:
            raise ConfigError(
                f"optimizer.param_groups[{i}].pattern={rule['pattern']!r} matches no trainable "
                "parameter; names look like model.trunk.conv1_7x7_s2.weight or "
                "loss.heads.loss3.linear.bias"
            )
        group = {
            "params": params,
            "lr": lr * float(rule.get("lr_mult", 1.0)),
            "weight_decay": weight_decay * float(rule.get("decay_mult", 1.0)),
        }
        if int(rule.get(FROZEN_ITERS, 0) or 0) > 0:
            group[FROZEN_ITERS], group[STEPS] = int(rule[FROZEN_ITERS]), 0
        groups.append(group)
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
    return groups


def build_optimizer(cfg: DictConfig, named: Iterable[tuple[str, nn.Parameter]]) -> Optimizer:
    """Instantiate ``cfg`` (a ``_partial_`` optimizer config) on the named parameters' groups."""
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(node):
        rules = node.pop("param_groups", None) or []
    factory: Callable[..., Optimizer] = build(node, "optimizer")
    lr = float(node.get("lr", 1e-3))
    weight_decay = float(node.get("weight_decay", 0.0) or 0.0)
    groups = group_parameters(named, list(rules), lr, weight_decay)
    try:
        optimizer = factory(groups)
    except ValueError as e:  # torch's own hyperparameter checks ("Invalid momentum value: -1")
        raise ConfigError(f"optimizer: {e}; fix the optimizer.* value it names") from None
    if any(FROZEN_ITERS in g for g in optimizer.param_groups):
        optimizer.register_step_pre_hook(_hold_frozen_groups)
    return optimizer


def _hold_frozen_groups(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Before a step: drop the gradients of groups still within their ``frozen_iters``."""
    for group in optimizer.param_groups:
        if FROZEN_ITERS not in group:
            continue
        if group[STEPS] < group[FROZEN_ITERS]:
            for p in group["params"]:
                p.grad = None
        group[STEPS] += 1


class CaffeSGD(Optimizer):
    """SGD with momentum as Caffe's ``SGDSolver`` computes it: the learning rate inside the history.

    Per parameter, with the group's ``lr`` (its ``lr_mult`` applied) and ``weight_decay``
    (its ``decay_mult`` applied)::

        history = momentum * history + lr * (grad + weight_decay * w)
        w = w - history

    (``sgd_solver.cpp``: ``Regularize`` adds the decay to the gradient, ``ComputeUpdateValue``
    the ``caffe_cpu_axpby`` into the history, ``Blob::Update`` subtracts it). PyTorch's SGD
    keeps ``buf = momentum * buf + grad`` and steps ``w -= lr * buf``: the two agree while the
    rate is constant, but right after a step-down Caffe's history still carries the old
    rate's steps while PyTorch rescales all of it at once. The history starts at zero (as
    Caffe's ``PreSolve``); parameters without a gradient are left alone.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not float(value) >= 0:
                raise ValueError(f"Invalid {name} value: {value}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Caffe update of every parameter that has a gradient (vectorised per group)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("CaffeSGD does not support sparse gradients")
            history = [self._history(p) for p in params]
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(history, group["momentum"])
            torch._foreach_add_(history, grads, alpha=group["lr"])
            torch._foreach_sub_(params, history)
        return loss

    def _history(self, p: torch.Tensor) -> torch.Tensor:
        """The parameter's momentum history (Caffe's ``history_``), zero at first."""
        state = self.state[p]
        if "history" not in state:
            state["history"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["history"]
