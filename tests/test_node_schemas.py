"""What a user meets in the node list: one category tree, a tooltip on every input, honest
widget labels, and search aliases where the running ComfyUI's Schema supports them."""

from __future__ import annotations

import dataclasses
import types

import pytest
from helpers import PACK_NODES


def _schema(node_classes, name):
    return node_classes[name].define_schema()


@pytest.mark.parametrize("name", PACK_NODES)
def test_every_input_has_a_tooltip_and_the_node_sits_under_linfusion(node_classes, name):
    s = _schema(node_classes, name)
    assert s.category == "LinFusion" or s.category.startswith("LinFusion/")
    missing = [i.id for i in s.inputs if not (i.tooltip or "").strip()]
    assert missing == []


def test_widgets_that_differ_from_ksampler_say_so(node_classes):
    inputs = {i.id: i for i in _schema(node_classes, "LinFusionHighResSamplerAdvanced").inputs}
    assert inputs["steps"].display_name == "steps (full schedule)"
    assert inputs["upscale_strength"].display_name == "upscale_strength (0 = reference)"


def test_search_aliases_reach_a_schema_that_has_them(pack, node_classes, monkeypatch):
    """ComfyUI 0.3.75's Schema has no search_aliases (the pack must still register there);
    newer ones do, and then "hires", "upscale", "demofusion" and "ultra" find the nodes."""
    mod = pack.nodes.schema
    seen = {}

    @dataclasses.dataclass
    class NewerSchema:
        node_id: str
        display_name: str = None
        category: str = "sd"
        inputs: list = None
        outputs: list = None
        description: str = ""
        is_experimental: bool = False
        search_aliases: list = None

        def __post_init__(self):
            seen[self.node_id] = self.search_aliases or []

    monkeypatch.setattr(mod, "io", types.SimpleNamespace(Schema=NewerSchema))
    monkeypatch.setattr(mod, "SCHEMA_FIELDS", frozenset(f.name for f in dataclasses.fields(NewerSchema)))
    for name in PACK_NODES:
        node_classes[name].define_schema()
    words = " ".join(a for v in seen.values() for a in v).lower()
    for word in ("hires", "upscale", "demofusion", "ultra"):
        assert word in words
    assert all(seen[n] for n in PACK_NODES)
    # and the running ComfyUI gets only the fields it knows
    monkeypatch.undo()
    if "search_aliases" not in mod.SCHEMA_FIELDS:
        assert mod.schema(node_id="X", search_aliases=["a"]).node_id == "X"


def test_display_names_carry_the_search_words_early_and_multi_gpu_is_experimental(pack, node_classes):
    """The frontends of 0.3.52 and 0.3.75 search class and display names only, a word counting
    within about 30 characters (nodes/schema.py DISPLAY_NAMES; tests/test_browser.py asserts the
    ranks in the real UI). The Multi-GPU node carries the UI's BETA badge (Schema
    is_experimental, object_info 'experimental')."""
    names = {n: _schema(node_classes, n).display_name for n in PACK_NODES}
    assert names == pack.nodes.schema.DISPLAY_NAMES
    def early(node, *words):  # each word starts within the first 30 characters
        return all(0 <= names[node].lower().find(w) <= 30 for w in words)

    assert early("LinFusionHighResSampler", "hires fix", "high-res")
    assert early("LinFusionHighResSamplerAdvanced", "hires fix", "16k")
    assert early("LinFusionSuperResolution", "upscale", "super", "resolution")
    # Apply first for "linfusion": a prefix match shorter than every other pack name and class name
    apply = names["ApplyLinFusion"]
    assert apply.lower().startswith("linfusion")
    assert len(apply) < min(len(s) for n in PACK_NODES if n != "ApplyLinFusion" for s in (n, names[n]))
    assert [n for n in PACK_NODES if _schema(node_classes, n).is_experimental] == ["LinFusionMultiGPU"]
