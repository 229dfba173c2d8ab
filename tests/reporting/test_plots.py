"""Every plot function writes a non-empty PNG drawn from the data it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from softmine.reporting import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _pixels(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _count(img: np.ndarray, color: str, tol: int = 12) -> int:
    rgb = np.array([round(255 * c) for c in to_rgb(color)])
    return int((np.abs(img - rgb).max(axis=-1) <= tol).sum())


@pytest.mark.slow
def test_training_curves_depend_on_the_log(tmp_path: Path) -> None:
    epochs = np.arange(1, 11)
    log = pd.DataFrame(
        {
            "epoch": epochs,
            "loss": 1 / epochs,
            "l_pos": 0.5 / epochs,
            "osm_weight_pos": epochs / 20,
            "lr": 1e-3 * 0.9**epochs,
            "epoch_time_s": 0.1,
            "map@r": [np.nan] * 9 + [0.8],
        }
    )
    a = _pixels(plots.plot_training_curves(log, tmp_path / "a.png"))
    b = _pixels(plots.plot_training_curves(log.assign(loss=epochs / 3), tmp_path / "b.png"))
    assert a.shape == b.shape and (a != b).any()
    assert a.shape[1] > 3 * a.shape[0]  # four panels side by side (lr changes: it has one)
    flat = plots.plot_training_curves(log.assign(lr=1e-3), tmp_path / "c.png")
    assert _pixels(flat).shape[1] < a.shape[1]  # a constant rate gets no panel
    with pytest.raises(ValueError, match="epoch"):
        plots.plot_training_curves(pd.DataFrame({"loss": [1.0]}), tmp_path / "d.png")


def test_recall_curve_depends_on_values(tmp_path: Path) -> None:
    a = _pixels(plots.plot_recall_at_k({"x": {1: 0.5, 2: 0.7, 4: 0.9}}, tmp_path / "a.png"))
    b = _pixels(plots.plot_recall_at_k({"x": {1: 0.1, 2: 0.2, 4: 0.95}}, tmp_path / "b.png"))
    assert (a != b).any()


def test_retrieval_grid_marks_correct_green_and_wrong_red(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((12, 1, 8, 8)).astype(np.float32)
    labels = np.array([0] * 6 + [1] * 6)
    queries = [0, 6]
    right = np.array([[1, 2, 3], [7, 8, 9]])  # same class as their query
    wrong = np.array([[6, 7, 8], [0, 1, 2]])
    good = _pixels(plots.plot_retrieval_grid(images, labels, queries, right, tmp_path / "g.png"))
    bad = _pixels(plots.plot_retrieval_grid(images, labels, queries, wrong, tmp_path / "b.png"))
    # frames: 6 result frames of one colour each (legend patches are the same in both)
    assert _count(good, plots.CORRECT) > 3 * _count(bad, plots.CORRECT)
    assert _count(bad, plots.WRONG) > 3 * _count(good, plots.WRONG)
    rgb = plots.plot_retrieval_grid(
        rng.random((12, 3, 8, 8)), labels, queries, right, tmp_path / "rgb.png"
    )
    assert (_pixels(rgb) != good).any()


def test_tsne_keeps_separated_clusters_apart_and_the_map_shows_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (60, 16)), rng.normal(5, 0.1, (60, 16))])
    y = np.repeat([0, 1], 60)
    points, index = plots.tsne_map(x, max_points=80, seed=0)
    assert points.shape == (80, 2) and len(np.unique(index)) == 80
    lab = y[index]
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.array_equal(lab[d.argmin(1)], lab)  # every point's 2-D neighbour is of its class
    a = _pixels(plots.plot_embedding_map(points, lab, tmp_path / "a.png"))
    b = _pixels(plots.plot_embedding_map(points[::-1] * [1, -1], lab, tmp_path / "b.png"))
    assert (a != b).any()
    tab10 = ["#1f77b4", "#ff7f0e"]  # the colours of classes 0 and 1
    assert _count(a, tab10[0], 30) > 50 and _count(a, tab10[1], 30) > 50


def test_pair_weight_plot_depends_on_pairs(tmp_path: Path) -> None:
    d = np.linspace(0, 2, 200)
    pos = np.arange(200) % 2 == 0
    a = _pixels(plots.plot_pair_weights(d, np.exp(-(d**2)), pos, tmp_path / "a.png"))
    b = _pixels(plots.plot_pair_weights(d, np.exp(-(d**2)), ~pos, tmp_path / "b.png"))
    c = _pixels(plots.plot_pair_weights(d, np.zeros(200), pos, tmp_path / "c.png"))
    assert (a != b).any() and (a != c).any()


def test_attention_histogram_splits_clean_and_flipped(tmp_path: Path) -> None:
    att = np.linspace(0.0, 1.0, 300)
    one = _pixels(plots.plot_attention(att, tmp_path / "a.png"))
    split = _pixels(plots.plot_attention(att, tmp_path / "b.png", att < 0.3, auc=1.0))
    assert _count(one, plots.QUERY) > 1000 and _count(split, plots.QUERY) < 100
    assert (one != split).any()


def test_metric_lines_and_bars_depend_on_values(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "noise": [0.0, 0.2, 0.0, 0.2],
            "loss": ["a", "a", "b", "b"],
            "m": [0.9, 0.8, 0.9, 0.6],
            "s": [0.01, 0.02, 0.0, 0.05],
        }
    )
    a = _pixels(
        plots.plot_metric_lines(table, "noise", "m", tmp_path / "a.png", line="loss", err="s")
    )
    b = _pixels(
        plots.plot_metric_lines(
            table.assign(m=[0.5, 0.9, 0.7, 0.7]),
            "noise",
            "m",
            tmp_path / "b.png",
            line="loss",
            err="s",
        )
    )
    assert (a != b).any()
    with pytest.raises(ValueError, match="nope"):
        plots.plot_metric_lines(table, "noise", "nope", tmp_path / "c.png")
    c = _pixels(plots.plot_metric_bars(["a", "b"], [0.9, 0.5], [0.01, 0.1], tmp_path / "c.png"))
    d = _pixels(plots.plot_metric_bars(["a", "b"], [0.5, 0.9], [0.01, 0.1], tmp_path / "d.png"))
    assert (c != d).any()


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture
def drawn_text(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """PNG file name -> every text drawn on its figure, recorded as each figure is saved."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    texts: dict[str, list[str]] = {}
    save = Figure.savefig

    def record(fig: Figure, path: object, *args: object, **kwargs: object) -> None:
        texts[Path(str(path)).name] = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
        save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return texts


def test_grid_and_map_write_class_names_not_labels(
    tmp_path: Path, drawn_text: dict[str, list[str]]
) -> None:
    images = np.zeros((4, 1, 8, 8), np.float32)
    labels = np.array([3, 3, 7, 7])
    names = [f"class {c}" for c in range(7)] + ["a very long class name indeed"]
    grid = tmp_path / "g.png"
    plots.plot_retrieval_grid(images, labels, [0], np.array([[1, 2]]), grid, class_names=names)
    assert drawn_text["g.png"][:3] == ["query class 3", "class 3", "a very long class…"]
    plots.plot_embedding_map(np.zeros((4, 2)), labels, tmp_path / "m.png", class_names=names)
    assert {"class 3", "a very long class…"} <= set(drawn_text["m.png"])
    plots.plot_embedding_map(np.zeros((4, 2)), labels, tmp_path / "n.png")  # no names: labels
    assert {"3", "7"} <= set(drawn_text["n.png"])


def test_a_runs_grids_and_tsne_name_the_folders(
    tmp_path: Path, drawn_text: dict[str, list[str]]
) -> None:
    """Folders zero..nine are labels 0..9 in alphabetical order ("three" is 7): the plots of
    the run must say "three", never 7."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from softmine.data import ImageFolder
    from softmine.reporting.artifacts import _plot_test_set
    from softmine.testing.fakes import make_image_folder

    root = make_image_folder(tmp_path / "digits", 10, 4, size=8, names=DIGIT_NAMES)
    test = ImageFolder(root, "test")
    assert test.class_names[7] == "three"  # the remapping the plots must undo
    emb = np.eye(10, dtype=np.float32)[test.labels] + 0.01 * np.arange(len(test))[:, None]
    run = SimpleNamespace(  # the RunOutputs fields the plots read
        test_embeddings=(emb, test.labels),
        cfg=OmegaConf.create({"seed": 0}),
    )
    _plot_test_set(run, tmp_path / "plots", test)
    for grid in ("retrieval_grid.png", "retrieval_grid_worst.png"):
        captions = [t for t in drawn_text[grid] if t not in ("same class", "other class")]
        captions = [t for t in captions if not t.startswith("lowest AP@R")]
        queries = [t.removeprefix("query ") for t in captions if t.startswith("query ")]
        assert len(queries) == 6 and len(captions) == 36  # 6 queries x (itself + 5 results)
        assert set(queries) <= set(DIGIT_NAMES)
        assert set(captions) - {f"query {n}" for n in DIGIT_NAMES} <= set(DIGIT_NAMES)
    assert set(DIGIT_NAMES) <= set(drawn_text["tsne.png"])  # the legend


def test_a_saved_map_sample_draws_the_map_the_run_would_have_drawn(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 0.1, (70, 8)), rng.normal(3, 0.1, (70, 8))])
    y = np.repeat([0, 1], 70)
    names = ["cat", "dog"]
    sample = plots.save_map_sample(
        tmp_path / "m.npz", x, y, max_points=50, seed=3, class_names=names
    )
    direct = _pixels(plots.plot_tsne(x, y, tmp_path / "direct.png", 50, 3, names))
    later = _pixels(plots.plot_saved_tsne(sample, tmp_path / "later.png"))
    assert np.array_equal(direct, later)
    with np.load(sample) as z:
        assert z["embeddings"].shape == (50, 8) and z["class_names"].tolist() == names
    panels = plots.plot_saved_tsne_panels([("a", sample), ("b", sample)], tmp_path / "p.png")
    assert _pixels(panels).shape[1] > direct.shape[1]  # two panels side by side


def test_bars_start_at_zero_and_show_the_spread_where_there_is_one() -> None:
    from matplotlib.container import BarContainer, ErrorbarContainer

    fig = plots.metric_bars_figure(["a", "b", "c"], [0.91, 0.93, 0.92], [0.01, float("nan"), 0.02])
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    assert low == 0.0 and 0.95 <= high < 1.1  # from zero: bar lengths compare
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars] == pytest.approx([0.91, 0.93, 0.92])
    (err,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = err.lines[2][0].get_segments()  # the vertical error bars: a and c only
    assert [tuple(np.round(s[:, 1], 6)) for s in segments] == [(0.9, 0.92), (0.9, 0.94)]
    assert {t.get_text() for t in ax.texts} == {"0.91", "0.93", "0.92"}  # the means, written
    one_seed = plots.metric_bars_figure(["a", "b"], [0.5, 0.6], None).axes[0]
    assert not [c for c in one_seed.containers if isinstance(c, ErrorbarContainer)]
    negative = plots.metric_bars_figure(["a", "b"], [-0.2, 0.4], [0.05, 0.05]).axes[0]
    low, high = negative.get_ylim()
    assert low < -0.25 and high > 0.45  # zero inside, every bar whole
