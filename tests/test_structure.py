"""The pack's layering: loading the glue leaves ComfyUI's own top-level `nodes` module where
ComfyUI put it."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
