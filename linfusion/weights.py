"""Reading and writing LinFusion weights in the official format.

Official layout (Yuanshi/LinFusion-1-5, -2-1, -XL): a folder with `config.json` and
`diffusion_pytorch_model.safetensors`. Module i of the config's `modules_list` owns the
17 tensors `i.to_q.weight`, `i.to_k.weight`, `i.to_v.weight`, `i.to_out.0.{weight,bias}`,
and `i.to_{q,k}_.{0,1,3}.{weight,bias}`. A single `.safetensors` file is accepted too: its
config is read from the metadata key `linfusion_config` (files this pack writes), else
inferred from the tensor shapes.

Only safetensors are read: pickled checkpoints (.ckpt, .pt, .pth, .bin) are refused unopened.
Files are treated as untrusted: the header is checked (tensor count, layer count, widths)
before any tensor is read or any per-layer work is done, and the values must be finite
floating-point numbers. `load_weights(..., check=...)` also lets the caller compare the
header's layers with its model before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .families import FAMILIES, Family, ModuleSpec, describe_layout, match_family

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
METADATA_KEY = "linfusion_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class LinFusionWeightsError(ValueError):
    """A weights file or folder that cannot be used; the message says why and what to do."""


# Bounds checked before any per-layer work, so that a small hostile file (a config listing a
# million layers, a header with 300k tiny tensors) is refused at once instead of expanding into
# gigabytes of expected keys. No UNet has more self-attention layers than the largest known
# layout (SDXL: 70), so no usable file exceeds these.
MAX_MODULES = max(len(f.modules()) for f in FAMILIES.values())
MAX_DIM = 1 << 14  # widths: SDXL's largest is 1280
MAX_CONFIG_BYTES = 1 << 20  # the official SDXL config.json is 11.3 kB
MAX_HEADER_BYTES = 2 << 20  # the official SDXL file's safetensors header is about 100 kB
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


TENSORS_PER_MODULE = len(module_shapes(ModuleSpec("", 1, 1, 1)))


def data_bytes(modules: list[ModuleSpec], itemsize: int = 2) -> int:
    """Bytes of tensor data of weights for these layers (official files are float16)."""
    return itemsize * sum(math.prod(s) for m in modules for s in module_shapes(m).values())


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
    entries = cfg["modules_list"]
    if len(entries) > MAX_MODULES:
        raise LinFusionWeightsError(
            f"config lists {len(entries)} layers; no supported UNet has more than {MAX_MODULES} self-attention "
            "layers: this is not a LinFusion config.json")
    out = []
    for i, e in enumerate(entries):
        try:
            if isinstance(e, dict):
                name, dim, heads, mid = e["module_name"], int(e["dim_n"]), int(e["heads"]), e.get("projection_mid_dim")
            else:
                name, dim, heads = e[0], int(e[1]), int(e[2])
                mid = None
            mid = dim if mid is None else int(mid)
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
            raise LinFusionWeightsError(f"config modules_list entry {i} is malformed: {_short(e)}") from exc
        if not isinstance(name, str) or not 0 < dim <= MAX_DIM or not 0 < mid <= MAX_DIM:
            raise LinFusionWeightsError(
                f"config modules_list entry {i} is malformed: {_short(e)} (a layer name and widths 1..{MAX_DIM})")
        if heads <= 0 or dim % heads:
            raise LinFusionWeightsError(f"config entry {i} ({name}): dim {dim} does not split into {heads} heads")
        out.append(ModuleSpec(name, dim, heads, mid))
    return out


def _short(value, limit: int = 120) -> str:
    """repr() cut to `limit` characters, for messages that quote untrusted input."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


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


def _damaged(path: Path, exc: Exception) -> LinFusionWeightsError:
    return LinFusionWeightsError(
        f"cannot read {path}: {exc}. The file is damaged or truncated (an interrupted download?): delete it "
        "and download it again"
    )


def _read(path: Path, cfg_path: Path | None, check: Callable[[LinFusionWeights], None] | None = None,
          tensors: bool = True) -> tuple[list[ModuleSpec], dict[str, torch.Tensor], str]:
    """(layers, state dict, description) of a safetensors file, checked before tensors are read:
    the header's tensor count and shapes against the config (metadata, config.json beside it, or
    inferred), so that no hostile header costs more than reading its first 8 bytes. Then
    `check(header)` (the layers, no tensors) may refuse it; only then are tensors read (none when
    `tensors` is False)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise _damaged(path, exc) from exc
    header_bytes = int.from_bytes(head, "little") if len(head) == 8 else 0
    if header_bytes > MAX_HEADER_BYTES:
        raise LinFusionWeightsError(
            f"{path} has a {header_bytes}-byte safetensors header (LinFusion weights have about 100 kB): "
            "this is not a LinFusion weights file")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    with f:
        try:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if len(keys) > MAX_MODULES * TENSORS_PER_MODULE:
                raise LinFusionWeightsError(
                    f"{path} holds {len(keys)} tensors; LinFusion weights have {TENSORS_PER_MODULE} per layer and at "
                    f"most {MAX_MODULES} layers: this is not a LinFusion weights file")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except (SafetensorError, OSError) as exc:
            raise _damaged(path, exc) from exc
        modules, where = _config(path, meta, cfg_path, shapes)
        _validate(modules, shapes, where)
        if check is not None:
            check(LinFusionWeights(modules, {}, source=str(path)))
        if not tensors:
            return modules, {}, where
        try:
            sd = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _damaged(path, exc) from exc
    for k, t in sd.items():
        if t.dtype not in FLOAT_DTYPES:
            raise LinFusionWeightsError(
                f"{where}: tensor {k} is {str(t.dtype).removeprefix('torch.')}; LinFusion weights are floating point "
                "(float16, bfloat16 or float32): this file is damaged or not LinFusion weights")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LinFusionWeightsError(
                f"{where}: tensor {k} has {bad} NaN or infinite values (they would give black images): the file is "
                "damaged or came from a diverged training run; download it again or use another checkpoint")
    return modules, sd, where


def _config(path: Path, meta: dict[str, str], cfg_path: Path | None,
            shapes: dict[str, tuple[int, ...]]) -> tuple[list[ModuleSpec], str]:
    """The layer list from the file's metadata, else config.json beside it, else the shapes."""
    if METADATA_KEY in meta:
        source, where = f"{path}: its metadata '{METADATA_KEY}'", f"{path} (config in its metadata)"
        text = meta[METADATA_KEY]
    elif cfg_path is not None:
        source, where = str(cfg_path), f"{path} with {cfg_path.name}"
        try:
            if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
                raise LinFusionWeightsError(
                    f"{cfg_path} has {cfg_path.stat().st_size} bytes (a LinFusion config.json has a few kB): it is "
                    "not the config of these weights; download it again")
            text = cfg_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise LinFusionWeightsError(f"cannot read {cfg_path} ({exc}): download it again") from exc
    else:
        return infer_modules(shapes), f"{path} (no config; layout inferred)"
    try:
        return parse_config(json.loads(text)), where
    except ValueError as exc:  # JSONDecodeError and LinFusionWeightsError
        detail = f": {exc}" if isinstance(exc, LinFusionWeightsError) else f" is not valid JSON ({exc})"
        raise LinFusionWeightsError(f"{source}{detail}. The file is damaged or not LinFusion's; download it "
                                    "again") from exc
    except RecursionError:  # JSON nested thousands deep: a config is a flat list of layers
        raise LinFusionWeightsError(f"{source} is nested too deeply to be a LinFusion config (a flat list of "
                                    "layers). The file is damaged or not LinFusion's; download it again") from None


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


def load_weights(path: str | os.PathLike, dtype: torch.dtype | None = None,
                 check: Callable[[LinFusionWeights], None] | None = None) -> LinFusionWeights:
    """Load and validate LinFusion weights from a folder or a .safetensors file.

    `check(header)` runs on the header's layers (`state_dict` empty) before any tensor data is
    read: raising there (e.g. `lambda w: plan_replacements(w, unet)`) refuses weights that do not
    fit a model at the cost of reading the header alone."""
    file, cfg_path = resolve_weights_path(path)
    modules, sd, _ = _read(file, cfg_path, check)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return LinFusionWeights(modules, sd, source=str(file))


def read_header(file: str | os.PathLike, cfg_path: str | os.PathLike | None) -> LinFusionWeights:
    """The checked layers of a safetensors file (with this config.json, or its own metadata, or
    inferred) without reading any tensor data: `state_dict` is empty."""
    modules, _, _ = _read(Path(file), None if cfg_path is None else Path(cfg_path), tensors=False)
    return LinFusionWeights(modules, {}, source=str(file))


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
