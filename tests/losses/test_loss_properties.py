"""Properties every loss config must have: builds from its YAML, float32 under autocast,
no (n, n, dim) tensor, and the trainer's conventions (sizes filled, details keys)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from softmine.config import build
from softmine.losses import weighted_contrastive_loss
from softmine.losses.memory import MEMORY_KEYS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "loss"
ALL_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# Losses of (embeddings, labels); the video objective also needs (B, T, dim) frame features and
# is checked against its own float64 port in tests/losses/test_authors_objective.py (as is its
# old name, osm_caa_official_video, the same config).
NAMES = [n for n in ALL_NAMES if n not in ("osm_caa_authors_video", "osm_caa_official_video")]
NUM_CLASSES, DIM = 5, 24


def _build(
    name: str, num_classes: int = NUM_CLASSES, dim: int = DIM, **overrides: object
) -> torch.nn.Module:
    """Instantiate ``loss=<name>`` the way the trainer does (sizes filled when left null)."""
    cfg = OmegaConf.merge(_load(name), overrides)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in MEMORY_KEYS])  # the memory's
    extra = {k: v for k, v in (("num_classes", num_classes), ("embedding_dim", dim)) if k in cfg}
    return build(cfg, "loss", **extra)


def _load(name: str) -> DictConfig:
    """``configs/loss/<name>.yaml`` with its defaults list merged in (ablation presets extend
    osm_caa.yaml; pair losses include shared/memory.yaml)."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    merged = OmegaConf.create()
    for entry in cfg.get("defaults", []):
        if entry != "_self_":
            merged = OmegaConf.merge(merged, _load(entry.split("@")[0].removeprefix("/loss/")))
    return OmegaConf.merge(merged, {k: v for k, v in cfg.items() if k != "defaults"})


def _batch(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.arange(n) % NUM_CLASSES


def test_all_issue_config_names_exist() -> None:
    wanted = {
        "osm_caa",
        "osm_caa_authors",
        "osm",
        "caa",
        "contrastive",
        "contrastive_hard",
        "triplet_semihard",
        "triplet_batchhard",
        "lifted",
        "multi_similarity",
        "normsoftmax",
        "arcface",
        "cosface",
        "circle",
        "softtriple",
        "subcenter_arcface",
    }
    assert wanted <= set(NAMES)


def test_every_option_has_a_comment() -> None:
    for name in ALL_NAMES:
        for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
            if line and not line.startswith(("#", " ", "-", "defaults", "_target_")):
                assert "#" in line, f"{name}.yaml: option without a comment: {line!r}"


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_trains(name: str) -> None:
    loss_fn = _build(name)
    emb, y = _batch()
    emb.requires_grad_()
    if "return_details" in inspect.signature(loss_fn.forward).parameters:
        loss, details = loss_fn(emb, y, return_details=True)
        assert {"l_pos", "l_neg"} <= set(details)
        for key in ("l_pos", "l_neg", "ce"):
            if key in details:
                assert math.isfinite(float(details[key]))
    else:
        loss = loss_fn(emb, y)
    loss.backward()
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert torch.isfinite(emb.grad).all() and float(emb.grad.abs().sum()) > 0
    for p in loss_fn.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def _autocast_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            ok = torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except (RuntimeError, AssertionError):
        ok = False
    return dtypes + ([torch.float16] if ok else [])


@pytest.mark.parametrize("dtype", _autocast_dtypes())
@pytest.mark.parametrize("name", NAMES)
def test_autocast_gives_float32_loss_without_nan(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, DIM)
    loss_fn = _build(name)
    x, y = torch.randn(20, 16), torch.arange(20) % NUM_CLASSES
    with torch.autocast("cpu", dtype=dtype):
        emb = head(x)
        assert emb.dtype == dtype  # the loss really receives low-precision input
        loss = loss_fn(emb, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert math.isfinite(float(loss))
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # same value as the float32 loss of the same (rounded) embeddings
    ref = _build(name)
    ref.load_state_dict(loss_fn.state_dict())
    assert float(loss) == pytest.approx(float(ref(emb.detach().float(), y)), rel=1e-5, abs=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", NAMES)
def test_no_n_by_n_by_dim_tensor(name: str) -> None:
    n = 16
    loss_fn = _build(name)
    emb, y = _batch(n)
    emb.requires_grad_()
    with _LargestTensor() as probe:
        loss_fn(emb, y).backward()
    # the largest legitimate tensors are (n + classes, dim), (n, n) and the loss's own class
    # vectors (classes x centers per class, dim), e.g. SoftTriple's 10 per class, normalised;
    # (n, n, dim) is 6144 elements here, more than each of those
    own = max((p.numel() for p in loss_fn.parameters()), default=0)
    assert own < n * n * DIM
    assert probe.largest <= max((n + NUM_CLASSES) * DIM, n * n, NUM_CLASSES * DIM, own)


def test_functional_loss_under_autocast_matches_float32() -> None:
    emb, y = _batch()
    a = torch.rand(len(y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.linear(emb, torch.eye(DIM))
        got = weighted_contrastive_loss(low, y, a)
    ref = weighted_contrastive_loss(low.float(), y, a)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float64_embeddings_with_float32_parameters(name: str) -> None:
    """A float32 loss module on float64 embeddings computes in float64 and equals the all-float64 loss."""
    x, y = _batch(seed=3)
    torch.manual_seed(0)
    loss32 = _build(name)
    loss64 = _build(name).double()
    loss64.load_state_dict({k: v.double() for k, v in loss32.state_dict().items()})
    x1, x2 = x.double().requires_grad_(), x.double().requires_grad_()
    got, ref = loss32(x1, y), loss64(x2, y)
    got.backward()
    ref.backward()
    assert got.dtype == torch.float64
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    for (pname, p32), p64 in zip(loss32.named_parameters(), loss64.parameters(), strict=True):
        if p64.grad is None:  # unused by this config (e.g. class vectors with ce_weight 0)
            assert p32.grad is None, pname
            continue
        assert p32.grad is not None and p32.grad.dtype == torch.float32, pname
        assert torch.allclose(p32.grad.double(), p64.grad, rtol=1e-5, atol=1e-7), pname


@pytest.mark.parametrize("name", ["osm_caa", "osm_caa_authors", "osm", "caa"])
def test_compile_switch_is_off_by_default_and_reaches_the_loss(name: str) -> None:
    assert _build(name).compile is False
    assert _build(name, compile=True).compile is True
