"""Data parallel training on the CPU with gloo: the 2-rank loss and gradients equal one process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from softmine.data import Digits, PKSampler
from softmine.engine.objective import Objective
from softmine.losses import OSMCAALoss
from softmine.models import EmbeddingNet, TinyCNN
from tests.conftest import FAST_DIGITS

N, CLASSES, DIM = 16, 4, 8


def _setup() -> tuple[Objective, torch.Tensor, torch.Tensor]:
    """Identical model, loss and batch in every process (seeded, float64, BN in eval mode)."""
    torch.manual_seed(0)
    model = EmbeddingNet(TinyCNN(1, 4), embedding_dim=DIM).double().eval()
    loss = OSMCAALoss(num_classes=CLASSES, embedding_dim=DIM).double()
    x = torch.rand(N, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(N) % CLASSES
    return Objective(model, loss), x, y


def _grads(obj: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in obj.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    obj, x, y = _setup()
    ddp = DistributedDataParallel(obj)
    part = slice(rank * N // world, (rank + 1) * N // world)
    loss, _ = ddp(x[part], y[part])
    loss.backward()
    if rank == 0:
        grads = {k.removeprefix("module."): v for k, v in _grads(ddp).items()}
        torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.barrier()  # no rank tears down gloo while the other still uses it (SIGABRT otherwise)
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    obj, x, y = _setup()
    loss, _ = obj(x, y)
    loss.backward()
    ref = _grads(obj)
    assert loss.dtype == torch.float64  # the objective keeps a float64 model's precision
    assert float(got["loss"]) == pytest.approx(loss.item(), rel=1e-10)
    assert set(got["grads"]) == set(ref)
    for k, g in ref.items():
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-8, atol=1e-12, msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "softmine.train",
        "trainer.device=cpu",
        "trainer.epochs=2",
        "trainer.eval_every=1",
        f"hydra.run.dir={run_dir}",
        *FAST_DIGITS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["map@r"] > 0.5  # it learned (an untrained network scores ~0.26)
    rows = (run_dir / "train_log.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per epoch, written once (by rank 0)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    # each rank took its half of every epoch's P x K batches
    labels = Digits(split="train").labels
    assert len(PKSampler(labels, 5, 4, seed=0, world_size=2)) == len(PKSampler(labels, 5, 4)) // 2
    sampler = PKSampler(labels, 5, 4, seed=0, rank=0, world_size=2)
    expected = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += len(sampler)
    assert state["train_state"]["step"] == expected
