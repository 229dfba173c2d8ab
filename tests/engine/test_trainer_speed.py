"""The training loop's speed options: device line, cuDNN autotuning, torch.compile, the progress
bar off a terminal, log rows as interval means, and the timing columns of train_log.csv."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from softmine.commands import evaluate as evaluate_mod
from softmine.engine import Trainer
from softmine.engine import setup as setup_mod
from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(compose(["trainer.device=cpu", *FAST_DIGITS, *overrides]), tmp_path)


def test_the_device_is_named_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="softmine.engine.trainer"):
        _trainer(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on")]
    assert lines == [
        f"training on CPU ({setup_mod.available_cpus()} usable cores, torch {torch.__version__}), "
        "TF32 on"
    ]


def test_auto_warns_when_a_cuda_build_finds_no_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(setup_mod, "nvidia_driver_present", lambda: False)  # no GPU at all: silent
    with caplog.at_level(logging.WARNING, logger="softmine.engine.setup"):
        assert setup_mod.resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
    monkeypatch.setattr(setup_mod, "nvidia_driver_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="softmine.engine.setup"):
        assert setup_mod.resolve_device("auto") == torch.device("cpu")
        assert setup_mod.resolve_device("auto", warn=False) == torch.device("cpu")
    (record,) = caplog.records
    assert "built for CUDA 12.4 but finds no usable GPU" in record.getMessage()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: nothing to say
    caplog.clear()
    setup_mod.resolve_device("auto")
    assert not caplog.records


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_benchmark_unless_deterministic(tmp_path: Path, deterministic: bool) -> None:
    _trainer(tmp_path, f"trainer.deterministic={str(deterministic).lower()}")
    assert torch.backends.cudnn.benchmark is not deterministic
    torch.backends.cudnn.benchmark = False


def test_compile_runs_the_objective_through_torch_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = []

    def fake_compile(module: torch.nn.Module) -> torch.nn.Module:
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    t = _trainer(tmp_path, "trainer.compile=false")
    assert compiled == []
    t = _trainer(tmp_path / "b", "trainer.compile=true")
    assert compiled == [t.objective]


def _bar_writes(tmp_path: Path, capsys: pytest.CaptureFixture, interval: float) -> str:
    t = Trainer(
        compose(
            [
                "trainer.device=cpu",
                *FAST_DIGITS,
                "trainer.progress_bar=true",
                "trainer.epochs=3",
                f"trainer.progress_interval={interval}",
                "trainer.interrupt_every=1",
            ]
        ),
        tmp_path,
    )
    capsys.readouterr()
    t.fit()
    return capsys.readouterr().err


@pytest.mark.slow
def test_progress_bar_off_a_terminal_writes_at_most_every_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """stderr is captured (not a terminal): with a long interval the bar of a ~135-step run
    writes its first line and its closing one only; with 0 it writes every step."""
    quiet = _bar_writes(tmp_path / "a", capsys, 3600)
    chatty = _bar_writes(tmp_path / "b", capsys, 0)
    steps = 3 * _trainer(tmp_path / "c").batches_per_epoch
    assert quiet.count("\r") <= 3
    assert chatty.count("\r") >= steps


def test_log_rows_are_means_over_the_interval_and_epoch_rows_carry_timing(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "trainer.max_iters=6", "trainer.log_every=3")
    seen = []
    step = t.train_step

    def spy(x: torch.Tensor, y: torch.Tensor) -> dict:
        values = step(x, y)
        seen.append({k: float(v) for k, v in values.items()})
        return values

    t.train_step = spy  # type: ignore[method-assign]
    t.fit()
    log = pd.read_csv(tmp_path / "train_log.csv")
    rows = log[log["epoch_time_s"].isna()]
    assert rows["step"].tolist() == [3, 6]
    for row, lo in zip(rows.itertuples(), (0, 3), strict=True):
        for key in ("loss", "grad_norm", "attention"):
            want = sum(v[key] for v in seen[lo : lo + 3]) / 3
            assert getattr(row, key) == pytest.approx(want, rel=1e-12)
    epoch = log[log["epoch_time_s"].notna()].iloc[0]
    assert epoch["loss"] == pytest.approx(sum(v["loss"] for v in seen) / 6, rel=1e-12)
    assert epoch["data_s"] + epoch["step_s"] == pytest.approx(epoch["epoch_time_s"])
    assert epoch["images_per_s"] == pytest.approx(6 * 20 / epoch["epoch_time_s"])
    assert "peak_mem_gib" not in log  # CUDA only


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """Put torch's two TF32 flags back as they were (they are process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tf32_state() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.usefixtures("tf32_flags")
def test_trainer_tf32_sets_matmul_and_cudnn_and_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each run sets both flags as configured, whatever an earlier run of the process left."""
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's defaults: matmul off, cuDNN on
    torch.backends.cudnn.allow_tf32 = True
    for i, on in enumerate([False, True, False]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="softmine.engine.trainer"):
            _trainer(tmp_path / str(i), f"trainer.tf32={str(on).lower()}")
        assert _tf32_state() == (on, on)
        # the matmul precision reads the same through torch's other API
        assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
        (line,) = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("training on")
        ]
        assert line.endswith(f"), TF32 {'on' if on else 'off'}"), line


@pytest.mark.usefixtures("tf32_flags")
def test_device_line_names_each_flag_when_they_differ() -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    assert setup_mod.describe_device(torch.device("cpu")).endswith("TF32 matmul off, cuDNN on")


@pytest.mark.usefixtures("tf32_flags")
@pytest.mark.parametrize("recorded", [{"tf32": False}, {"tf32": True}, {}])
def test_evaluate_checkpoint_uses_the_runs_tf32(
    monkeypatch: pytest.MonkeyPatch, recorded: dict
) -> None:
    """softmine-eval evaluates in the run's float32; a run recorded before the key: untouched."""
    from omegaconf import OmegaConf

    config = OmegaConf.create({"trainer": {"num_threads": "auto", **recorded}})
    loaded = SimpleNamespace(config=config, model=None, device=torch.device("cpu"))
    monkeypatch.setattr(evaluate_mod, "load_model", lambda path, device: loaded)
    seen = []

    class FakeEvaluator:
        def __init__(self, *args: object) -> None:
            pass

        def evaluate(self, model: object) -> dict:
            seen.append(_tf32_state())
            return {}

        def dropped_counts(self) -> dict:
            return {}

    monkeypatch.setattr(evaluate_mod, "Evaluator", FakeEvaluator)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    evaluate_mod.evaluate_checkpoint(Path("run"), "cpu")
    on = recorded.get("tf32")
    assert seen == [(on, on) if on is not None else (False, True)]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainer.interrupt_every=0", "interrupt_every"),
        ("trainer.progress_interval=-1", "progress_interval"),
        ("trainer.tf32=sometimes", "trainer.tf32 must be true or false"),
    ],
)
def test_bad_speed_options_are_config_errors(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _trainer(tmp_path, override)
