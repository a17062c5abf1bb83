"""The package's import graph, read from the source (every import, also those inside
functions): no module of megamoe/ is in an import cycle, and the layers import downward only."""

import ast
import os
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "megamoe"

# lower layers never import higher ones (a module may import its own layer and those below)
LAYERS = [
    {
        "findings",
        "command",
        "config",
        "outputs",
        "lifetime",
        "checkpoint.layout",
        "parallel.layout",
    },
    {"parallel", "model", "data", "formats", "moefy", "checkpoint"},
    {"convert"},
    {"train"},
    {"ops"},
    {"cli", "demo", "__main__", "train.__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The megamoe modules `name` imports (relative and absolute, at any depth)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()

    def add(target: str) -> None:  # the longest known module that `target` names
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("megamoe."):
                    add(a.name[len("megamoe.") :])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("megamoe"):
                mod = node.module[len("megamoe.") :] if node.module != "megamoe" else ""
            else:
                continue
            for a in node.names:  # `from X import a`: the module X.a if there is one, else X
                sub = f"{mod}.{a.name}" if mod else a.name
                add(sub if sub in known else mod)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) - {""}
    return {m: imports(m, p, known) for m, p in mods.items() if m}


def layer_of(name: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"megamoe.{name} is in no layer of this test: add it"
    return rank


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_downward_only():
    bad = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, deps in graph().items()
        for b in deps
        if layer_of(b) > layer_of(a)
    ]
    assert not bad, "\n".join(bad)


def test_the_graph_sees_lazy_and_relative_imports():
    g = graph()
    assert "checkpoint.layout" in g["train.plan"]  # relative, at the top
    assert "ops.checklist" in g["ops.launcher"]  # inside a function
    assert "ops.launcher" not in g["ops.checklist"]
    assert os.sep not in "".join(g)


def test_the_readme_layout_map_matches_the_tree():
    """Every module has its line in the README's code-layout map, and every path there exists."""
    import re

    root = PKG.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Code layout") :]
    listed = set(re.findall(r"^    (megamoe/\S+\.py)", section, re.M))
    modules = {
        str(p.relative_to(root))
        for p in PKG.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert not modules - listed, (
        f"modules missing from the README's map: {sorted(modules - listed)}"
    )
    assert all((root / p).is_file() for p in listed), sorted(
        p for p in listed if not (root / p).is_file()
    )
