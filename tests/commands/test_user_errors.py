"""Every user mistake is one line on stderr, ``error: ...``, and exit code 2: bad values, Hydra's
own key and option typos (with the closest valid one named), bad checkpoints and archives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose


def _train(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``softmine-train ARGS`` in this process; returns (exit code, stderr)."""
    from softmine.commands.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("SOFTMINE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["softmine-train", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr must be a finite number > 0 (got -1)"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0 (got nan)"),
        ("seed=abc", "seed must be a whole number (got 'abc')"),
        ("seed=1.5", "seed must be a whole number (got 1.5)"),
        ("trainer.epochs=abc", "trainer.epochs must be a number (got 'abc')"),
        ("trainer.grad_clip=0", "trainer.grad_clip must be > 0 or null"),
        ("resume_override=[trainer.epoch]", "resume_override names 'trainer.epoch'"),
        ("trainer.epoch=3", "unknown config key 'trainer.epoch'; did you mean trainer.epochs?"),
        ("loss.margn=1", "unknown config key 'loss.margn'; did you mean loss.margin?"),
        ("lossx=osm", "unknown config key 'lossx'; did you mean loss?"),
        ("hydra.run.dirr=x", "did you mean hydra.run.dir?"),
        ("loss=osmcaa", "has no option 'osmcaa'; did you mean loss=osm_caa?"),
        ("trainer.epochs=[1", "cannot parse the override 'trainer.epochs=[1'"),
        ("+seed=3", "seed already exists; set it with seed=... (without the +)"),
        ("loss.margin=${oops}", "cannot resolve loss.margin: Interpolation key 'oops' not found"),
    ],
)
def test_bad_command_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch, capsys, override: str, message: str
) -> None:
    code, err = _train([override, *FAST_DIGITS], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert message in _one_line(err)
    assert not any((tmp_path / "outputs").rglob("*.yaml"))  # no run was recorded


@pytest.mark.parametrize(
    "overrides",
    [["loss=proxy_anchor", "loss.memory=xbm"], ["loss=normsoftmax", "+loss.memory=xbm"]],
)
def test_cross_batch_memory_on_a_loss_without_pairs_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch, capsys, overrides: list[str]
) -> None:
    """Proxy and classifier losses have no loss.memory key (Hydra's error) and, given one with +,
    refuse it when built: either way one line naming the pair losses as the fix."""
    code, err = _train(
        [*overrides, "trainer.max_iters=1", *FAST_DIGITS], tmp_path, monkeypatch, capsys
    )
    assert code == 2
    line = _one_line(err)
    assert f"{overrides[0]} does not take a cross-batch memory" in line
    assert "drop loss.memory" in line and "contrastive" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be a finite number >= 0"),
        (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum must be a finite number"),
        (["optimizer=adamw", "optimizer.betas=[0.9,1.5]"], "optimizer.betas must be two numbers"),
        (["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "needs optimizer."),
        (["evaluation.ks=[0,1]"], "evaluation.ks must be a list of whole numbers >= 1"),
        (["evaluation.ks=[]"], "evaluation.ks must be a list of whole numbers >= 1"),
        (["evaluation.ranks=[1,abc]"], "evaluation.ranks must be a list of whole numbers >= 1"),
        (["evaluation.ap=markte"], "evaluation.ap must be one of ('standard', 'market')"),
        (["evaluation.rerank=maybe"], "evaluation.rerank must be true or false (got 'maybe')"),
        (["evaluation.rerank_k1=0"], "evaluation.rerank_k1 must be a whole number >= 1 (got 0)"),
        (
            ["evaluation.rerank_k1=7", "evaluation.rerank_k2=9"],
            "evaluation.rerank_k2 must be at most evaluation.rerank_k1 + 1 = 8 (got 9)",
        ),
        (["evaluation.rerank_lambda=1.5"], "evaluation.rerank_lambda must be a number in [0, 1]"),
        (
            ["evaluation.rerank_expansion=matlab"],
            "evaluation.rerank_expansion must be one of zhong, authors",
        ),
        (["evaluation.rerank_k2=null"], "evaluation.rerank_k2 must be a number (got null)"),
        (["evaluation.frame_batch_size=0"], "evaluation.frame_batch_size must be a whole number"),
        (["trainer.num_threads=0"], "trainer.num_threads must be auto or a whole number >= 1"),
        (
            ["+evaluation.reid_variants.x.ap=standard"],
            "evaluation.reid_variants applies to re-ID evaluation",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_optimizer_and_evaluation_values_fail_before_training(
    tmp_path: Path, monkeypatch, capsys, overrides: list[str], message: str
) -> None:
    """torch's optimizers raised ValueError tracebacks; evaluation.ks=[0,1] failed only once
    training had ended. Every such value is one line before the run starts."""
    args = [*overrides, "trainer.max_iters=2", *FAST_DIGITS]
    code, err = _train(args, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert message in _one_line(err)
    assert not any(tmp_path.rglob("train_log.csv"))  # no step was trained


def test_an_optimizer_value_torch_refuses_is_one_line(tmp_path: Path) -> None:
    """A check validate_config lacks (here a key the optimizer gains with +) is still one line."""
    from softmine.engine.optim import build_optimizer

    cfg = compose(["optimizer=adamw", "+optimizer.amsgrad=true"]).optimizer
    cfg.lr = -1.0  # torch's "Invalid learning rate", past validate_config
    with pytest.raises(ConfigError, match="optimizer: Invalid learning rate: -1.0"):
        build_optimizer(cfg, [("model.w", torch.nn.Parameter(torch.zeros(2)))])


def test_softmine_eval_bad_ks_is_a_usage_error(tmp_path: Path, capsys) -> None:
    from softmine.commands.evaluate import main

    path = tmp_path / "e.npz"
    x = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], np.float32)  # two tight pairs
    np.savez(path, embeddings=x, labels=np.array([0, 0, 1, 1]))
    for ks in ("1,abc", "0,1", ""):
        with pytest.raises(SystemExit) as e:
            main([str(path), "--ks", ks])
        assert e.value.code == 2
        assert "--ks 1,2,4,8" in _one_line(capsys.readouterr().err)
    main([str(path), "--ks", "1, 2"])
    out = capsys.readouterr().out
    assert '"recall@1": 1.0' in out and '"recall@2": 1.0' in out


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (  # what the shell makes of an unquoted path with spaces
            ["dataset.root=/tmp/my", "big", "photos", "trainer.epochs=1"],
            "'big' is not key=value: a value with spaces must be quoted as one argument, "
            "'dataset.root=/tmp/my big photos'",
        ),
        (["photos"], "overrides are key=value, e.g. trainer.epochs=5 (got 'photos')"),
        (["dataset.root=/tmp/my (1)"], "quote the value for Hydra: \"dataset.root='/tmp/my (1)'\""),
        (["dataset.root=/tmp/it's"], 'quote the value for Hydra: "dataset.root=\\"/tmp/it\'s\\""'),
    ],
)
def test_a_value_that_needs_quotes_gets_the_quoting_hint(
    tmp_path: Path, monkeypatch, capsys, argv: list[str], hint: str
) -> None:
    """Hydra's grammar error alone did not say that the path needed quotes, nor how."""
    code, err = _train([*argv, *FAST_DIGITS], tmp_path, monkeypatch, capsys)
    assert code == 2
    line = _one_line(err)
    assert hint in line and "see https://hydra.cc/docs/advanced/override_grammar/basic/" in line


def test_the_suggested_quoting_is_what_hydra_reads() -> None:
    """Each hint, run through a shell, gives Hydra the value the user meant."""
    import shlex

    from softmine.commands.hydra_errors import quoting_hint

    for value in ("/tmp/my (1)", "/tmp/it's", "/tmp/a=b", "C:\\data"):
        hint = quoting_hint(f"dataset.root={value}", [])
        (word,) = shlex.split(hint.rsplit(": ", 1)[1])  # one argument, as the shell passes it
        assert compose([word]).dataset.root == value


@pytest.mark.slow
def test_an_interpolation_in_an_override_is_kept_as_written(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tmp_path / "R"
    args = ["loss.margin=${loss.sigma}", "trainer.epochs=1", f"hydra.run.dir={run}"]
    code, err = _train([*args, *FAST_DIGITS], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "loss.margin=${loss.sigma}" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_learning_rate_that_overflows_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["optimizer.lr=1e38", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'R'}"]
    code, err = _train([*args, *FAST_DIGITS], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "optimizer.lr=1e+38 is too large" in _one_line(err)


@pytest.mark.slow
def test_empty_checkpoint_on_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "R"
    args = ["trainer.epochs=1", f"hydra.run.dir={run}", *FAST_DIGITS]
    assert _train(args, tmp_path, monkeypatch, capsys)[0] == 0
    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # a copy cut off by a full disk
    code, err = _train([*args, "resume=true"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "is empty (0 bytes)" in _one_line(err)


def _eval(path: Path, capsys) -> tuple[int, str]:
    from softmine.commands.evaluate import main

    with pytest.raises(SystemExit) as e:
        main([str(path)])
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("random.pt", bytes(range(1, 256)) * 8, "is not a PyTorch checkpoint"),
        ("empty.pt", b"", "is empty (0 bytes)"),
        ("truncated.pt", None, "is truncated or damaged"),
        ("text.npz", b"embeddings,labels\n1,2\n", "is not an .npz archive"),
        ("cut.npz", None, "is a damaged .npz archive"),
    ],
)
def test_bad_files_for_softmine_eval(
    tmp_path: Path, capsys, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if name == "truncated.pt":
        import torch

        torch.save({"model": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif name == "cut.npz":
        np.savez(path, embeddings=np.zeros((50, 4)), labels=np.zeros(50))
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    code, err = _eval(path, capsys)
    assert code == 2
    line = _one_line(err)
    assert message in line
    assert "weights_only" not in line and "pickle" not in line  # no unsafe advice


class Foreign:
    """A class that a pickled checkpoint would have to import and build."""


def test_checkpoint_holding_python_objects_is_refused_without_running_them(
    tmp_path: Path, capsys
) -> None:
    import torch

    path = tmp_path / "foreign.pt"
    torch.save({"model": Foreign()}, path)
    code, err = _eval(path, capsys)
    assert code == 2
    assert f"stores Python objects ({__name__}.Foreign)" in _one_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.2, 2.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path, after_s: float) -> None:
    """Early (importing) or later (building the data and model): never a traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "softmine.commands.train", "trainer.epochs=1", *FAST_DIGITS],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by SIGINT: when the interrupt landed in code that an extension runs
    # through PyRun_* (pybind11's exec while torch imports), CPython marks it unhandled and
    # ends by re-raising SIGINT after our exit(130). A shell reports both as 130.
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert "interrupted" in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_during_start_up_is_never_lost(monkeypatch, capsys) -> None:  # noqa: ANN001
    """Python's own handler only raises KeyboardInterrupt, which a ``__del__`` swallows, or
    which breaks a library half-way (OmegaConf then raises AttributeError); the command's
    start-up handler notes the request, so either way it stops with the one line and 130."""
    from softmine.commands import train
    from softmine.runs import signals

    saved = {s: signal.getsignal(s) for s in signals.GracefulInterrupt.SIGNALS}
    monkeypatch.setattr(signals, "_pending", None)
    monkeypatch.setattr(sys, "argv", ["softmine-train"])

    class Swallows:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # its KeyboardInterrupt is printed and ignored

    def start_up_broken_by_the_interrupt() -> None:
        obj = Swallows()
        del obj
        raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")

    monkeypatch.setattr(train, "_main", start_up_broken_by_the_interrupt)
    try:
        with pytest.raises(SystemExit) as e:
            train.main()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("interrupted before training began")
    assert signals.pending() == signal.SIGINT  # a training loop would still stop after a step


def test_a_real_error_during_start_up_without_an_interrupt_is_not_hidden(monkeypatch) -> None:  # noqa: ANN001
    from softmine.commands import train
    from softmine.runs import signals

    saved = {s: signal.getsignal(s) for s in signals.GracefulInterrupt.SIGNALS}
    monkeypatch.setattr(signals, "_pending", None)
    monkeypatch.setattr(sys, "argv", ["softmine-train"])

    def bug() -> None:
        raise AttributeError("a bug")

    monkeypatch.setattr(train, "_main", bug)
    try:
        with pytest.raises(AttributeError, match="a bug"):
            train.main()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


#: A start-up that a first Ctrl-C interrupts while the process still has slow work to wind
#: down at exit: an exit handler (atexit) or a thread Python joins before exiting (a cache
#: build's decoder). The child prints "winding down" when that work starts.
_SLOW_EXIT = """
import atexit, os, signal, sys, threading, time
from softmine.commands import train
def slow():
    print("winding down", flush=True)
    time.sleep(20)

def start_up():
    if sys.argv[1] == "atexit":
        atexit.register(slow)
    else:
        threading.Thread(target=lambda: (time.sleep(0.5), slow())).start()
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
    time.sleep(20)

train._main = start_up
train.main()
"""


def _python(cwd: Path, *args: str) -> subprocess.Popen:
    """``python ARGS`` in ``cwd`` with pipes, as a user's shell would start a command."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("where", ["atexit", "thread"])
def test_a_second_ctrl_c_while_exiting_is_no_traceback(tmp_path: Path, where: str) -> None:
    """The issue's rare atexit traceback on a double Ctrl-C during start-up: the second
    KeyboardInterrupt landed in an exit handler (or in Python's join of a running thread)
    and was printed as "Exception ignored in ...". Now it ends the process at once."""
    proc = _python(tmp_path, "-c", _SLOW_EXIT, where)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "winding down"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 10  # at once, not after the 20 s of work
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted before training began; nothing was saved (run the command again)"
    ]


_LOST_FIRST = """
import os, signal, time
from softmine.commands import train
class Swallows:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: raised in __del__, it is lost

def start_up():
    obj = Swallows()
    del obj
    print("swallowed", flush=True)
    time.sleep(20)  # start-up goes on

train._main = start_up
train.main()
"""


def test_a_second_ctrl_c_when_the_first_was_lost_ends_the_start_up(tmp_path: Path) -> None:
    """The first KeyboardInterrupt landed in a ``__del__``: Python printed it as "Exception
    ignored in ..." with a traceback, and start-up went on. The interrupt is noted, so that
    print is silenced, and the second signal stops the command with the one line at once
    (not, say, after a long cache build)."""
    proc = _python(tmp_path, "-c", _LOST_FIRST)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "swallowed"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "interrupted before training began; nothing was saved (run the command again)"
    ]
