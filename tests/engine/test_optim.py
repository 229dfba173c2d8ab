"""Optimizer parameter groups by name pattern (the authors' lr_mult / decay_mult)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from softmine.engine.optim import CaffeSGD, build_optimizer, group_parameters
from softmine.engine.schedules import multistep
from softmine.errors import ConfigError
from tests.conftest import compose


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


# Caffe's solver, step by step (CaffeMex_V28/src/caffe/solvers/sgd_solver.cpp): multistep rate
# (GetLearningRate, one stepvalue passed per iteration), Regularize (diff += decay * w),
# ComputeUpdateValue (history = momentum * history + rate * lr_mult * diff), Blob::Update (w -= history).
BASE_LR, MOMENTUM, DECAY, GAMMA, STEPS = 0.1, 0.9, 0.01, 0.5, [3, 4]  # two steps: x0.25 at 3-4


def _caffe_reference(w0, bias0, grad_fn, iters):
    """float64 NumPy loop of Caffe's update; the bias has lr_mult 2 and decay_mult 0."""
    blobs = {"w": w0.copy(), "b": bias0.copy()}
    mults = {"w": (1.0, 1.0), "b": (2.0, 0.0)}
    history = {k: np.zeros_like(v) for k, v in blobs.items()}
    current_step, path = 0, []
    for it in range(iters):
        if current_step < len(STEPS) and it >= STEPS[current_step]:
            current_step += 1
        rate = BASE_LR * GAMMA**current_step
        diffs = grad_fn(blobs["w"], blobs["b"])
        for k in blobs:
            lr_mult, decay_mult = mults[k]
            diff = diffs[k] + DECAY * decay_mult * blobs[k]
            history[k] = MOMENTUM * history[k] + rate * lr_mult * diff
            blobs[k] = blobs[k] - history[k]
        path.append({k: v.copy() for k, v in blobs.items()})
    return path


def _quadratic_problem():
    """A linear layer on fixed data with a squared loss; its NumPy gradient by hand."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    w0, b0 = rng.normal(size=(2, 3)), rng.normal(size=2)

    def grad_fn(w, b):
        r = x @ w.T + b - y  # loss = sum(r^2) / 2
        return {"w": r.T @ x, "b": r.sum(0)}

    return x, y, w0, b0, grad_fn


def _train(optimizer_cfg: dict, iters: int):
    x, y, w0, b0, _ = _quadratic_problem()
    layer = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w0))
        layer.bias.copy_(torch.from_numpy(b0))
    named = [(f"loss.heads.loss3.linear.{n}", p) for n, p in layer.named_parameters()]
    cfg = OmegaConf.create(
        {
            "_partial_": True,
            "lr": BASE_LR,
            "momentum": MOMENTUM,
            "weight_decay": DECAY,
            "param_groups": [
                {"pattern": "loss.heads.*.linear.bias", "lr_mult": 2, "decay_mult": 0}
            ],
            **optimizer_cfg,
        }
    )
    opt = build_optimizer(cfg, named)
    sched = multistep(opt, iters, milestones=STEPS, gamma=GAMMA)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    path = []
    for _ in range(iters):
        opt.zero_grad()
        ((layer(xt) - yt).square().sum() / 2).backward()
        opt.step()
        sched.step()
        path.append(
            {"w": layer.weight.detach().numpy().copy(), "b": layer.bias.detach().numpy().copy()}
        )
    return path


def test_caffe_sgd_is_caffes_update_through_a_step_down() -> None:
    """optimizer=caffe_sgd against a float64 loop of sgd_solver.cpp, across two lr drops."""
    _, _, w0, b0, grad_fn = _quadratic_problem()
    ref = _caffe_reference(w0, b0, grad_fn, iters=7)
    ours = _train({"_target_": "softmine.engine.optim.CaffeSGD"}, iters=7)
    for it, (r, o) in enumerate(zip(ref, ours, strict=True)):
        for k in ("w", "b"):
            np.testing.assert_allclose(o[k], r[k], rtol=1e-12, atol=1e-14, err_msg=f"{k} at {it}")


def test_torch_sgd_departs_from_caffe_right_after_the_drop() -> None:
    """PyTorch's SGD (lr outside the history) equals Caffe's until the first drop, not after."""
    _, _, w0, b0, grad_fn = _quadratic_problem()
    ref = _caffe_reference(w0, b0, grad_fn, iters=5)
    torch_sgd = _train({"_target_": "torch.optim.SGD"}, iters=5)
    for it in range(STEPS[0]):  # iterations 0-2 at the base rate: the same weights
        np.testing.assert_allclose(torch_sgd[it]["w"], ref[it]["w"], rtol=1e-12)
    gap = np.abs(torch_sgd[STEPS[0]]["w"] - ref[STEPS[0]]["w"]).max()
    assert gap > 1e-3, gap  # the first update at the lower rate


def test_caffe_sgd_skips_parameters_without_gradients_and_checks_its_values() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = CaffeSGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.0)
    a.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), 0.9))
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(
            OmegaConf.create(
                {"_target_": "softmine.engine.optim.CaffeSGD", "_partial_": True, "momentum": -1}
            ),
            [("model.w", a)],
        )


def test_optimizer_caffe_sgd_composes() -> None:
    cfg = compose(["optimizer=caffe_sgd", "optimizer.lr=0.01"])
    opt = build_optimizer(cfg.optimizer, [("model.w", torch.nn.Parameter(torch.zeros(2)))])
    assert isinstance(opt, CaffeSGD) and opt.param_groups[0]["lr"] == 0.01
