"""The package's shape: data flows one way, so no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "softmine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """softmine module -> the softmine modules it imports (at the top or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module].update(n for n in names if n in files and n != module)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _import_graph()
    # artifacts imports softmine.reporting.plots inside its functions only
    assert "softmine.reporting.plots" in graph["softmine.reporting.artifacts"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_back_up_the_chain() -> None:
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The layers, lowest first: a module may import its own layer and the ones below it, never one
# above (docs/contributing.md draws the same picture). A module is placed by the longest prefix
# of its name listed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0. infrastructure every layer uses: errors, configs, the run folder's basics
    (
        "softmine",
        "softmine._moved",
        "softmine.errors",
        "softmine.config",
        "softmine.hardware",
        "softmine.runs.atomic",
        "softmine.runs.layout",
        "softmine.runs.metrics_file",
        "softmine.runs.signals",
    ),
    # 1. the pieces of the pipeline: data, models, losses, metrics (and fakes of the data)
    (
        "softmine.data",
        "softmine.models",
        "softmine.losses",
        "softmine.evaluation",
        "softmine.testing",
    ),
    # 2. the training loop that puts them together
    ("softmine.engine",),
    # 3. what runs around and after the loop: the run folder's life, reports, a trained model at work
    ("softmine.runs", "softmine.reporting", "softmine.inference"),
    # 4. the console commands (and the umbrella that lists them)
    ("softmine.commands", "softmine.__main__"),
)


def _layer(module: str) -> int:
    best, layer = "", -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, layer = p, i
    return layer


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
        for m, targets in graph.items()
        for n in targets
        if _layer(n) > _layer(m)
    )


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _import_graph() if _layer(m) < 0]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_layers_by_hand() -> None:
    assert _layer("softmine.runs.folder") == 3 and _layer("softmine.runs.atomic") == 0
    assert _layer("softmine.data.datasets.cub") == 1 and _layer("softmine.commands.train") == 4
    assert _upward_imports({"softmine.losses.x": {"softmine.engine.y"}}) == [
        "softmine.losses.x (layer 1) imports softmine.engine.y (layer 2)"
    ]
    assert _upward_imports({"softmine.engine.y": {"softmine.losses.x"}}) == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = _upward_imports(_import_graph())
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_module_name_is_used_twice() -> None:
    """A file name says one job: two modules called ``embed.py`` in two packages would not."""
    by_name: dict[str, list[str]] = {}
    for p in PACKAGE.rglob("*.py"):
        if p.name != "__init__.py":
            by_name.setdefault(p.name, []).append(str(p.relative_to(PACKAGE)))
    repeated = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not repeated, f"module names used in more than one package: {repeated}"
