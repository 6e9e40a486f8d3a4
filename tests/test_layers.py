"""The layering of src/cirlab, as docs/architecture.md states it in its table of layers.

A module may import modules of its own layer and of lower layers, never of a higher one, and no
modules may import each other in a cycle. Every ``import`` / ``from ... import`` statement counts:
module level, inside functions and under ``TYPE_CHECKING``. Imports by name at run time (the
registries' discovery, the command list of ``cirlab.cli``) are not statements and are not seen.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DOC = REPO / "docs" / "architecture.md"

# layer -> the parts of cirlab in it: sub-packages / modules of cirlab; "__init__" is cirlab/__init__.py
# (cirlab.load), "__main__" is cirlab/__main__.py. Keep in step with the table in docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("utils", "registry", "config"),
    ("data", "models"),
    ("features",),
    ("composers",),
    ("training",),
    ("evaluation", "retrieval"),
    ("methods", "importers"),
    ("serving",),
    ("cli", "__init__", "__main__"),
]


def modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module of ``package`` under ``src``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imports(name: str, path: Path, is_package: bool, known: dict, package: str) -> set[str]:
    """The modules of ``package`` that ``name`` imports anywhere in its file (``from X import y``:
    the module ``X.y`` where there is one, else ``X``; names outside ``known``: their nearest
    known parent)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] != package:
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                found.add(target)
    return found


def part_of(name: str) -> str:
    """The part of cirlab a module belongs to (the first name below ``cirlab``; the root: ``__init__``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def check(src: Path, package: str, layers: list[tuple[str, ...]]) -> list[str]:
    """Every breach of ``layers`` by the modules of ``package`` under ``src``, as messages."""
    layer_of = {part: i for i, parts in enumerate(layers) for part in parts}
    known = modules(src, package)
    graph = {name: imports(name, path, is_package, known, package) for name, (path, is_package) in known.items()}
    problems = [f"{name}: {part_of(name)!r} is in no layer (add it to the table of docs/architecture.md and "
                f"of tests/test_layers.py)" for name in known if part_of(name) not in layer_of]
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = (layer_of.get(part_of(n)) for n in (name, target))
            if low is not None and high is not None and low < high:
                problems.append(f"{name} (layer {low}, {part_of(name)}) imports {target} "
                                f"(layer {high}, {part_of(target)})")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return problems


def test_cirlab_keeps_its_layers():
    assert check(SRC, "cirlab", LAYERS) == []


def test_the_layer_table_is_the_documented_one():
    rows = re.findall(r"^\| *(\d+) *\| *([^|]*)\|", DOC.read_text(), flags=re.MULTILINE)
    documented = [tuple(re.findall(r"`([\w.]+?)(?:\.py)?`", parts)) for _, parts in rows]
    assert [int(n) for n, _ in rows] == list(range(len(rows)))
    assert documented == LAYERS


def test_the_check_finds_upward_imports_and_cycles(tmp_path):
    """The checker itself, on a made-up package: an import from a lower layer to a higher one inside a
    function, and a cycle within one layer."""
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "def f():\n    from pkg.high import b\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from . import c\n",
        "pkg/high/c.py": "import pkg.high.b\nimport pkg.low\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = check(tmp_path, "pkg", [("low",), ("high", "__init__")])
    assert problems == ["pkg.low.a (layer 0, low) imports pkg.high.b (layer 1, high)",
                        "import cycle: pkg.high.b <-> pkg.high.c"]
    assert check(tmp_path, "pkg", [("high", "__init__")])[0].startswith("pkg.low: 'low' is in no layer")


if __name__ == "__main__":  # python tests/test_layers.py: the same check, without pytest
    found = check(SRC, "cirlab", LAYERS)
    print("\n".join(found) or "layers: ok")
    raise SystemExit(1 if found else 0)
