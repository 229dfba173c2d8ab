"""The wheel carries every config: built from a clean copy of the repository and installed in a
fresh environment (or installed with ``pip install .``), the commands work from any directory.

The fresh environments see this interpreter's site-packages through a ``.pth`` line (the
dependencies, without downloading torch again); softmine itself comes only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from softmine import __version__
from tests.conftest import REPO

BUILD = ["--no-deps", "--no-build-isolation", "--quiet"]


def _clean_copy(dest: Path) -> Path:
    """The files git would check out (tracked, and new files not ignored), symlinks kept as links."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of the repository to make a clean copy")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src, dst = REPO / rel, dest / rel
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the work tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def _pip(*args: str) -> None:
    res = subprocess.run(  # without PYTHONPATH: a softmine on it would count as installed
        [sys.executable, "-m", "pip", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def _fresh_env(folder: Path) -> Path:
    """A new venv (no pip) whose only softmine is the one installed into it later."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return folder / "bin" / "python"


def _see_dependencies(python: Path) -> None:
    """Let ``python`` import this environment's packages (torch & co.) after its own."""
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(own, "dependencies.pth").write_text("".join(p + "\n" for p in sorted(ours)))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", "SOFTMINE_DEBUG": ""}


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_has_every_config_and_trains_the_demo_from_anywhere(tmp_path: Path) -> None:
    src = _clean_copy(tmp_path / "clone")
    _pip("wheel", *BUILD, "-w", str(tmp_path / "dist"), str(src))
    (wheel,) = (tmp_path / "dist").glob("softmine-*.whl")
    assert wheel.name.startswith(f"softmine-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        packed = {n for n in z.namelist() if n.startswith("softmine/configs/")}
    configs = {
        "softmine/configs/" + p.relative_to(src / "configs").as_posix()
        for p in (src / "configs").rglob("*.yaml")
    }
    assert "softmine/configs/train.yaml" in packed and packed == configs

    python = _fresh_env(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    _see_dependencies(python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import softmine; print(softmine.__file__)"], elsewhere)
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    bin_ = python.parent
    for name in ("softmine-train", "softmine"):
        res = _run([str(bin_ / name), "--version"], elsewhere)
        assert res.returncode == 0 and res.stdout.strip() == f"{name} {__version__}", res.stderr
    res = _run(
        [
            str(bin_ / "softmine-train"),
            "experiment=demo",
            "trainer.epochs=1",
            "hydra.run.dir=run",
            "trainer.progress_bar=false",
        ],
        elsewhere,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (elsewhere / "run" / "metrics.json").exists()
    assert "trained embedding" in res.stdout  # the demo's baseline table
    for name in ("softmine-embed", "softmine-index", "softmine-export", "softmine-eval"):
        res = _run([str(bin_ / name), "--help"], elsewhere)
        assert res.returncode == 0 and "usage:" in res.stdout, (name, res.stderr)
    # the user tools that were scripts/ in a clone: commands of the wheel
    res = _run([str(bin_ / "softmine"), "data", "--help"], elsewhere)
    assert res.returncode == 0 and "convert-caffemodel" in res.stdout and "check" in res.stdout


@pytest.mark.slow
def test_pip_install_dot_composes_the_demo(tmp_path: Path) -> None:
    src = _clean_copy(tmp_path / "clone")
    python = _fresh_env(tmp_path / "venv")
    _see_dependencies(python)  # first: the build needs setuptools (no build isolation, no download)
    _pip("--python", str(python), "install", *BUILD, str(src))
    where = _run([str(python), "-c", "import softmine; print(softmine.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    res = _run([str(python.parent / "softmine-train"), "experiment=demo", "--cfg", "job"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "baselines: true" in res.stdout and "_target_: softmine.models.TinyCNN" in res.stdout
