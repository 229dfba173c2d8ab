"""``softmine-train``: the Hydra app that trains an embedding and evaluates it by retrieval.

Examples::

    softmine-train                                   # OSM+CAA on digits
    softmine-train loss=contrastive trainer.epochs=5
    softmine-train -m loss=osm_caa,contrastive seed=0,1,2   # sweep; writes summary.csv
    torchrun --nproc_per_node=2 -m softmine.train           # data parallel over 2 processes
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from softmine.cli import user_errors_exit
from softmine.config import CONFIG_DIR
from softmine.engine import Trainer
from softmine.engine.distributed import (
    DistEnv,
    export_submitit_ranks,
    init_from_env,
    run_stamp,
)

OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


@user_errors_exit
def run(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate in the current Hydra run folder; returns the final metrics."""
    if cfg.get("debug"):
        os.environ["SOFTMINE_DEBUG"] = "1"
    if export_submitit_ranks():  # a task of a multi-task SLURM job: join its process group here
        init_from_env()
    if not DistEnv.current().is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return Trainer(cfg, run_dir).fit()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    metrics = run(cfg)
    return float(metrics.get("map@r", metrics.get("mAP", 0.0)))


def main() -> None:
    """Console entry point; under ``torchrun`` it joins the process group first.

    Tasks of a SLURM job started by submitit join theirs in :func:`run`, inside the job.
    """
    init_from_env()
    hydra_main()


if __name__ == "__main__":
    main()
