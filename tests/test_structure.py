"""The package structure: imports point down only and no modules import each other, directly or around a loop.

Every import counts, top-level or inside a function (a function-level import still ties the two modules together).
Layers: pipelines -> workers -> models; pipelines, workers -> infra; infra imports none of ours; models imports
none of ray, deepspeed, prefect, torch.distributed.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "workers", "pipelines", "infra")
ALLOWED = {"models": {"models"}, "workers": {"workers", "models", "infra"}, "infra": {"infra"},
           "pipelines": {"pipelines", "workers", "models", "infra"}}
FORBIDDEN_IN_MODELS = ("ray", "deepspeed", "prefect", "torch.distributed")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports at run time} (``from pkg import name`` counts as pkg.name when that is a
    module)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in files and n != mod}
        graph[mod] = deps
    return graph


def external_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_project_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_imports_point_down_only():
    bad = [(m, d) for m, deps in import_graph().items() for d in deps
           if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, f"imports against the layering: {bad}"


def test_models_never_imports_the_distributed_stack():
    bad = [(str(p.relative_to(ROOT)), name) for p in (ROOT / "models").rglob("*.py") for name in external_imports(p)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_MODELS)]
    assert not bad, bad
