"""Layers for the data side, read from the imports: dhad.data (readers, cleaning, filters, dedup, packing,
shards) never imports anything that loads or drives a model; dhad.synth (translation, synthesis: it drives
models through the engine) sits below train/speedrun and beside serve/evaluate; library modules raise
library errors — only the CLI modules import CLIError."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

DHAD = Path(__file__).resolve().parents[1] / "dhad"
# what dhad.data may not import: the model and everything above it (`import dhad` is the public API,
# whose __init__ loads the model)
ABOVE_DATA = ("dhad.model", "dhad.checkpoint", "dhad.generate", "dhad.engine", "dhad.engine_api", "dhad.vllm_engine", "dhad.chat",
              "dhad.serve", "dhad.evaluate", "dhad.synth", "dhad.train", "dhad.speedrun", "dhad.adapt")
ABOVE_SYNTH = ("dhad.serve", "dhad.evaluate", "dhad.train", "dhad.speedrun")


def imported(source: str) -> set[str]:
    """Every absolute module a source file imports (at any depth: lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            if node.module == "dhad":                                  # `from dhad import model`
                out |= {f"dhad.{a.name}" for a in node.names}
    return out


def violations(source: str, above: tuple[str, ...], whole_package_ok: bool) -> set[str]:
    bad = {m for m in imported(source) if any(m == a or m.startswith(a + ".") for a in above)}
    if not whole_package_ok and "dhad" in imported(source):
        bad.add("dhad")
    return bad


def test_the_check_sees_upward_imports():
    assert violations("def f():\n    from dhad.model import Transformer\n", ABOVE_DATA, False) == {"dhad.model"}
    assert violations("from dhad import engine\n", ABOVE_DATA, False) == {"dhad", "dhad.engine"}
    assert violations("from dhad import engine\n", ABOVE_SYNTH, True) == set()
    assert violations("import dhad\n", ABOVE_DATA, False) == {"dhad"}
    assert violations("from dhad.data.readers import Doc\nfrom dhad.prompts import render\n", ABOVE_DATA, False) == set()


@pytest.mark.parametrize("path", sorted((DHAD / "data").glob("*.py")), ids=lambda p: p.name)
def test_data_never_imports_a_model(path):
    assert violations(path.read_text(encoding="utf-8"), ABOVE_DATA, False) == set()


@pytest.mark.parametrize("path", sorted((DHAD / "synth").glob("*.py")), ids=lambda p: p.name)
def test_synth_stays_below_train(path):
    assert violations(path.read_text(encoding="utf-8"), ABOVE_SYNTH, True) == set()


def test_library_modules_raise_library_errors():
    lib = [p for d in ("data", "synth") for p in sorted((DHAD / d).glob("*.py")) if p.name != "cli.py"]
    assert lib and [p.name for p in lib if "dhad.cli" in imported(p.read_text(encoding="utf-8"))] == []
