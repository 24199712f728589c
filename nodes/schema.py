"""The pack's node schemas across ComfyUI versions: one category tree, and fields that newer
releases add to `io.Schema` (search aliases) passed only where the running ComfyUI has them."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

CATEGORY = "LinFusion"  # Apply LinFusion, Multi-GPU; the samplers under LinFusion/high-res
HIGHRES_CATEGORY = f"{CATEGORY}/high-res"
SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(io.Schema))


def schema(**fields) -> io.Schema:
    """io.Schema(**fields) without the fields this ComfyUI's Schema does not know (e.g.
    `search_aliases` before the release that added it): the node still registers."""
    return io.Schema(**{k: v for k, v in fields.items() if k in SCHEMA_FIELDS})
