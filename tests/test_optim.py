"""Optimizer parameter groups by name pattern (the authors' lr_mult / decay_mult)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from softmine.engine.optim import build_optimizer, group_parameters
from softmine.errors import ConfigError


def _named():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    head = torch.nn.Linear(4, 2)
    named = [(f"model.{n}", p) for n, p in net.named_parameters()]
    named += [(f"loss.heads.loss3.linear.{n}", p) for n, p in head.named_parameters()]
    return named, head


def test_first_matching_rule_sets_lr_and_decay() -> None:
    named, head = _named()
    rules = [{"pattern": "loss.heads.*.linear.bias", "lr_mult": 2, "decay_mult": 0}]
    groups = group_parameters(named, rules, lr=0.1, weight_decay=0.01)
    assert len(groups) == 2
    assert groups[0]["params"] == [head.bias]
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (0.2, 0.0)
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (0.1, 0.01)
    assert len(groups[1]["params"]) == len(named) - 1


def test_sgd_step_uses_the_group_rates() -> None:
    """One SGD step by hand: p - lr_mult*lr*(g + decay_mult*wd*p)."""
    named, head = _named()
    cfg = OmegaConf.create(
        {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": 0.1,
            "weight_decay": 0.5,
            "param_groups": [{"pattern": "*.bias", "lr_mult": 2.0, "decay_mult": 0.0}],
        }
    )
    opt = build_optimizer(cfg, named)
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in named:
        if n.endswith("bias"):
            expected = before[n] - 0.2 * 1.0
        else:
            expected = before[n] - 0.1 * (1.0 + 0.5 * before[n])
        torch.testing.assert_close(p.detach(), expected)


def test_a_rule_matching_nothing_is_an_error() -> None:
    named, _ = _named()
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        group_parameters(named, [{"pattern": "loss.head.*.bias", "lr_mult": 2}], 0.1, 0.0)
    with pytest.raises(ConfigError, match="pattern, lr_mult, decay_mult"):
        group_parameters(named, [{"pattern": "*", "lr": 2}], 0.1, 0.0)
