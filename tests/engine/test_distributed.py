"""Data parallel training on the CPU with gloo: the 2-rank loss and gradients equal one process's.

Every multi-process test runs its ranks with a deadline (``TIMEOUT_S``, also the
gloo timeout): a rank that dies or hangs fails the test, never a deadlock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from softmine.config import build
from softmine.data import Digits, PKSampler
from softmine.engine.distributed import all_reduce_with_grad, mean_over_ranks
from softmine.engine.objective import Objective
from softmine.engine.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm
from softmine.losses import OSMCAAAuthorsLoss, OSMCAALoss
from softmine.models import EmbeddingNet, TinyCNN, VideoEmbeddingNet
from tests.conftest import FAST_DIGITS, ForkedPopen, compose, run_forked

N, CLASSES, DIM = 16, 4, 8
TIMEOUT_S = 90


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )


def _spawn(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; fail if one fails or they overrun.

    The ranks are forked from this process (no interpreter start and imports of their own)."""
    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} ranks did not finish within {TIMEOUT_S} s")


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
    _init(rank, world, init_file)
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


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    _spawn(_worker, str(tmp_path / "init"), str(out))
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


def _memory_steps(obj: torch.nn.Module, memory, rank: int, world: int) -> dict[str, Any]:
    """Three training steps of 16 samples each (this rank's share of each) with a cross-batch
    memory of 20 that joins at step 2; the last step's loss and gradients, and the queue."""
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.rand(N, 1, 8, 8, dtype=torch.float64, generator=g)
        y = (torch.arange(N) + step) % CLASSES
        part = slice(rank * N // world, (rank + 1) * N // world)
        obj.zero_grad()
        loss, details = obj(x[part], y[part])
        loss.backward()
    grads = {k.removeprefix("module."): v for k, v in _grads(obj).items()}
    queue = memory.contents()
    return {
        "loss": loss.detach(),
        "memory_loss": details["memory_loss"],
        "grads": grads,
        "queue": (queue.embeddings, queue.labels, queue.fields["attention"]),
    }


def _memory_objective() -> tuple[Objective, Any]:
    from softmine.losses.memory import CrossBatchMemory

    obj, _, _ = _setup()
    memory = CrossBatchMemory(20, start=1, fields=("attention",))
    return Objective(obj.model, obj.loss_fn, memory=memory), memory


def _memory_worker(rank: int, world: int, init_file: str, out: str) -> None:
    _init(rank, world, init_file)
    obj, memory = _memory_objective()
    res = _memory_steps(DistributedDataParallel(obj), memory, rank, world)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_a_cross_batch_memory_match_one_process(tmp_path: Path) -> None:
    """Every rank enqueues the gathered global batch: the same queue on both ranks as in one
    process, and the same loss (memory term included) and gradients."""
    _spawn(_memory_worker, str(tmp_path / "init"), str(tmp_path))
    obj, memory = _memory_objective()
    want = _memory_steps(obj, memory, 0, 1)
    assert float(want["memory_loss"]) > 0 and memory.filled == 20
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-10)
        for a, b in zip(got["queue"], want["queue"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for k, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][k], grad, rtol=1e-8, atol=1e-12, msg=k)


# ---------------------------------------------------------------- split batch + synchronised BN
P, K, C, T = 4, 3, 6, 3  # global batch of P classes x K items; C classes of 8 items; T frames
CPU = torch.device("cpu")
CASES: dict[str, tuple[Callable[..., torch.nn.Module], bool]] = {  # name: (loss, video model)
    "osm_caa_authors": (OSMCAAAuthorsLoss, False),
    "osm_caa": (OSMCAALoss, False),
    "video_osm_caa_authors": (OSMCAAAuthorsLoss, True),  # + the frame cross-entropy
}


def _pk_data(video: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels 0..C-1 (8 items each) and float64 images (n, 1, 8, 8) or clips (n, T, 1, 8, 8)."""
    labels = torch.arange(C).repeat_interleave(8)
    shape = (len(labels), T, 1, 8, 8) if video else (len(labels), 1, 8, 8)
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return x, labels


def _bn_objective(case: str, sync: bool) -> Objective:
    """A float64 model with BatchNorm2d (trunk) and BatchNorm1d (head) in train mode, and a loss."""
    loss, video = CASES[case]
    torch.manual_seed(0)
    model = (
        VideoEmbeddingNet(
            TinyCNN(1, 4), embedding_dim=DIM, head_bn=True, pooling="attention", num_classes=C
        )
        if video
        else EmbeddingNet(TinyCNN(1, 4), embedding_dim=DIM, head_bn=True)
    ).double()
    if sync:
        model = convert_sync_batchnorm(model, CPU)
    return Objective(model, loss(num_classes=C, embedding_dim=DIM).double())


def _step(obj: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss, parameter gradients and BN buffers after one training forward/backward, then eval output."""
    loss, details = obj(x, y)
    loss.backward()
    grads = {k.removeprefix("module."): v for k, v in _grads(obj).items()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        emb = model(_pk_data(x.dim() == 5)[0][:10])
    out = {"loss": loss.detach(), "grads": grads, "buffers": buffers, "eval": emb}
    if "frame_ce" in details:
        out["frame_ce"] = details["frame_ce"]
    return out


def _split_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    labels = _pk_data()[1]
    sampler = PKSampler(
        labels.numpy(), P, K, seed=0, rank=rank, world_size=world, split_across_ranks=True
    )
    share = next(iter(sampler))
    res: dict[Any, Any] = {"share": share}
    for case, (_, video) in CASES.items():
        x = _pk_data(video)[0]
        for sync in (True, False):
            obj = _bn_objective(case, sync)
            res[case, sync] = _step(
                DistributedDataParallel(obj), obj.model, x[share], labels[share]
            )
    synced, plain = _bn_objective("osm_caa", True).model, _bn_objective("osm_caa", False).model
    res["converted"] = sum(isinstance(m, CpuSyncBatchNorm) for m in synced.modules())
    res["keys"] = list(synced.state_dict())
    synced.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads
    # total = sum over ranks of 3 a_r; rank r backpropagates (r + 1) total: a_r gets 3 (1 + 2)
    a = torch.tensor(float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = all_reduce_with_grad(3 * a)
    (total * (rank + 1)).backward()
    b = torch.tensor(float(rank + 1), dtype=torch.float64, requires_grad=True)
    mean = mean_over_ranks(b * b)
    mean.backward()
    res["collectives"] = (float(total), float(a.grad), float(mean), float(b.grad))
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 gloo ranks computed (split sampler, with and without synchronised BN)."""
    out = tmp_path_factory.mktemp("split")
    _spawn(_split_worker, str(out / "init"), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _one_process(case: str) -> tuple[list[int], dict]:
    x, labels = _pk_data(CASES[case][1])
    batch = next(iter(PKSampler(labels.numpy(), P, K, seed=0)))
    obj = _bn_objective(case, sync=False)
    return batch, _step(obj, obj.model, x[batch], labels[batch])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_split_batch_with_sync_bn_equals_one_process_on_the_whole_batch(
    split_runs: list[dict], case: str
) -> None:
    batch, ref = _one_process(case)
    assert split_runs[0]["share"] + split_runs[1]["share"] == batch
    # float64 throughout, but the video model computes its frame cross-entropy in float32
    rel = 1e-6 if CASES[case][1] else 1e-10
    for rank in (0, 1):
        got = split_runs[rank][case, True]
        assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=rel)
        if "frame_ce" in ref:  # the frame CE of each rank's frames, averaged: the global value
            assert float(got["frame_ce"]) == pytest.approx(float(ref["frame_ce"]), rel=rel)
        assert set(got["grads"]) == set(ref["grads"])  # every parameter, BN weights included
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-7, atol=1e-9, msg=k)
        assert set(got["buffers"]) == set(ref["buffers"])
        for k, b in ref["buffers"].items():  # running mean, unbiased running var, count
            torch.testing.assert_close(got["buffers"][k], b, rtol=1e-9, atol=1e-12, msg=k)
        torch.testing.assert_close(got["eval"], ref["eval"], rtol=1e-9, atol=1e-12)


def test_without_sync_bn_the_split_batch_is_not_the_one_process_step(
    split_runs: list[dict],
) -> None:
    """The control: per-rank BatchNorm statistics change the gradients and running statistics."""
    _, ref = _one_process("osm_caa_authors")
    got = split_runs[0]["osm_caa_authors", False]
    grad_gap = max(float((got["grads"][k] - g).abs().max()) for k, g in ref["grads"].items())
    var_gap = float(
        (got["buffers"]["head_bn.running_var"] - ref["buffers"]["head_bn.running_var"]).abs().max()
    )
    assert grad_gap > 1e-4 and var_gap > 1e-4


def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_names(
    split_runs: list[dict],
) -> None:
    plain = _bn_objective("osm_caa", sync=False).model
    assert split_runs[0]["converted"] == 4  # 3 BatchNorm2d in the trunk, the head's BatchNorm1d
    assert split_runs[0]["keys"] == list(plain.state_dict())


def test_differentiable_collectives(split_runs: list[dict]) -> None:
    # all_reduce_with_grad(3 a_r) = 3 (1 + 2) = 9; each a_r gets 3 * (1 + 2) = 9.
    # mean_over_ranks(b_r^2): value (1 + 4) / 2 = 2.5 on both ranks, gradient 2 b_r of this rank.
    assert split_runs[0]["collectives"] == (9.0, 9.0, 2.5, 2.0)
    assert split_runs[1]["collectives"] == (9.0, 9.0, 2.5, 4.0)


def test_sync_bn_is_a_no_op_in_one_process() -> None:
    model = EmbeddingNet(TinyCNN(1, 4), embedding_dim=DIM, head_bn=True)
    layers = [type(m) for m in model.modules()]
    assert convert_sync_batchnorm(model, CPU) is model
    assert [type(m) for m in model.modules()] == layers


def _cli_rank(rank: int, port: int, overrides: list[str], cwd: Path) -> subprocess.Popen:
    """One rank of ``softmine.commands.train`` joined by torchrun's environment variables (no
    torchrun), a child forked as :class:`ForkedPopen`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "SOFTMINE_DEBUG": "",
    }
    cmd = [sys.executable, "-m", "softmine.commands.train", *overrides]
    return ForkedPopen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_p_not_divisible_by_the_ranks_exits_2_with_one_line(tmp_path: Path) -> None:
    port = _free_port()
    overrides = [
        *FAST_DIGITS,
        "sampler.split_across_ranks=true",
        "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    procs = [_cli_rank(r, port, overrides, tmp_path) for r in range(2)]
    try:
        errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error: sampler.split_across_ranks=true"), err[-2000:]
        assert "P=sampler.classes_per_batch=5 is not divisible by N=2" in lines[-1]
        assert "Traceback" not in err


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
        "softmine.commands.train",
        "trainer.device=cpu",
        "trainer.epochs=2",
        "trainer.eval_every=1",
        f"hydra.run.dir={run_dir}",
        *FAST_DIGITS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = run_forked(
        cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300
    )  # its ranks: fresh
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


@pytest.mark.slow
def test_torchrun_split_batch_with_sync_bn_trains_on_the_one_process_schedule(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *FAST_DIGITS,
        "sampler.classes_per_batch=4",  # P divisible by the 2 ranks
        "sampler.split_across_ranks=true",
        "trainer.sync_bn=true",
        "backbone.head_bn=true",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "softmine.commands.train",
        "trainer.device=cpu",
        "trainer.epochs=2",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = run_forked(
        cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300
    )  # its ranks: fresh
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["map@r"] > 0.5  # it learned (an untrained network scores ~0.26)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    # every rank stepped through all of one process's batches (its share of each)
    sampler = PKSampler(Digits(split="train").labels, 4, 4, seed=0)
    expected = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += len(sampler)
    assert state["train_state"]["step"] == expected
    # the synchronised BatchNorm layers saved plain BatchNorm names and statistics
    model = build(compose(overrides).backbone, "backbone")
    model.load_state_dict(state["model"])  # strict
    assert int(state["model"]["head_bn.num_batches_tracked"]) == expected
