"""The environments a paper-scale run meets: Ctrl-C with workers, fewer GPUs on resume, CPU
affinity, the torch floor, shared memory, SLURM tasks and data-parallel ranks.

Each test shows the failure the fix prevents where a CPU machine can show it
(faking what it cannot have: GPUs, a SLURM job).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from torch.utils.data import DataLoader, Dataset

from softmine.data import Digits, PKSampler
from softmine.engine import checkpoint, setup
from softmine.engine.distributed import export_submitit_ranks
from softmine.engine.validate import validate_config
from softmine.errors import ConfigError
from softmine.runs.signals import ignore_interrupts
from tests.conftest import FAST_DIGITS, REPO, ForkedPopen, compose
from tests.run_imports import import_what_a_run_imports

# ------------------------------------------------------------------ Ctrl-C and workers


class _Slow(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor(i)


def _interrupt_workers(worker_init_fn) -> list[int]:  # noqa: ANN001
    loader = DataLoader(_Slow(), batch_size=4, num_workers=2, worker_init_fn=worker_init_fn)
    it = iter(loader)
    seen = next(it).tolist()
    for w in it._workers:  # what a terminal's Ctrl-C does to the foreground process group
        os.kill(w.pid, signal.SIGINT)
    time.sleep(0.3)
    for batch in it:
        seen += batch.tolist()
    return seen


@pytest.mark.slow
def test_dataloader_workers_ignore_ctrl_c() -> None:
    # Without the fix the workers die of KeyboardInterrupt and the main process with them.
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        _interrupt_workers(None)
    assert _interrupt_workers(ignore_interrupts) == list(range(40))


EXIT_WITH_LIVE_WORKERS = """
import sys
from torch.utils.data import DataLoader, Dataset
from softmine.runs.signals import ignore_interrupts

class Bad(Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i == 5:
            raise ValueError("bad item")
        return i

try:
    for _ in DataLoader(Bad(), batch_size=1, num_workers=2, worker_init_fn=ignore_interrupts):
        pass
except ValueError:
    print("error: bad item", file=sys.stderr)
    sys.exit(2)  # the loader's iterator is still alive, held by the traceback
"""


@pytest.mark.slow
def test_exit_with_a_live_loader_does_not_wait_for_its_workers() -> None:
    """Workers ignore SIGTERM, so multiprocessing's exit would wait for them forever."""
    res = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert res.stderr.strip() == "error: bad item"  # one line, no report of the killed workers


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_exits_cleanly(tmp_path: Path) -> None:
    """Training with worker processes; SIGINT to the whole group, as a terminal sends it."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "softmine.commands.train",
        "trainer.epochs=50",
        "trainer.num_workers=2",
        "trainer.checkpoint_every=5",
        "trainer.device=cpu",
        f"hydra.run.dir={run_dir}",
        *FAST_DIGITS,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = ForkedPopen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.pt"
    t0 = time.time()
    while not last.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume=true" in err and "Traceback" not in err and "unexpectedly" not in err
    state = torch.load(last, weights_only=True)
    assert state["train_state"]["step"] > 0 and not state["train_state"]["finished"]


# ------------------------------------------------------------------ resume on fewer GPUs


def test_rng_restore_with_fewer_cuda_devices_than_saved(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint from a 4-GPU node resumed where one GPU is visible (faked)."""
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    state = {**checkpoint.capture_rng_state(), "cuda": saved}
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), int(device)))
    )
    with caplog.at_level(logging.WARNING):
        checkpoint.restore_rng_state(state)
    assert calls == [(0, 0)]  # device 0 gets the first saved state; nothing asks for device 1
    assert "4 CUDA devices, 1 are visible" in caplog.text


# ------------------------------------------------------------------ CPU affinity


def test_auto_workers_follow_the_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM cpus_per_task=3 on a 64-core node: 3 workers, not 8."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert setup.resolve_num_workers("auto", object()) == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: all CPUs
    assert setup.resolve_num_workers("auto", object()) == 8


# ------------------------------------------------------------------ the torch floor

# APIs the code uses, with the first torch release that has them in this form.
NEEDS = {
    r"torch\.is_autocast_enabled\(\s*[\w.]": (2, 4),  # the device-type argument
    r"torch\.amp\.GradScaler\(": (2, 3),
    r"weights_only=True": (1, 13),
}


def _floor(spec: str, name: str) -> tuple[int, ...]:
    m = re.search(rf'"{name}>=([\d.]+)', spec)
    assert m, f"no {name} floor in pyproject.toml"
    return tuple(int(v) for v in m.group(1).split("."))


def test_torch_floor_covers_the_apis_the_code_uses() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    source = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    needed = max(v for pattern, v in NEEDS.items() if re.search(pattern, source))
    assert _floor(pyproject, "torch")[:2] >= needed
    # torchvision is released in lockstep: 0.(torch minor + 15) for torch 2.x
    assert _floor(pyproject, "torchvision")[:2] >= (0, _floor(pyproject, "torch")[1] + 15)


# ------------------------------------------------------------------ shared memory


def test_sharing_strategy_is_set_and_checked() -> None:
    before = tmp_mp.get_sharing_strategy()
    try:
        setup.set_sharing_strategy("file_system")
        assert tmp_mp.get_sharing_strategy() == "file_system"
    finally:
        tmp_mp.set_sharing_strategy(before)
    with pytest.raises(ConfigError, match="trainer.sharing_strategy must be one of"):
        validate_config(compose(["trainer.sharing_strategy=shm"]))


def test_small_dev_shm_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker's 64 MB /dev/shm against 8 workers of 56 images of 3 x 224 x 224 uint8."""
    images = [(torch.zeros(3, 224, 224, dtype=torch.uint8), 0)] * 2
    monkeypatch.setattr(setup, "free_shared_memory", lambda: 64_000_000)
    with caplog.at_level(logging.WARNING):
        setup.check_shared_memory(0, [(images, 56)])
        assert not caplog.text
        setup.check_shared_memory(8, [(images, 56)])
    assert "--shm-size" in caplog.text and "trainer.num_workers" in caplog.text
    assert f"{8 * 2 * 56 * 3 * 224 * 224 / 1e6:.0f} MB" in caplog.text


# ------------------------------------------------------------------ SLURM through submitit


def _slurm_env(rank: int, ntasks: int = 2, port: int | None = None) -> dict[str, str]:
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_submitit_tasks_get_torch_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    for var in (*TORCH_VARS, "CUDA_VISIBLE_DEVICES"):
        # recorded first, so what the export writes is undone after the test (a RANK or
        # WORLD_SIZE left behind would make every later training subprocess wait for peers)
        monkeypatch.setenv(var, "recorded")
        monkeypatch.delenv(var)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for k, v in _slurm_env(1, ntasks=2).items():
        monkeypatch.setenv(k, v)
    assert export_submitit_ranks()
    got = {k: os.environ[k] for k in TORCH_VARS}
    assert got["RANK"] == "1" and got["WORLD_SIZE"] == "2" and got["LOCAL_RANK"] == "1"
    assert got["MASTER_ADDR"] == "localhost" and 20000 <= int(got["MASTER_PORT"]) <= 60000
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # each rank picks cuda:LOCAL_RANK itself
    # torchrun already set the ranks / a single task / no submitit job: nothing to do
    assert not export_submitit_ranks()
    for var in TORCH_VARS:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not export_submitit_ranks()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert not export_submitit_ranks() and "RANK" not in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_slurm_tasks_train_as_one_data_parallel_job(tmp_path: Path) -> None:
    """Two tasks of one (faked) submitit job: one process group, rank 0 writes, batches shared."""
    pytest.importorskip("submitit")
    run_dir, port = tmp_path / "run", _free_port()
    base = {k: v for k, v in os.environ.items() if k not in TORCH_VARS}
    cmd = [
        sys.executable,
        "-m",
        "softmine.commands.train",
        "trainer.device=cpu",
        "trainer.epochs=2",
        f"hydra.run.dir={run_dir}",
        *FAST_DIGITS,
    ]
    procs = [
        ForkedPopen(
            cmd,
            cwd=tmp_path,
            env={**base, **_slurm_env(r, port=port), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert len((run_dir / "train_log.csv").read_text().splitlines()) == 3  # rank 0 only
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    labels = Digits(split="train").labels
    sampler = PKSampler(labels, 5, 4, seed=0, rank=0, world_size=2)
    expected = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += len(sampler)
    assert state["train_state"]["step"] == expected  # half the batches: the two tasks shared them
    assert json.loads((run_dir / "metrics.json").read_text())["map@r"] > 0.3


# ------------------------------------------------------------------ data-parallel ranks


def _rank(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    from softmine.engine import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = compose(["trainer.device=cpu", "trainer.num_workers=0", *FAST_DIGITS])
    trainer = Trainer(cfg, Path(run_dir))
    draws = torch.rand(4)  # the main process's augmentation stream (digits' RandomShift)
    trainer.sampler.set_epoch(0)
    for (x, y), _ in zip(trainer.loader, range(3), strict=False):
        trainer.train_step(x, y)
    buffers = {k: v.clone() for k, v in trainer.model.named_buffers()}
    trainer.evaluate()
    torch.save(
        {
            "draws": draws,
            "before": buffers,
            "after": dict(trainer.model.named_buffers()),
            "params": dict(trainer.model.named_parameters()),
            "test": trainer.test_embeddings[1],
        },
        out,
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_draw_their_own_augmentations_and_evaluate_rank_0s_network(tmp_path: Path) -> None:
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    args = (2, str(tmp_path / "init"), str(tmp_path / "run"), outs)
    import_what_a_run_imports()  # once here, not in each rank: they fork from this process
    tmp_mp.start_processes(_spawned, args=args, nprocs=2, start_method="fork")
    r0, r1 = (torch.load(o, weights_only=False) for o in outs)
    assert not torch.equal(r0["draws"], r1["draws"])  # each rank its own random stream
    for k, p in r0["params"].items():  # DDP kept the parameters equal
        torch.testing.assert_close(p, r1["params"][k], rtol=0, atol=1e-6, msg=k)
    running = [k for k in r0["before"] if k.endswith("running_mean")]
    assert running and any(not torch.equal(r0["before"][k], r1["before"][k]) for k in running)
    for k in r0["after"]:  # evaluation used rank 0's statistics on every rank
        assert torch.equal(r1["after"][k], r0["before"][k]), k
    assert (r0["test"] == r1["test"]).all()  # one network, one set of test embeddings


def _spawned(rank: int, world: int, init_file: str, run_dir: str, outs: list[str]) -> None:
    _rank(rank, world, init_file, run_dir, outs[rank])


def test_rank_seeds_differ_and_rank_0_keeps_the_seed() -> None:
    seeds = {setup.rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8 and setup.rank_seed(7, 0) == 7
    assert setup.rank_seed(7, 1, step=100) != setup.rank_seed(7, 1)


# ------------------------------------------------------------------ the end of a run


@pytest.mark.slow
def test_the_end_of_a_run_embeds_the_test_set_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final evaluation's embeddings serve the plots (Recall@K curve, t-SNE, grid)."""
    from softmine.engine import Trainer, evaluator
    from softmine.reporting import artifacts
    from softmine.reporting.artifacts import fit_and_report

    cfg = compose(["trainer.device=cpu", "trainer.epochs=1", *FAST_DIGITS, "trainer.plots=true"])
    trainer = Trainer(cfg, tmp_path / "run")
    test_set = trainer.evaluator.test_set
    embedded: list[str] = []

    def counting(module):  # noqa: ANN001, ANN202
        original = module.extract_embeddings

        def wrapper(model, dataset, **kwargs):  # noqa: ANN001, ANN003, ANN202
            base = getattr(dataset, "dataset", dataset)
            if base is test_set:
                embedded.append(module.__name__)
            return original(model, dataset, **kwargs)

        monkeypatch.setattr(module, "extract_embeddings", wrapper)

    counting(evaluator)
    counting(artifacts)
    fit_and_report(trainer)  # with the plots
    assert embedded == ["softmine.engine.evaluator"]
    assert (tmp_path / "run" / "plots" / "recall_at_k.png").exists()
