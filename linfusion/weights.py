"""Reading and writing LinFusion weights in the official format.

Official layout (Yuanshi/LinFusion-1-5, -2-1, -XL): a folder with `config.json` and
`diffusion_pytorch_model.safetensors`. Module i of the config's `modules_list` owns the
17 tensors `i.to_q.weight`, `i.to_k.weight`, `i.to_v.weight`, `i.to_out.0.{weight,bias}`,
and `i.to_{q,k}_.{0,1,3}.{weight,bias}`. A single `.safetensors` file is accepted too: its
config is read from the metadata key `linfusion_config` (files this pack writes), else
inferred from the tensor shapes.

Only safetensors are read: pickled checkpoints (.ckpt, .pt, .pth, .bin) are refused unopened.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .families import Family, ModuleSpec, describe_layout, match_family

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
METADATA_KEY = "linfusion_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class LinFusionWeightsError(ValueError):
    """A weights file or folder that cannot be used; the message says why and what to do."""


def module_shapes(spec: ModuleSpec) -> dict[str, tuple[int, ...]]:
    """Tensor name (without the index prefix) -> shape, for one LinFusion layer."""
    d, m = spec.dim, spec.mid_dim
    shapes: dict[str, tuple[int, ...]] = {
        "to_q.weight": (d, d), "to_k.weight": (d, d), "to_v.weight": (d, d),
        "to_out.0.weight": (d, d), "to_out.0.bias": (d,),
    }
    for p in ("to_q_", "to_k_"):
        shapes.update({
            f"{p}.0.weight": (m, d), f"{p}.0.bias": (m,), f"{p}.1.weight": (m,), f"{p}.1.bias": (m,),
            f"{p}.3.weight": (d, m), f"{p}.3.bias": (d,),
        })
    return shapes


@dataclass
class LinFusionWeights:
    """Validated LinFusion weights: the layer list and a state dict keyed `i.<tensor>`."""

    modules: list[ModuleSpec]
    state_dict: dict[str, torch.Tensor]
    source: str = ""
    family: Family | None = field(default=None)

    def __post_init__(self) -> None:
        self.family = match_family(self.modules)

    def module_state(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"{i}."
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}

    def describe(self) -> str:
        return describe_layout(self.modules)


def parse_config(cfg: dict) -> list[ModuleSpec]:
    """`modules_list` of a config.json, in either official form, as ModuleSpecs.

    Current form: [{"module_name", "dim_n", "heads", "projection_mid_dim"}, ...]
    (mid dim null -> equal to dim). Early form (class StableMamba): [[name, dim, heads], ...].
    """
    if not isinstance(cfg, dict) or not isinstance(cfg.get("modules_list"), list) or not cfg["modules_list"]:
        raise LinFusionWeightsError("config has no non-empty 'modules_list': this is not a LinFusion config.json")
    out = []
    for i, e in enumerate(cfg["modules_list"]):
        try:
            if isinstance(e, dict):
                name, dim, heads, mid = e["module_name"], int(e["dim_n"]), int(e["heads"]), e.get("projection_mid_dim")
            else:
                name, dim, heads = e[0], int(e[1]), int(e[2])
                mid = None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise LinFusionWeightsError(f"config modules_list entry {i} is malformed: {e!r}") from exc
        if dim <= 0 or heads <= 0 or dim % heads:
            raise LinFusionWeightsError(f"config entry {i} ({name}): dim {dim} does not split into {heads} heads")
        out.append(ModuleSpec(str(name), dim, heads, dim if mid is None else int(mid)))
    return out


def make_config(modules: list[ModuleSpec]) -> dict:
    """The official config.json content for these layers."""
    return {
        "_class_name": "LinFusion",
        "_diffusers_version": "0.30.0",
        "modules_list": [
            {"dim_n": m.dim, "heads": m.heads, "module_name": m.name,
             "projection_mid_dim": None if m.mid_dim == m.dim else m.mid_dim}
            for m in modules
        ],
    }


def infer_modules(shapes: dict[str, tuple[int, ...]]) -> list[ModuleSpec]:
    """Guess the layer list of a bare state dict from its key shapes and a known family.

    Heads cannot be read from shapes (SD1.x and SD2.x differ only there): they are left None
    and taken from the model the weights are applied to.
    """
    try:
        idx = sorted({int(k.split(".", 1)[0]) for k in shapes})
    except ValueError:
        raise LinFusionWeightsError("keys are not of the form '<index>.to_q.weight': not LinFusion weights") from None
    if idx != list(range(len(idx))):
        raise LinFusionWeightsError(f"layer indices are not 0..{len(idx) - 1}: the file is incomplete")
    dims = []
    for i in idx:
        q, p = shapes.get(f"{i}.to_q.weight"), shapes.get(f"{i}.to_q_.0.weight")
        if q is None or p is None or len(q) != 2 or len(p) != 2:
            raise LinFusionWeightsError(f"layer {i} lacks to_q.weight or to_q_.0.weight: the file is incomplete")
        dims.append((q[0], p[0]))
    from .families import FAMILIES  # local: families imports nothing from here

    for fam in FAMILIES.values():
        ref = fam.modules()
        if len(ref) == len(dims) and all((r.dim, r.mid_dim) == d for r, d in zip(ref, dims)):
            return [ModuleSpec(r.name, r.dim, None, r.mid_dim) for r in ref]
    raise LinFusionWeightsError(
        f"no config.json and the layout ({len(dims)} layers, widths {sorted({d for d, _ in dims})}) is not a known "
        "family: put the config.json that came with the weights beside the file"
    )


def _validate(modules: list[ModuleSpec], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    expected = {f"{i}.{k}": s for i, spec in enumerate(modules) for k, s in module_shapes(spec).items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        raise LinFusionWeightsError(
            f"{where}: keys do not match its config ({'; '.join(parts)}). The file is incomplete or belongs "
            "to another config: download both files of the same LinFusion repository again"
        )
    for k, s in expected.items():
        if tuple(shapes[k]) != s:
            raise LinFusionWeightsError(f"{where}: {k} has shape {tuple(shapes[k])}, its config says {s}")


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise LinFusionWeightsError(
            f"cannot read {path}: {exc}. The file is damaged or truncated (an interrupted download?): delete it "
            "and download it again"
        ) from exc


def resolve_weights_path(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(safetensors file, config.json or None) for a weights folder or file; refuses pickles."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LinFusionWeightsError(
            f"{p.name}: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code and are never "
            "opened. Use the .safetensors release (Yuanshi/LinFusion-*)"
        )
    if p.is_dir():
        w, c = p / WEIGHTS_NAME, p / CONFIG_NAME
        if not w.is_file():
            found = sorted(x.name for x in p.iterdir())
            raise LinFusionWeightsError(f"{p} has no {WEIGHTS_NAME} (found: {found or 'nothing'})")
        return w, (c if c.is_file() else None)
    if not p.is_file():
        raise LinFusionWeightsError(f"{p} does not exist")
    if p.suffix.lower() != ".safetensors":
        raise LinFusionWeightsError(f"{p.name}: only .safetensors files are read")
    c = p.parent / CONFIG_NAME
    return p, (c if c.is_file() else None)


def load_weights(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LinFusionWeights:
    """Load and validate LinFusion weights from a folder or a .safetensors file."""
    file, cfg_path = resolve_weights_path(path)
    sd, meta = _open(file)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if METADATA_KEY in meta:
        modules = parse_config(json.loads(meta[METADATA_KEY]))
        where = f"{file} (config in its metadata)"
    elif cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LinFusionWeightsError(f"{cfg_path} is not valid JSON ({exc}): download it again") from exc
        modules = parse_config(cfg)
        where = f"{file} with {cfg_path.name}"
    else:
        modules = infer_modules(shapes)
        where = f"{file} (no config; layout inferred)"
    _validate(modules, shapes, where)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return LinFusionWeights(modules, sd, source=str(file))


def save_weights(folder: str | os.PathLike, modules: list[ModuleSpec], state_dict: dict[str, torch.Tensor],
                 dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the official folder format (config.json + safetensors), each file atomically."""
    _validate(modules, {k: tuple(v.shape) for k, v in state_dict.items()}, "weights to save")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu() for k, v in state_dict.items()}
    cfg = make_config(modules)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
    return out


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
