"""Layers only point down: the import rule of docs/architecture.md, read from the source of every module.

Every `import` counts, at any depth: a lazy import inside a function is as much a dependency as one at the
top of the file. A module may import modules of its own group and of any group in a lower layer; never a
group beside it in the same layer, never one above. Every dhad module must belong to a group, so a new
package has to be placed in the picture before its tests pass. Within the tree there are no import cycles
between modules. Only the CLI package parses arguments.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

DHAD = Path(__file__).resolve().parents[1] / "dhad"

# Bottom to top. {group: module prefixes}; the longest matching prefix names a module's group.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("dhad.utils", "dhad.config", "dhad.prompts", "dhad.tokenizer")},
    {"model": ("dhad.model", "dhad.kv_cache", "dhad.checkpoint", "dhad.adapt", "dhad.lora", "dhad.gguf", "dhad.quant"),
     "data": ("dhad.data",)},                                  # beside the model: data never imports it
    {"generate": ("dhad.generate", "dhad.engine", "dhad.engine_api", "dhad.vllm_engine", "dhad.multi_lora",
                  "dhad",)},                                   # `dhad` itself: the public API (it exposes generate)
    {"serve": ("dhad.serve", "dhad.chat"), "evaluate": ("dhad.evaluate",), "synth": ("dhad.synth",)},
    {"train": ("dhad.train",)},
    {"speedrun": ("dhad.speedrun",)},
    {"cli": ("dhad.cli", "dhad.__main__")},
]
ARGUMENT_PARSERS = ("argparse",)   # only the `cli` group may import these


def module_name(path: Path, root: Path = DHAD) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def is_module(name: str, root: Path = DHAD) -> bool:
    rel = Path(*name.split("."))
    return (root.parent / rel).with_suffix(".py").is_file() or (root.parent / rel / "__init__.py").is_file()


def imports_of(source: str, module: str, is_package: bool = False, root: Path = DHAD) -> set[str]:
    """The modules a source file imports, at any depth. `from P import name` is P.name when that is a module
    of the tree (`from dhad import prompts` is dhad.prompts), else P (`from dhad import load_model` is dhad)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if base.split(".")[0] == root.name and is_module(sub, root) else base)
    return out


def group_of(module: str) -> tuple[int, str] | None:
    """(layer index, group name) of a dhad module; None for a module outside the picture."""
    best = None
    for i, layer in enumerate(LAYERS):
        for group, prefixes in layer.items():
            for p in prefixes:
                if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                    best = (len(p), i, group)
    return None if best is None else best[1:]


def violations(module: str, imported: set[str]) -> list[str]:
    """The imports of `module` that break the rule, each with the reason."""
    me = group_of(module)
    bad = []
    for m in sorted(imported):
        if m.split(".")[0] in ARGUMENT_PARSERS and me[1] != "cli":
            bad.append(f"{m} (only dhad.cli parses arguments)")
        if m != DHAD.name and not m.startswith(DHAD.name + "."):
            continue
        them = group_of(m)
        if them is None or them[1] == me[1] or them[0] < me[0]:
            continue
        where = "above" if them[0] > me[0] else "beside"
        bad.append(f"{m} ({them[1]} is {where} {me[1]})")
    return bad


def tree(root: Path = DHAD) -> dict[str, set[str]]:
    """{module: the dhad modules it imports} for every .py file of the tree."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        name = module_name(p, root)
        out[name] = imports_of(p.read_text(encoding="utf-8"), name, p.name == "__init__.py", root)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the modules of `graph` (one per strongly connected component, Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph or w == v:
                continue
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # a package's __init__ importing its own submodules (a façade) is not a cycle with them
    return {m: {d for d in deps if not (m != DHAD.name and d.startswith(m + "."))} for m, deps in graph.items()}


# ---------------------------------------------------------------------------------------------


TREE = tree()


def test_every_module_is_in_the_picture():
    assert len(TREE) > 50 and [m for m in TREE if group_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(TREE))
def test_imports_point_down(module):
    assert violations(module, TREE[module]) == []


def test_no_import_cycles():
    assert cycles(_package_edges(TREE)) == []


def test_the_rule_sees_an_upward_import(tmp_path):
    """The check catches what it is for: in a copy of the real tree with upward imports injected (top level,
    inside a function, `from dhad import X`, relative), exactly the injected imports fail it."""
    import shutil

    root = tmp_path / "dhad"
    shutil.copytree(DHAD, root, ignore=shutil.ignore_patterns("__pycache__", "static", "recipes"))
    injected = {
        "data/dedup.py": "def f():\n    from dhad.model import Transformer\n",     # data -> the model (lazy)
        "evaluate/bpb.py": "from dhad.train import dpo\n",                        # evaluate -> train
        "model.py": "import dhad.generate\n",                                     # core -> generate
        "serve/filters.py": "from ..evaluate import tasks\n",                     # beside: serve -> evaluate
        "adapt.py": "import dhad\n",                                              # core -> the public API
        "train/optim.py": "from dhad.cli import CLIError\n",                       # a library raising CLIError
        "synth/translate.py": "import argparse\n",                                # a library parsing arguments
    }
    for target, line in injected.items():
        with open(root / target, "a", encoding="utf-8") as f:
            f.write(line)
    g = tree(root)
    found = {m: violations(m, deps) for m, deps in g.items() if violations(m, deps)}
    assert {m: len(v) for m, v in found.items()} == {module_name(root / t, root): 1 for t in injected}
    # and a cycle: engine_api importing the engine that imports it
    g["dhad.engine_api"] = g["dhad.engine_api"] | {"dhad.engine"}
    assert any({"dhad.engine", "dhad.engine_api"} <= set(c) for c in cycles(_package_edges(g)))


def test_imports_of_resolves_names():
    assert imports_of("from dhad import prompts, load_model\n", "dhad.x") == {"dhad.prompts", "dhad"}
    assert imports_of("from . import shards\n", "dhad.data.prepare") == {"dhad.data.shards"}
    assert imports_of("from .. import model\n", "dhad.train.loop") == {"dhad.model"}
    assert imports_of("from .core import Tokenizer\n", "dhad.tokenizer", is_package=True) == {"dhad.tokenizer.core"}
    assert group_of("dhad.data.shards") == (1, "data") and group_of("dhad") == (2, "generate")
    assert group_of("dhad.cli.data") == (6, "cli") and group_of("dhadx") is None
