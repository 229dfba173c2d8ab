"""The metric vocabulary: which metric is the main one, and the order tables show them in."""

from __future__ import annotations

import random

import pytest

from softmine.engine.eval_history import metric_names as protocol_names
from softmine.engine.eval_history import resolve_monitor
from softmine.evaluation import metric_names as mn
from softmine.reporting.sweep_report import plot_metric as report_plot_metric
from softmine.runs.sweep import sweep_score as _score

RETRIEVAL_RUN = {  # metrics.json of a CUB run without held-out classes
    "recall@1": 0.55,
    "recall@2": 0.67,
    "map@r": 0.21,
    "r_precision": 0.32,
    "nmi": 0.6,
    "iteration": 1000,
}
REID_RUN = {"cmc@1": 0.84, "cmc@5": 0.94, "mAP": 0.72, "iteration": 4000}  # MARS: no MAP@R
VALIDATED_RUN = {  # digits with dataset.val_classes: the final, validation and chosen metrics
    **RETRIEVAL_RUN,
    "val/recall@1": 0.9,
    "val/map@r": 0.7,
    "selected/map@r": 0.2,
    "selected_iteration": 600,
    "best_test/map@r": 0.22,
    "best_test_iteration": 800,
}


@pytest.mark.parametrize(
    ("metrics", "main", "chooser"),
    [
        (RETRIEVAL_RUN, "map@r", "map@r"),
        (REID_RUN, "mAP", "mAP"),
        (VALIDATED_RUN, "map@r", "val/map@r"),
        ({"val/mAP": 0.5, "val/cmc@1": 0.7}, None, "val/mAP"),  # evaluation.test=false, re-ID
        ({"recall@1": 0.5, "nmi": 0.3}, "recall@1", "recall@1"),  # neither MAP@R nor mAP
        ({"nmi": 0.3, "iteration": 3}, None, None),
    ],
)
def test_the_main_metric(metrics: dict, main: str | None, chooser: str | None) -> None:
    assert mn.main_metric(metrics) == main
    assert mn.selection_metric(metrics) == chooser


def test_every_consumer_applies_the_same_rule() -> None:
    # the sweeper's score: the validation metric when there is one, never the test split then
    assert _score(RETRIEVAL_RUN) == 0.21
    assert _score(REID_RUN) == 0.72
    assert _score(VALIDATED_RUN) == 0.7
    assert _score({"nmi": 0.3}) == 0.0
    # trainer.monitor=auto, from the names an evaluation reports
    retrieval = protocol_names("retrieval", [1, 2, 4], [])
    reid = protocol_names("reid", [], [1, 5])
    assert resolve_monitor("auto", retrieval) == "map@r"
    assert resolve_monitor("auto", reid) == "mAP"
    assert resolve_monitor("auto", retrieval + ["val/" + n for n in retrieval]) == "val/map@r"
    assert resolve_monitor("auto", reid + ["val/" + n for n in reid]) == "val/mAP"
    # softmine-report plots the main metric among those shown, else the first shown
    assert report_plot_metric(["recall@1", "map@r"]) == "map@r"
    assert report_plot_metric(["val/map@r", "nmi"]) == "val/map@r"
    assert report_plot_metric([]) is None


def test_the_protocols_report_names_of_the_vocabulary() -> None:
    assert protocol_names("retrieval", [1, 8], []) == [
        "recall@1",
        "recall@8",
        "map@r",
        "r_precision",
        "nmi",
    ]
    assert protocol_names("query_gallery", [1], []) == ["recall@1", "map@r", "r_precision"]
    assert protocol_names("reid", [], [1, 20]) == ["cmc@1", "cmc@20", "mAP"]
    for name in protocol_names("retrieval", [1], []) + protocol_names("reid", [], [5]):
        assert mn.is_metric(name), name


DISPLAY_ORDER = [  # written out by hand: prefix, then family, then K
    "recall@1",
    "recall@2",
    "recall@10",
    "cmc@1",
    "cmc@20",
    "map@r",
    "r_precision",
    "mAP",
    "nmi",
    "attention_auc",
    "iteration",
    "val/recall@1",
    "val/map@r",
    "selected/recall@4",
    "selected/map@r",
    "best_test/map@r",
    "concat/recall@1",
    "concat/map@r",
]


def test_the_display_order() -> None:
    shuffled = DISPLAY_ORDER[:]
    random.Random(0).shuffle(shuffled)
    assert mn.in_order(shuffled) == DISPLAY_ORDER


def test_prefixes_split_and_label() -> None:
    assert mn.PREFIXES == ("", "val/", "selected/", "best_test/", "concat/")
    assert mn.split_prefix("best_test/map@r") == ("best_test/", "map@r")
    assert mn.split_prefix("rerank/cmc@1") == ("", "rerank/cmc@1")  # not a snapshot prefix
    assert mn.without_val("val/map@r") == "map@r" and mn.without_val("map@r") == "map@r"
    assert mn.is_known("selected/cmc@5") and not mn.is_known("dropped_items/test")
    assert not mn.is_metric("val/map@r") and not mn.is_metric("iteration")
    assert mn.labels(["recall@1", "map@r", "r_precision", "nmi", "mAP"]) == {
        "recall@1": "R@1",
        "map@r": "MAP@R",
        "r_precision": "R-Precision",
        "nmi": "NMI",
        "mAP": "mAP",
    }
