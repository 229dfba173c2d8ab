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


def test_frozen_iters_hold_a_group_like_requires_grad_off() -> None:
    """AdamW: a group frozen for 2 steps matches a copy that starts training at step 3."""
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    twin_trunk, twin_head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    twin_trunk.load_state_dict(trunk.state_dict())
    twin_head.load_state_dict(head.state_dict())
    named = [(f"model.trunk.{n}", p) for n, p in trunk.named_parameters()]
    named += [(f"model.head.{n}", p) for n, p in head.named_parameters()]
    cfg = OmegaConf.create(
        {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": 0.1,
            "weight_decay": 0.1,
            "param_groups": [{"pattern": "model.trunk.*", "frozen_iters": 2}],
        }
    )
    opt = build_optimizer(cfg, named)
    # the reference: the trunk does not require gradients for 2 steps, then joins
    ref_head = torch.optim.AdamW(twin_head.parameters(), lr=0.1, weight_decay=0.1)
    ref_trunk = torch.optim.AdamW(twin_trunk.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(5, 3)
    start = trunk.weight.detach().clone()
    for step in range(5):
        opt.zero_grad()
        head(trunk(x)).square().sum().backward()
        opt.step()
        ref_head.zero_grad()
        ref_trunk.zero_grad()
        twin_trunk.requires_grad_(step >= 2)
        twin_head(twin_trunk(x)).square().sum().backward()
        ref_head.step()
        if step >= 2:
            ref_trunk.step()
        if step < 2:
            assert torch.equal(trunk.weight, start)
        torch.testing.assert_close(trunk.weight, twin_trunk.weight)
        torch.testing.assert_close(head.weight, twin_head.weight)
    assert not torch.equal(trunk.weight, start)
    state = opt.state_dict()  # the count travels with the optimizer (resume)
    assert state["param_groups"][0]["steps_taken"] == 5


def test_optional_rule_may_match_nothing() -> None:
    named, _ = _named()
    rules = [{"pattern": "loss.proxies", "lr_mult": 100, "optional": True}]
    groups = group_parameters(named, rules, lr=0.1, weight_decay=0.0)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        group_parameters(named, [{"pattern": "loss.proxies"}], lr=0.1, weight_decay=0.0)
