"""Dependencies are declared as the code uses them (pyproject.toml, read with tomllib; imports read with ast).

- every third-party package that dhad/ imports is declared: a runtime dependency, or an optional extra for
  the imports that sit behind a clear "pip install ..." error (lm-eval, the Hub, vLLM, ...);
- every runtime dependency is imported by dhad/ itself (nothing declared "just in case": transformers, for
  one, is what the tests compare against, so it is the `interop` extra, not a runtime dependency);
- what scripts/setup.sh installs covers every package the tests import.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
OPTIONAL_ONLY = {"vllm"}   # its own venv (scripts/test-vllm.sh); tests/test_vllm_real.py says so when missing


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(spec: str) -> str:
    return norm(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0))


def third_party_imports(root: Path) -> set[str]:
    """Top-level names of the non-stdlib, non-dhad modules imported anywhere under `root`."""
    out = set()
    for p in root.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module.split(".")[0])
    local = {"dhad", "conftest"}
    if not (root / "__init__.py").exists():  # a folder of scripts may import its siblings by name; a package's
        local |= {p.stem for p in root.glob("*.py")}  # modules are `dhad.x` (dhad/gguf.py uses the `gguf` package)
    return {m for m in out if m not in sys.stdlib_module_names and m not in local and m != "__future__"}


@functools.cache
def _providers() -> dict[str, list[str]]:
    return md.packages_distributions()


# optional packages not installed in .venv whose distribution name differs from the module's
NOT_INSTALLED = {"llama_cpp": "llama-cpp-python"}  # own venv: scripts/test-llamacpp.sh


def distribution(module: str) -> str:
    """The distribution that provides an importable top-level module (its own name when not installed)."""
    dists = _providers().get(module)
    return norm(dists[0]) if dists else norm(NOT_INSTALLED.get(module, module))


def declared(*extras: str) -> set[str]:
    deps = {req_name(s) for s in PYPROJECT["project"]["dependencies"]}
    for e in extras or PYPROJECT["project"]["optional-dependencies"]:
        deps |= {req_name(s) for s in PYPROJECT["project"]["optional-dependencies"][e] if not s.startswith("dhad")}
    return deps


def closure(names: set[str]) -> set[str]:
    """`names` and everything they require, as installed here."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        todo += [req_name(r) for r in reqs if "extra ==" not in r]
    return seen


def test_library_imports_are_declared():
    used = {distribution(m) for m in third_party_imports(REPO / "dhad")}
    assert used and sorted(used - declared()) == []


def test_runtime_dependencies_are_imported():
    used = {distribution(m) for m in third_party_imports(REPO / "dhad")}
    assert sorted({req_name(s) for s in PYPROJECT["project"]["dependencies"]} - used) == []


def test_setup_installs_what_the_tests_import():
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    extras = re.search(r'install -q -e "\.\[([a-z,]+)\]"', setup).group(1).split(",")
    installed = closure(declared(*extras))
    needed = {distribution(m) for m in third_party_imports(REPO / "tests")} - OPTIONAL_ONLY
    assert "transformers" in needed and sorted(needed - installed) == []


def test_the_checks_see_a_missing_declaration(tmp_path):
    (tmp_path / "m.py").write_text("import yaml\ndef f():\n    import not_a_real_pkg\nfrom dhad import x\nimport json\n")
    assert third_party_imports(tmp_path) == {"yaml", "not_a_real_pkg"}
    assert distribution("yaml") == "pyyaml" and "not-a-real-pkg" not in declared()
    assert req_name("transformers>=4.45") == "transformers" and req_name("Jinja2") == "jinja2"
