"""Model families LinFusion has weights for, their self-attention layouts, and name mapping.

One source of truth: each family's ordered list of self-attention layers is generated from
its UNet block structure below; the official configs, the test weights, the inference of a
config from a bare state dict and the error messages all derive from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleSpec:
    """One LinFusion layer: its diffusers module name, width, heads and projection mid width."""

    name: str
    dim: int
    heads: int | None  # None when unknown (a bare state dict): taken from the model's own layer
    mid_dim: int


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    repo_id: str
    # (diffusers block prefix, dim, attentions in the block, transformer blocks per attention)
    blocks: tuple[tuple[str, int, int, int], ...]
    heads: Callable[[int], int]
    mid_dim: Callable[[int], int]
    examples: str

    @property
    def folder_name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    def modules(self) -> list[ModuleSpec]:
        """The official `modules_list` order: down blocks, up blocks, then the mid block."""
        out = []
        for prefix, dim, n_attn, depth in self.blocks:
            for a in range(n_attn):
                for t in range(depth):
                    name = f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn1"
                    out.append(ModuleSpec(name, dim, self.heads(dim), self.mid_dim(dim)))
        return out


_SD_BLOCKS = (
    ("down_blocks.0", 320, 2, 1), ("down_blocks.1", 640, 2, 1), ("down_blocks.2", 1280, 2, 1),
    ("up_blocks.1", 1280, 3, 1), ("up_blocks.2", 640, 3, 1), ("up_blocks.3", 320, 3, 1),
    ("mid_block", 1280, 1, 1),
)

FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("sd1", "SD1.x", "Yuanshi/LinFusion-1-5", _SD_BLOCKS, lambda d: 8, lambda d: d,
               "SD 1.4/1.5 and their fine-tunes"),
        Family("sd2", "SD2.x", "Yuanshi/LinFusion-2-1", _SD_BLOCKS, lambda d: d // 64, lambda d: d,
               "SD 2.0/2.1 (512 and 768-v) and their fine-tunes"),
        Family("sdxl", "SDXL", "Yuanshi/LinFusion-XL",
               (("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10),
                ("up_blocks.0", 1280, 3, 10), ("up_blocks.1", 640, 3, 2),
                ("mid_block", 1280, 1, 10)),
               lambda d: d // 64, lambda d: d // 16,
               "SDXL base 1.0 and its fine-tunes (not the refiner)"),
    )
}


def supported_families_text() -> str:
    return "; ".join(f"{f.label} ({f.examples}): {f.repo_id}" for f in FAMILIES.values())


_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(transformer_blocks\.\d+\.attn1)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(transformer_blocks\.\d+\.attn1)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(transformer_blocks\.\d+\.attn1)$")


def diffusers_to_ldm(name: str) -> str:
    """Map a diffusers self-attention module name to the original (LDM / ComfyUI) UNet path.

    down_blocks.i.attentions.a.X -> input_blocks.(3i+a+1).1.X
    up_blocks.i.attentions.a.X   -> output_blocks.(3i+a).1.X
    mid_block.attentions.0.X     -> middle_block.1.X
    """
    if m := _DOWN.match(name):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := _UP.match(name):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := _MID.match(name):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"not a UNet self-attention module name: {name!r}")


def match_family(modules: list[ModuleSpec]) -> Family | None:
    """The family whose layout these modules have: the same layer names in the same order and
    the family's rules for heads and projection width. Absolute widths are not compared (the
    layer-by-layer check against a model does that), so scaled-down test layouts match too.
    Heads are compared only when known; with unknown heads SD1.x and SD2.x look alike and
    the first (SD1.x) is returned."""
    for fam in FAMILIES.values():
        ref = fam.modules()
        if len(ref) == len(modules) and all(
            a.name == b.name and b.mid_dim == fam.mid_dim(b.dim) and (b.heads is None or b.heads == fam.heads(b.dim))
            for a, b in zip(ref, modules)
        ):
            return fam
    return None


def describe_layout(modules: list[ModuleSpec]) -> str:
    """A short human description of a layout, for error messages."""
    fam = match_family(modules)
    dims = sorted({m.dim for m in modules})
    base = f"{len(modules)} self-attention layers of widths {dims}"
    if fam is None:
        return base
    if modules and modules[0].heads is None and fam.key == "sd1":
        return f"{base} (SD1.x or SD2.x layout)"
    return f"{base} ({fam.label} layout)"
