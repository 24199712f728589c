"""The pack's node schemas across ComfyUI versions: one category tree, the display names, and
fields that newer releases add to `io.Schema` (search aliases) passed only where the running
ComfyUI has them."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

CATEGORY = "LinFusion"  # Apply LinFusion, Multi-GPU; the samplers under LinFusion/high-res
HIGHRES_CATEGORY = f"{CATEGORY}/high-res"
SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(io.Schema))

# The names the UI shows, chosen for its node search (issue 23). The frontends of the ComfyUIs
# this pack supports (1.25.10 with 0.3.52, 1.32.9 with 0.3.75: NodeSearchService) search only
# a node's class name and display name (not category, description or search_aliases), with
# Fuse.js at threshold 0.3 and location 0: a word counts only within about the first 30
# characters. They rank by match kind (exact, prefix, whole word, substring, all words), then
# by the node's usage in the registry (sorted-custom-node-map.json; a new pack's nodes have 0),
# then by the match's position and the name's length. So the words people type ("hires fix",
# "16K", "high res", "super resolution") sit early in the names, and Apply LinFusion's name
# starts with "LinFusion" and is shorter than "LinFusionMultiGPU" (every class name of the pack
# starts with LinFusion, a prefix match) to come first for "linfusion". "upscale" cannot rank
# in the top two there: ComfyUI's own Upscale Image / Upscale Latent / Load Upscale Model are
# prefix matches with usage counts (only a name equal to "Upscale" would beat them); newer
# frontends also search `search_aliases`, which carry it. tests/test_browser.py asserts the
# ranks in the real UI.
DISPLAY_NAMES = {
    "ApplyLinFusion": "LinFusion Apply",
    "LinFusionHighResSampler": "LinFusion Hires Fix (High-Res Sampler)",
    "LinFusionHighResSamplerAdvanced": "LinFusion Hires Fix 16K (advanced)",
    "LinFusionSuperResolution": "LinFusion Upscale (Super-Resolution)",
    "LinFusionMultiGPU": "LinFusion Multi-GPU",
}


def schema(**fields) -> io.Schema:
    """io.Schema(**fields) without the fields this ComfyUI's Schema does not know (e.g.
    `search_aliases` before the release that added it): the node still registers."""
    return io.Schema(**{k: v for k, v in fields.items() if k in SCHEMA_FIELDS})
