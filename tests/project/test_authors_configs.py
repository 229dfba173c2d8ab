"""The authors_* experiments hold the authors' released values, so a config edit cannot drift.

Every expected value below is read off a file of the authors' repository
(XinshaoAmosWang/OSM_CAA_WeightedContrastiveLoss at a8911b9); the file is named beside it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from softmine.engine.evaluator import Evaluator, rerank_options
from softmine.engine.schedules import multistep
from softmine.engine.trainer import Trainer
from tests.conftest import REPO, compose, run_cli

HEADS = {"loss1": "inception_3c", "loss2": "embedding", "loss3": "pool5"}  # train.prototxt


def _common_image(cfg) -> None:
    assert cfg.seed == 123  # train.m: seed = 123
    assert (cfg.sampler.classes_per_batch, cfg.sampler.samples_per_class) == (
        8,
        7,
    )  # train.m id_num, image_per_id
    assert cfg.loss._target_ == "softmine.losses.OSMCAAAuthorsLoss"
    assert (cfg.loss.sigma, cfg.loss.margin) == (0.8, 1.2)  # V5 layer gaussian_param, margin
    assert (cfg.loss.attention_sigma, cfg.loss.ce_mean, cfg.loss.ce_sigma) == (0.68, 0.5, 0.18)
    assert {h: o.feature for h, o in cfg.loss.heads.items()} == HEADS
    assert all(o.weighting == "gaussian" and o.weight == 1.0 for o in cfg.loss.heads.values())
    assert cfg.loss.attention_head == "loss3"  # attention/prob3 reads prob3
    assert cfg.loss.divide_by_pairs is True
    assert OmegaConf.to_container(cfg.optimizer.param_groups) == [
        {"pattern": "loss.heads.*.linear.bias", "lr_mult": 2.0, "decay_mult": 0.0}
    ]  # classifier_1 bias: lr_mult 2, decay_mult 0
    assert cfg.optimizer.momentum == 0.9  # solver.prototxt momentum
    # get_train_minibatch.m:6-21: 8 classes uniformly per batch, randperm(len, 7) images of each
    assert (cfg.sampler.draw, cfg.sampler.within_class) == ("uniform_classes", "distinct")
    assert (cfg.trainer.eval_every_iters, cfg.trainer.eval_start_iter) == (250, 1000)  # train.m
    _authors_backbone(cfg)


def _authors_backbone(cfg) -> None:
    # the authors trained on one GPU: torchrun ranks share their batch, with synchronised BN
    assert cfg.sampler.split_across_ranks is True and cfg.trainer.sync_bn is True
    b = cfg.backbone
    assert b.embedding_dim == 1024 and b.head is False  # loss2/fc num_output 1024
    assert b.trunk.embedding_from == "inception_4e" and b.trunk.conv_bias is False
    assert set(b.trunk.features) == {"inception_3c", "pool5"}
    assert b.bn_momentum == 0.001  # Caffe BatchNorm moving_average_fraction 0.999
    assert list(b.input_norm.mean) == [104.0, 117.0, 123.0]  # process_image.m
    assert b.input_norm.channel_order == "bgr" and b.input_norm.scale == 255.0
    # no augmentation: the whole image resized to 224 x 224 (process_image.m)
    assert cfg.dataset.transform.size == 224
    for split in ("train", "test"):
        names = [t._target_.rsplit(".", 1)[1] for t in cfg.dataset.transform[split].transforms]
        assert names == ["ToImage", "Resize"], names


def test_authors_cub_holds_the_released_values() -> None:
    cfg = compose(["experiment=authors_cub"])
    _common_image(cfg)
    assert cfg.dataset.name == "cub"
    # CUB_V01/M_WIDE_ASiamese_V42_e1/solver.prototxt
    assert cfg.optimizer.lr == 0.0005 and cfg.optimizer.weight_decay == 0.0003
    assert list(cfg.scheduler.milestones) == [500, 1000, 1500, 1501, 2000, 2001]
    assert cfg.scheduler.gamma == 0.5
    assert cfg.trainer.max_iters == 3000  # train.m param.train_maxiter


def test_authors_cars_holds_the_released_values() -> None:
    cfg = compose(["experiment=authors_cars"])
    _common_image(cfg)
    assert cfg.dataset.name == "cars196"
    # CARS196_V01/M_WIDE_ASiamese_V62_e1/solver.prototxt
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.weight_decay == 0.00005
    assert list(cfg.scheduler.milestones) == [1500, 3000, 4500, 6000]
    assert cfg.trainer.max_iters == 10000  # train.m


def test_authors_mars_holds_the_released_values() -> None:
    cfg = compose(["experiment=authors_mars"])
    assert cfg.seed == 123 and cfg.dataset.name == "mars"
    assert cfg.dataset.seq_len == 9  # 54 frames / tracklet_num 6 (train.m, train.prototxt)
    assert (cfg.sampler.classes_per_batch, cfg.sampler.samples_per_class) == (
        3,
        2,
    )  # selects = [selects, selects]
    assert cfg.loss._target_ == "softmine.losses.OSMCAAAuthorsVideoLoss"
    assert (cfg.loss.sigma, cfg.loss.margin, cfg.loss.attention_sigma) == (1.0, 1.2, 0.68)
    assert {h: o.feature for h, o in cfg.loss.heads.items()} == HEADS
    assert cfg.loss.attention_head == "loss3"
    assert cfg.loss.tracklet_head.weighting == "gaussian" and cfg.loss.image_pair_weight == 1.0
    # MARS_V01/M_WIDE_WF_WIDE_ASiamese_V20_e2/solver.prototxt
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.weight_decay == 0.0005
    assert list(cfg.scheduler.milestones) == [20000, 30000, 40000, 50000]
    assert cfg.backbone.pooling == "mean" and cfg.backbone.eval_pooling == "mean"
    # generate_Mars_test_dataset_V001.m:34 (label = folder index - 3: 00-1 is label 0) and
    # evaluation_mars.m:4 (junk = label 0): junk -1 only, 0000 distractors kept; compute_AP.m
    assert OmegaConf.to_container(cfg.evaluation.reid_variants.authors) == {
        "junk_pids": [-1],
        "distractor_pids": [0],
        "ap": "market",
    }
    assert list(cfg.dataset.junk_pids) == [-1] and list(cfg.dataset.distractor_pids) == [0]
    assert cfg.trainer.monitor == "cmc@1"  # rank-1: the same under the standard and their rule
    # test_script_Mars_global_rerank.m:41-43: k1 = 7, k2 = 3, lambda = 0.85
    assert cfg.evaluation.rerank is True
    e = cfg.evaluation
    assert (e.rerank_k1, e.rerank_k2, e.rerank_lambda) == (7, 3, 0.85)
    assert (
        e.rerank_expansion == "authors"
    )  # re_ranking_cosine.m:30: round((k1+1)/2), itself included
    # get_train_minibatch_Mars_V006_even.m:8-17: 3 identities uniformly, a tracklet per slot
    assert (cfg.sampler.draw, cfg.sampler.within_class) == ("uniform_classes", "independent")
    _authors_backbone(cfg)


def _eval_iterations(cfg) -> list[int]:
    """The iterations at which the trainer's own rule evaluates under ``cfg`` (the final one too)."""
    stub = SimpleNamespace(cfg=cfg, state=SimpleNamespace(step=0))
    due = []
    for step in range(1, cfg.trainer.max_iters + 1):
        stub.state.step = step
        if Trainer._eval_due_at_step(stub) or step == cfg.trainer.max_iters:
            due.append(step)
    return due


@pytest.mark.slow
def test_authors_mars_runs_their_length_and_evaluates_as_they_did() -> None:
    """train.m:24-26: test_start 40000, test_interval 5000, train_maxiter 100000."""
    cfg = compose(["experiment=authors_mars"])
    assert cfg.trainer.max_iters == 100000
    assert _eval_iterations(cfg) == list(range(40000, 100001, 5000))  # 60000 (reported) among them
    assert cfg.trainer.checkpoint_every == 5000  # a snapshot at every evaluation, as they saved


def test_authors_mars_reports_reranked_metrics_beside_the_plain_ones() -> None:
    cfg = compose(["experiment=authors_mars"])
    assert rerank_options(cfg.evaluation) == {
        "k1": 7,
        "k2": 3,
        "lambda_value": 0.85,
        "expansion": "authors",
    }
    names = Evaluator.metric_names(
        SimpleNamespace(cfg=cfg, protocol="reid", has_test=True, validation=None)
    )
    plain = ["cmc@1", "cmc@5", "cmc@10", "cmc@20", "mAP"]
    assert names == [
        *plain,
        *[f"authors/{n}" for n in plain],
        *[f"rerank/{n}" for n in plain],
        *[f"rerank/authors/{n}" for n in plain],
    ]


@pytest.mark.parametrize("experiment", ["authors_cub", "authors_cars"])
def test_recall_at_k_columns_are_those_of_their_logs(experiment: str) -> None:
    """test_one_model.m:21-29 (CUB_V01 and CARS196_V01): R@2^(i-1), i = 1..6."""
    cfg = compose([f"experiment={experiment}"])
    assert list(cfg.evaluation.ks) == [1, 2, 4, 8, 16, 32]


def test_authors_lpw_is_mars_with_the_lpw_solver() -> None:
    cfg = compose(["experiment=authors_lpw"])
    assert cfg.dataset.name == "lpw" and cfg.loss.sigma == 0.6  # LPW train.prototxt
    # LPW_V01/M_WIDE_WF_WIDE_ASiamese_V20_e5/solver.prototxt, train_LPW.m
    assert cfg.optimizer.weight_decay == 0.0001 and cfg.optimizer.lr == 0.001
    assert list(cfg.scheduler.milestones) == [30000, 40000, 50000]
    assert cfg.trainer.max_iters == 65000
    assert (cfg.trainer.eval_every_iters, cfg.trainer.eval_start_iter) == (5000, 50000)
    assert cfg.evaluation.reid_variants.authors is None  # a plain CMC in their test script
    assert cfg.loss._target_ == "softmine.losses.OSMCAAAuthorsVideoLoss"
    _authors_backbone(cfg)


def test_caffe_multistep_with_repeated_steps_gives_the_authors_rates() -> None:
    """Caffe passes one stepvalue per iteration: x0.5 at 1500 and again at 1501 (hand values)."""
    cfg = compose(["experiment=authors_cub"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0005)
    sched = multistep(opt, 3000, milestones=list(cfg.scheduler.milestones), gamma=0.5)
    rates = {}
    for step in range(3000):
        rates[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    expected = {0: 1, 499: 1, 500: 2, 1000: 4, 1499: 4, 1500: 8, 1501: 16, 2000: 32, 2001: 64}
    for step, div in expected.items():
        assert rates[step] == pytest.approx(0.0005 / div), step


def test_cfg_job_shows_the_schedule_and_no_augmentation(tmp_path) -> None:
    res = run_cli(["softmine.commands.train", "experiment=authors_cub", "--cfg", "job"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    job = OmegaConf.create(res.stdout)
    assert list(job.scheduler.milestones) == [500, 1000, 1500, 1501, 2000, 2001]
    train = OmegaConf.to_yaml(job.dataset.transform.train)
    assert "RandomResizedCrop" not in train and "Flip" not in train and "Crop" not in train


#: Every experiment but the old names (reproduce_*), which compose the authors_* ones exactly
#: (tests/config/test_config_old_names.py).
EXPERIMENTS = sorted(
    p.stem
    for p in (REPO / "configs" / "experiment").glob("*.yaml")
    if not p.stem.startswith("reproduce_")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_authors_experiments_train_as_caffe_did_and_the_others_do_not(experiment: str) -> None:
    """Caffe's SGD (sgd_solver.cpp:221), full float32 (no cuDNN, no TF32) and the authors'
    uniform class draw in every authors_* experiment; TF32 stays on everywhere else."""
    cfg = compose([f"experiment={experiment}", *_benchmark(experiment)])
    authors = experiment.startswith("authors_")
    assert (cfg.optimizer._target_ == "softmine.engine.optim.CaffeSGD") is authors
    assert cfg.trainer.tf32 is not authors
    assert (cfg.sampler.draw == "uniform_classes") is authors


def _benchmark(experiment: str) -> list[str]:
    """The fair benchmark's experiments need a data set with a protocol (and tuned settings)."""
    return ["dataset=digits_pairs"] if experiment in ("fair", "tune", "noise_fair") else []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves(experiment: str) -> None:
    """What ``--cfg job --resolve`` does: every interpolation replaced in place by its value
    (a resolver whose default is a list literal cannot be, the issue's "Value 'list' is not a
    supported primitive type")."""
    cfg = compose([f"experiment={experiment}", *_benchmark(experiment)])
    OmegaConf.resolve(cfg)
    assert not OmegaConf.to_yaml(cfg).count("${")  # nothing left unresolved
    their_logs = [1, 2, 4, 8, 16, 32]  # authors_cub/cars: R@1..32 as the authors' logs
    theirs = experiment.startswith(("authors_cub", "authors_cars"))  # and their _bbox runs
    ks = their_logs if theirs else cfg.dataset.recall_ks
    assert list(cfg.evaluation.ks) == list(ks)


def test_cfg_job_resolve_prints_the_final_values(tmp_path) -> None:
    res = run_cli(
        ["softmine.commands.train", "experiment=authors_cub", "--cfg", "job", "--resolve"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    job = OmegaConf.create(res.stdout)
    assert list(job.evaluation.ks) == [1, 2, 4, 8, 16, 32]  # the Recall@K of the authors' logs
    assert job.dataset.root == "data/CUB_200_2011"
    assert job.dataset.test.crop is job.dataset.crop is False  # values, not ${..crop}
    assert job.dataset.train.seed == job.seed  # not ${..label_noise_seed}
