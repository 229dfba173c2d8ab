"""Old names (before issue 24) still work: the same config, the same objects, logged once.

``loss=osm_caa_official[_video]`` and ``experiment=reproduce_*`` became ``osm_caa_authors*``
and ``authors_*``; ``sampler.num_classes`` / ``num_samples`` became ``classes_per_batch`` /
``samples_per_class``; ``OSMCAAOfficial*Loss`` became ``OSMCAAAuthors*Loss``.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from softmine.config import (
    CONFIG_DIR,
    OLD_CONFIG_NAMES,
    build,
    compose_config,
    current_choices,
    old_choice_notes,
    upgrade_config,
    upgrade_overrides,
)
from softmine.errors import ConfigError
from softmine.runs.folder import Invocation, plan_run
from tests.conftest import FAST_DIGITS, REPO, run_cli

#: Every renamed option, written out here (not read from the table under test).
RENAMED = [
    ("loss", "osm_caa_official", "osm_caa_authors"),
    ("loss", "osm_caa_official_video", "osm_caa_authors_video"),
    ("experiment", "reproduce_cub", "authors_cub"),
    ("experiment", "reproduce_cars", "authors_cars"),
    ("experiment", "reproduce_cub_bbox", "authors_cub_bbox"),
    ("experiment", "reproduce_cars_bbox", "authors_cars_bbox"),
    ("experiment", "reproduce_mars", "authors_mars"),
    ("experiment", "reproduce_ilidsvid", "authors_ilidsvid"),
    ("experiment", "reproduce_lpw", "authors_lpw"),
]


def _composed(override: str) -> tuple[dict, dict]:
    """(the config without Hydra's node, Hydra's group choices) of ``train`` with ``override``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=[override], return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    config = OmegaConf.to_container(cfg, resolve=False)
    del config["hydra"]
    return config, choices  # type: ignore[return-value]


def test_the_table_names_every_renamed_option_and_its_file() -> None:
    table = {(g, old, new) for g, names in OLD_CONFIG_NAMES.items() for old, new in names.items()}
    assert table == set(RENAMED)
    for group, old, new in RENAMED:
        text = (REPO / "configs" / group / f"{old}.yaml").read_text()
        assert yaml.safe_load(text)["defaults"] == [new]  # the alias only pulls the new file


@pytest.mark.parametrize(("group", "old", "new"), RENAMED)
@pytest.mark.slow
def test_an_old_option_composes_the_new_config_and_says_so_once(
    group: str, old: str, new: str
) -> None:
    old_cfg, old_choices = _composed(f"{group}={old}")
    new_cfg, new_choices = _composed(f"{group}={new}")
    assert old_cfg == new_cfg  # nothing added: no marker node in the config
    assert old_choices[group] == old and new_choices[group] == new
    assert {k: v for k, v in old_choices.items() if k != group} == {
        k: v for k, v in new_choices.items() if k != group
    }
    assert current_choices(old_choices) == new_choices
    assert old_choice_notes(old_choices) == [f"{group}={old} is an old name for {group}={new}"]
    assert old_choice_notes(new_choices) == []


def test_old_override_keys_are_renamed_before_hydra_reads_them() -> None:
    given = [
        "sampler.num_classes=4",
        "+sampler.num_samples=3",
        "~sampler.num_classes",
        "sampler.num_samples=2,3",
        "loss.num_classes=7",  # the training classes of a loss keep their name
        "backbone.num_classes=7",
        "seed=1",
    ]
    out, notes = upgrade_overrides(given)
    assert out == [
        "sampler.classes_per_batch=4",
        "+sampler.samples_per_class=3",
        "~sampler.classes_per_batch",
        "sampler.samples_per_class=2,3",
        "loss.num_classes=7",
        "backbone.num_classes=7",
        "seed=1",
    ]
    assert notes == [
        "sampler.num_classes is an old name for sampler.classes_per_batch",
        "sampler.num_samples is an old name for sampler.samples_per_class",
    ]


def test_old_sampler_keys_give_the_same_sampler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="softmine.config"):
        old = compose_config(["sampler.num_classes=3", "sampler.num_samples=2"])
    new = compose_config(["sampler.classes_per_batch=3", "sampler.samples_per_class=2"])
    assert OmegaConf.to_container(old) == OmegaConf.to_container(new)
    said = [r.getMessage() for r in caplog.records if "old name" in r.getMessage()]
    assert len(said) == 2 and "sampler.num_classes is an old name" in said[0]
    assert "num_classes" not in old.sampler and "num_samples" not in old.sampler
    labels = np.repeat(np.arange(6), 4)
    a, b = (
        build(old.sampler, "sampler", labels=labels),
        build(new.sampler, "sampler", labels=labels),
    )
    assert (a.P, a.K) == (b.P, b.K) == (3, 2)
    assert a.rank_batches(0) == b.rank_batches(0)


def test_a_recorded_config_with_the_old_keys_is_upgraded_to_the_same_sampler() -> None:
    new = OmegaConf.to_container(compose_config(["sampler.classes_per_batch=3"]))
    recorded = OmegaConf.to_container(compose_config(["sampler.classes_per_batch=3"]))
    sampler = recorded["sampler"]  # as a run recorded it before the rename: P, K as num_*
    sampler["num_classes"] = sampler.pop("classes_per_batch")
    sampler["num_samples"] = sampler.pop("samples_per_class")
    notes = upgrade_config(recorded)
    assert recorded == new
    assert notes == [
        "sampler.num_classes is an old name for sampler.classes_per_batch",
        "sampler.num_samples is an old name for sampler.samples_per_class",
    ]
    labels = np.repeat(np.arange(5), 8)
    a = build(OmegaConf.create(recorded["sampler"]), "sampler", labels=labels)
    b = build(OmegaConf.create(new["sampler"]), "sampler", labels=labels)
    assert a.rank_batches(1) == b.rank_batches(1)


def test_an_old_key_set_in_a_config_wins_over_the_default_of_the_new_one() -> None:
    cfg = compose_config()
    OmegaConf.set_struct(cfg, False)  # as Hydra composes: struct only once every file is merged
    with_old = OmegaConf.merge(cfg, {"sampler": {"num_classes": 3}})  # e.g. a user's own yaml
    OmegaConf.set_struct(with_old, True)
    OmegaConf.set_struct(cfg, True)
    upgrade_config(with_old)
    assert with_old.sampler.classes_per_batch == 3 and "num_classes" not in with_old.sampler
    assert upgrade_config(cfg) == []  # today's names: nothing to do


def test_upgrading_reads_the_config_as_written() -> None:
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "tuned": "???",  # experiment=fair before its tuned file is chosen
            "out": "${hydra:runtime.output_dir}",  # resolvable only inside a Hydra job
            "sampler": {"num_classes": "${seed}", "samples_per_class": 2},
            "loss": {"_target_": "softmine.losses.OSMCAAOfficialVideoLoss", "heads": None},
        }
    )
    OmegaConf.set_struct(cfg, True)
    assert len(upgrade_config(cfg)) == 2
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["sampler"] == {"samples_per_class": 2, "classes_per_batch": "${seed}"}
    assert raw["loss"]["_target_"] == "softmine.losses.OSMCAAAuthorsVideoLoss"
    assert raw["tuned"] == "???" and raw["out"] == "${hydra:runtime.output_dir}"


def test_old_class_names_import_as_the_new_classes() -> None:
    from softmine.losses.osm_caa_official import OSMCAAOfficialLoss as from_old_module

    import softmine.losses as losses
    import softmine.losses.osm_caa_authors as authors
    from softmine.losses import OSMCAAOfficialLoss, OSMCAAOfficialVideoLoss

    assert OSMCAAOfficialLoss is losses.OSMCAAAuthorsLoss is from_old_module
    assert OSMCAAOfficialVideoLoss is losses.OSMCAAAuthorsVideoLoss
    import softmine.losses.osm_caa_official as old_module

    assert old_module is authors
    assert authors.released_pair_loss is authors.authors_pair_loss


def test_a_recorded_old_target_builds_and_is_upgraded() -> None:
    node = {"_target_": "softmine.losses.OSMCAAOfficialLoss", "num_classes": 4, "embedding_dim": 6}
    from softmine.losses import OSMCAAAuthorsLoss

    assert type(build(OmegaConf.create(node), "loss")) is OSMCAAAuthorsLoss
    cfg = {"loss": dict(node)}
    assert upgrade_config(cfg) == [
        "softmine.losses.OSMCAAOfficialLoss is an old name for softmine.losses.OSMCAAAuthorsLoss"
    ]
    assert cfg["loss"]["_target_"] == "softmine.losses.OSMCAAAuthorsLoss"


# ----------------------------------------------------------------------------- resume


def _old_record(run_dir: Path, given: list[str], choices: dict[str, str]) -> None:
    """A finished run folder as the code before the rename wrote it: the old sampler keys, the
    old loss class and the old option names in its group choices."""
    config = OmegaConf.to_container(compose_config(given))
    config["sampler"]["num_classes"] = config["sampler"].pop("classes_per_batch")
    config["sampler"]["num_samples"] = config["sampler"].pop("samples_per_class")
    config["loss"]["_target_"] = "softmine.losses.OSMCAAOfficialLoss"
    record = run_dir / ".hydra"
    record.mkdir(parents=True)
    (record / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (record / "overrides.yaml").write_text(yaml.safe_dump(given))
    hydra = {"hydra": {"runtime": {"choices": choices}}}
    (record / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run_dir / "metrics.json").write_text(json.dumps({"map@r": 0.5}))


@pytest.mark.parametrize("name", ["osm_caa_official", "osm_caa_authors"])
def test_a_run_recorded_under_the_old_names_resumes_under_either(tmp_path: Path, name: str) -> None:
    base = ["trainer.device=cpu", *FAST_DIGITS]
    _old_record(tmp_path, [*base, "loss=osm_caa_authors"], {"loss": "osm_caa_official"})
    given = [*base, f"loss={name}", "resume=true"]
    cfg = compose_config(given)
    upgrade_config(cfg)
    plan = plan_run(Invocation(tmp_path, cfg, given, choices={"loss": name}))
    assert plan.action == "finished"
    changed = compose_config([*given, "seed=5"])  # the check itself still holds
    with pytest.raises(ConfigError, match=r"seed \(0 -> 5\)"):
        plan_run(Invocation(tmp_path, changed, given, choices={"loss": name}))


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_the_train_command_logs_each_old_name_once_and_records_the_new_ones(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    common = [
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        "trainer.plots=false",
        "trainer.tensorboard=false",
        "trainer.max_iters=2",
        "trainer.eval_every=0",
        f"hydra.run.dir={run_dir}",
    ]
    old = ["loss=osm_caa_official", "sampler.num_classes=5", "sampler.num_samples=4"]
    res = run_cli(["softmine.commands.train", *old, *common], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    said = re.findall(r"(\S+) is an old name for (\S+)", res.stdout + res.stderr)
    assert sorted(said) == [
        ("loss=osm_caa_official", "loss=osm_caa_authors"),
        ("sampler.num_classes", "sampler.classes_per_batch"),
        ("sampler.num_samples", "sampler.samples_per_class"),
    ]
    recorded = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert recorded["sampler"]["classes_per_batch"] == 5
    assert recorded["sampler"]["samples_per_class"] == 4
    assert "num_classes" not in recorded["sampler"] and "num_samples" not in recorded["sampler"]
    assert recorded["loss"]["_target_"] == "softmine.losses.OSMCAAAuthorsLoss"
    new = ["loss=osm_caa_authors", "sampler.classes_per_batch=5", "sampler.samples_per_class=4"]
    again = run_cli(["softmine.commands.train", *new, *common, "resume=true"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has already finished" in again.stdout + again.stderr
    assert "old name" not in again.stdout + again.stderr


@pytest.mark.parametrize(
    "target", ["cub", "cars", "cub-bbox", "cars-bbox", "mars", "lpw", "ilidsvid"]
)
def test_make_reproduce_targets_run_the_authors_targets(target: str) -> None:
    def dry(name: str) -> str:
        res = subprocess.run(
            ["make", "-n", "-C", str(REPO), name], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    commands = dry(f"authors-{target}")
    assert f"experiment=authors_{target.replace('-', '_')}" in commands
    assert dry(f"reproduce-{target}") == commands
