"""The pack's structure, checked on the source: linfusion/ never imports ComfyUI or the glue,
loading the glue leaves ComfyUI's own top-level `nodes` module where ComfyUI put it, no file
or function of linfusion/ and nodes/ grows past the size limits, and no module of tests/
imports a test module."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level modules of ComfyUI (and its API packages) that pure code must not reach.
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "nodes", "folder_paths",
                 "execution", "server", "latent_preview", "node_helpers", "main"}


def imports_of(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import statement in `path`, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


@pytest.mark.pure
def test_linfusion_never_imports_comfyui_or_the_glue():
    """Every linfusion/**/*.py: no import of a ComfyUI module (also inside functions), and no
    relative import that climbs out of the package (`from ..nodes`)."""
    files = sorted((REPO / "linfusion").rglob("*.py"))
    assert len(files) >= 12  # the scan sees the package (subpackages included)
    bad = []
    for path in files:
        depth = len(path.relative_to(REPO / "linfusion").parts)  # 1: linfusion/x.py, 2: linfusion/sub/x.py
        for line, module, level in imports_of(path):
            top = module.split(".")[0]
            if (level == 0 and top in COMFY_MODULES) or level > depth:
                bad.append(f"{path.relative_to(REPO)}:{line}: {'.' * level}{module}")
    assert not bad, "linfusion/ must stay pure PyTorch:\n" + "\n".join(bad)


@pytest.mark.pure
def test_scan_sees_a_comfyui_import(tmp_path):
    """The scan itself: an import inside a function and a climbing relative import are found."""
    f = tmp_path / "x.py"
    f.write_text("import torch\n\ndef f():\n    import comfy.ops\n    from ..nodes import apply\n")
    assert imports_of(f) == [(1, "torch", 0), (4, "comfy.ops", 0), (5, "nodes", 2)]


def test_multigpu_keeps_comfyui_nodes_first_on_the_path(pack, monkeypatch):
    """The Multi-GPU node puts the pack root on sys.path so that spawned workers can import
    `linfusion.parallel`; an import of `nodes` must still find ComfyUI's nodes.py, not the
    pack's `nodes` package (a search of sys.path as a fresh process would make it)."""
    comfy_nodes = Path(sys.modules["nodes"].__file__).resolve()
    assert comfy_nodes.name == "nodes.py"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != REPO])
    assert pack.nodes.multigpu._serve_target().__module__.startswith("linfusion.parallel")
    assert str(REPO) in sys.path
    found = importlib.machinery.PathFinder.find_spec("nodes", sys.path)
    assert Path(found.origin).resolve() == comfy_nodes
    lf = importlib.machinery.PathFinder.find_spec("linfusion", sys.path)
    assert Path(lf.origin).resolve() == REPO / "linfusion" / "__init__.py"


MAX_FILE_LINES, MAX_FUNCTION_LINES = 550, 60  # the structure's limits (scripts/code_stats.py prints the sizes)


def _code_stats():
    spec = importlib.util.spec_from_file_location("code_stats", REPO / "scripts" / "code_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.pure
def test_no_file_or_function_past_the_size_limits():
    """Every file of linfusion/ and nodes/ within MAX_FILE_LINES lines and every function
    (methods and nested functions included) within MAX_FUNCTION_LINES: one job a file, named
    steps in a function. Past a limit, split by job (docs/architecture.md)."""
    stats = _code_stats()
    files = sorted(p for d in ("linfusion", "nodes") for p in (REPO / d).rglob("*.py"))
    assert len(files) >= 30
    long_files = [f"{p.relative_to(REPO)}: {n} lines" for p in files
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_fns = [f"{p.relative_to(REPO)}:{name}: {n} lines" for p in files
                for n, _, name in stats.functions(p) if n > MAX_FUNCTION_LINES]
    assert not long_files and not long_fns, "\n".join(long_files + long_fns)


@pytest.mark.pure
def test_function_scan_measures_methods_and_nested_functions(tmp_path):
    """The scan itself: a method and a function nested in it are measured, with their lines and branches."""
    f = tmp_path / "x.py"
    body = "".join(f"        y = {i}\n" for i in range(58))
    f.write_text(f"class A:\n    def m(self, x):\n        if x:\n            pass\n{body}"
                 "        def inner():\n            return [i for i in x if i]\n")
    assert sorted(_code_stats().functions(f)) == [(2, 3, "A.m.inner"), (63, 2, "A.m")]


def imports_of_test_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a test module (a `test_*` part in the dotted name) in
    `path`, nested ones included: `import test_x`, `from test_x import y`, `from tests import test_x`."""
    def is_test(name: str) -> bool:
        return any(part.startswith("test_") for part in name.split("."))

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            sep = "" if base.endswith(".") else "."
            names = [base] if is_test(base) else [f"{base}{sep}{a.name}" for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if is_test(n)]
    return sorted(found)


@pytest.mark.pure
def test_no_module_of_tests_imports_a_test_module():
    """Test modules share builders through helper modules (tests/helpers.py, the fixtures of
    conftest.py and server_fixtures.py, standins.py, the *_cases.py tables), never by importing
    one another: a test module's names stay its own, and each module runs alone."""
    files = sorted((REPO / "tests").glob("*.py"))
    assert len([p for p in files if p.name.startswith("test_")]) >= 30
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for p in files for line, name in imports_of_test_modules(p)]
    assert not bad, "move what is shared into a helper module:\n" + "\n".join(bad)


@pytest.mark.pure
def test_scan_sees_a_test_module_import(tmp_path):
    """The scan itself: plain, from-, nested and package imports of a test module are found, others not."""
    f = tmp_path / "x.py"
    f.write_text("import helpers\nimport test_a as a\nfrom test_b import x\n\ndef f():\n"
                 "    from tests.test_c import y\n    from tests import helpers, test_d\n    from . import test_e\n"
                 "from standins import WorkflowServer\n")
    assert imports_of_test_modules(f) == [(2, "test_a"), (3, "test_b"), (6, "tests.test_c"), (7, "tests.test_d"),
                                          (8, ".test_e")]


def helper_uses(path: Path, modules: set[str]) -> list[tuple[int, str, str]]:
    """(line, module, name) of every name `path` takes from one of `modules`: `from m import name`,
    and `alias.name` after `import m [as alias]` (imports inside functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases, uses = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            uses += [(node.lineno, node.module, a.name) for a in node.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.append((node.lineno, aliases[node.value.id], node.attr))
    return uses


def test_scripts_and_benches_find_the_test_helpers_they_use():
    """scripts/ and bench/ build their models with the tests' helpers, and some of them run only
    where this suite does not (scripts/gpu_check.py's children need CUDA): every name they take
    from a module of tests/ must exist there, so a helper moved between test modules cannot
    silently break them."""
    import importlib

    modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    files = sorted([*(REPO / "scripts").glob("*.py"), *(REPO / "bench").glob("*.py")])
    uses = [(path, *use) for path in files for use in helper_uses(path, modules)]
    assert len(uses) >= 30 and any(p.name == "gpu_check.py" for p, *_ in uses)
    missing = [f"{path.relative_to(REPO)}:{line}: {module}.{name}" for path, line, module, name in uses
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, "names the tests' modules no longer have:\n" + "\n".join(missing)
