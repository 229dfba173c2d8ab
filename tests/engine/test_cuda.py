"""Checks that need a CUDA GPU: skipped without one (``pytest -m cuda`` selects them).

One training step per precision with channels_last, a step without host syncs,
every loss on CUDA against its CPU value, evaluation of CUDA embeddings against the
CPU, the decoded-image cache with the device augmentation on CUDA, and a checkpoint
written on the GPU read back on the CPU.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch

from softmine.data.device_transforms import crop_resize
from softmine.engine import Trainer
from softmine.testing.fakes import make_cub
from tests.conftest import FAST_DIGITS, compose
from tests.data.test_device_transforms import BOXES, SHAPES, _batch, _images
from tests.losses.test_loss_properties import NAMES, _build
from tests.losses.test_loss_properties import _batch as _loss_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(compose(["trainer.device=cuda", *FAST_DIGITS, *overrides]), tmp_path)


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
def test_one_training_step_per_precision_with_channels_last(tmp_path: Path, precision: str) -> None:
    t = _trainer(tmp_path, f"trainer.precision={precision}", "trainer.channels_last=true")
    assert t.channels_last and t.scaler.is_enabled() == (precision == "fp16")
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in t.params]
    x, y = next(iter(t.loader))
    values = t.train_step(x, y)
    assert values["loss"].is_cuda and torch.isfinite(values["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, t.params, strict=True))
    t.check_weights()


def test_a_step_does_not_synchronise_with_the_host(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "trainer.on_nonfinite=stop")
    batches = [b for b, _ in zip(t.loader, range(3), strict=False)]
    t.train_step(*batches[0])  # warm-up: optimizer state, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            t.stats.add(t.train_step(x, y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t.check_weights()


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_on_cuda_matches_the_cpu(name: str) -> None:
    torch.manual_seed(0)
    cpu = _build(name)
    gpu = copy.deepcopy(cpu).cuda()
    emb, y = _loss_batch()
    outs = []
    for loss_fn, device in ((cpu, "cpu"), (gpu, "cuda")):
        e = emb.to(device).requires_grad_()
        if "return_details" in inspect.signature(loss_fn.forward).parameters:
            loss, _ = loss_fn(e, y.to(device), return_details=True)
        else:
            loss = loss_fn(e, y.to(device))
        loss.backward()
        outs.append((loss.detach().cpu(), e.grad.cpu()))
    (l_cpu, g_cpu), (l_gpu, g_gpu) = outs
    torch.testing.assert_close(l_gpu, l_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-5)


def test_evaluation_of_cuda_embeddings_matches_the_cpu(tmp_path: Path) -> None:
    gpu = _trainer(tmp_path / "gpu")
    for x, y in [b for b, _ in zip(gpu.loader, range(3), strict=False)]:
        gpu.train_step(x, y)
    cpu = Trainer(compose(["trainer.device=cpu", *FAST_DIGITS]), tmp_path / "cpu")
    cpu.model.load_state_dict({k: v.cpu() for k, v in gpu.model.state_dict().items()})
    got, want = gpu.evaluate(), cpu.evaluate()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-3), k


def test_device_augmentation_on_cuda_equals_the_cpu() -> None:
    images = _images(SHAPES)
    boxes = tuple(torch.tensor(c, dtype=torch.float64) for c in zip(*BOXES, strict=True))
    pixels = _batch(images).pixels
    want = crop_resize(pixels, boxes, (24, 24))
    got = crop_resize(pixels.cuda(), tuple(b.cuda() for b in boxes), (24, 24))
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)


def test_training_with_the_cache_and_device_augmentation_on_cuda(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6, size=40)
    cfg = compose(
        [
            "dataset=cub",
            f"dataset.root={root}",
            "dataset/transform=dml_device",
            "dataset.cache=ram",
            "dataset.cache_size=28",
            "dataset.transform.resize=28",
            "dataset.transform.crop_size=24",
            "backbone=tiny",
            "backbone.trunk.in_channels=3",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=3",
            "trainer.max_iters=4",
            "trainer.num_workers=2",
            "trainer.device=cuda",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            "trainer.tensorboard=false",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    metrics = trainer.fit()
    assert 0.0 <= metrics["recall@1"] <= 1.0
    rows = (tmp_path / "run" / "train_log.csv").read_text()
    assert "peak_mem_gib" in rows.splitlines()[0]  # recorded on CUDA
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path: Path) -> None:
    gpu = _trainer(tmp_path, "trainer.max_iters=2")
    gpu.fit()
    path = tmp_path / "checkpoints" / "last.pt"
    cpu = Trainer(
        compose(["trainer.device=cpu", "trainer.max_iters=3", "resume=true", *FAST_DIGITS]),
        tmp_path,
    )
    cpu.load_checkpoint(path)
    assert cpu.state.step == 2
    for k, v in gpu.model.state_dict().items():
        assert torch.equal(cpu.model.state_dict()[k], v.cpu()), k
    cpu.fit()  # and trains on from it
    assert cpu.state.step == 3


def test_compile_trains_on_cuda(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "trainer.compile=true", "trainer.max_iters=3")
    metrics = t.fit()
    assert 0.0 <= metrics["map@r"] <= 1.0
