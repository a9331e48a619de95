"""The repository's layout: import arrows run one way (no cycle among the project's modules),
nothing imports train.py (it is the program, not a library), and the data layer never sees the
command line.

Run: python -m pytest -q tests/test_layout.py
"""
import ast

from conftest import ROOT


def project_modules() -> dict[str, str]:
    """Module name -> source, for the top-level files and the packages (data, bench); tests
    excluded."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("bench/*.py")]
    return {".".join(f.relative_to(ROOT).with_suffix("").parts): f.read_text() for f in files}


def imports(source: str, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it (a function's own import counts as an arrow
    too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from data import books`
    return found & known


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a path [a, b, ..., a], or [] when there is none (depth-first
    search)."""
    state, path = {}, []

    def visit(node) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules) - {"data.__init__", "bench.__init__"} | {"data", "bench"}
    return {name.removesuffix(".__init__"):
            imports(src, known) - {name.removesuffix(".__init__"), "data", "bench"}
            for name, src in modules.items()}


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_the_projects_modules():
    arrows = graph()
    # the walk sees them all
    assert {"train", "model", "data.packing", "bench.sections"} <= set(arrows)
    assert "data.babilong" in arrows["data.batches"]  # and their arrows
    assert a_cycle(arrows) == []


def test_nothing_imports_train():
    assert [name for name, targets in graph().items() if "train" in targets] == []


def test_the_data_layer_takes_plain_values_not_the_command_line():
    """data/ functions take plain parameters or a batches.DataConfig, never train.py's argparse
    namespace."""
    takers = [f"{name}.{node.name}" for name, src in project_modules().items()
              if name.startswith("data.")
              for node in ast.walk(ast.parse(src)) if isinstance(node, ast.FunctionDef)
              and "args" in [a.arg for a in node.args.args + node.args.kwonlyargs]]
    assert takers == []
