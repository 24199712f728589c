"""Builders shared by the tests: small models with the real UNet layouts, official-format
LinFusion weights with random values, and a deterministic sampling call.

Imported after conftest has put ComfyUI on sys.path and set CPU mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models as sm
import comfy.utils
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL
from safetensors.torch import save_file

_SD15 = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
    use_temporal_resblock=False,
)
_SD21 = {**_SD15, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64}
_SDXL = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64, num_heads=-1,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)
# family key -> (supported model class, full unet config, small model_channels, model type)
LAYOUTS = {
    "sd15": (sm.SD15, _SD15, 32, comfy.model_base.ModelType.EPS),
    "sd21": (sm.SD20, _SD21, 64, comfy.model_base.ModelType.V_PREDICTION),
    "sdxl": (sm.SDXL, _SDXL, 64, comfy.model_base.ModelType.EPS),
}
LF_FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
CONTEXT = {"sd15": 768, "sd21": 1024, "sdxl": 2048}
# The pack's nodes (node ids, as in ComfyUI's NODE_CLASS_MAPPINGS).
PACK_NODES = ["ApplyLinFusion", "LinFusionHighResSampler", "LinFusionHighResSamplerAdvanced",
              "LinFusionSuperResolution", "LinFusionMultiGPU"]
LOWMEM_TOL = 1e-5  # fp32 max abs difference the low-memory tricks may make (test_lowmem, test_dynamic)


def base_model(kind: str, channels: int | None = None, meta: bool = False):
    """A ComfyUI BaseModel with the exact module layout of `kind`; `channels` shrinks its
    widths (None: full size). On meta it costs no memory (names and shapes only)."""
    cls, cfg, small_ch, model_type = LAYOUTS[kind]
    cfg = {**cfg, "model_channels": channels or 320}
    config = cls(cfg)
    model_cls = comfy.model_base.SDXL if kind == "sdxl" else comfy.model_base.BaseModel
    if meta:
        with torch.device("meta"):
            return model_cls(config, model_type=model_type)
    return model_cls(config, model_type=model_type)


def small_model(kind: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Small model (random weights, fp32, CPU) wrapped in ComfyUI's ModelPatcher."""
    model = base_model(kind, LAYOUTS[kind][2])
    fill_random(model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def small_vae():
    """ComfyUI's own VAE class around a narrow AutoencoderKL (SD's layout, widths 32..128,
    x8 compression): the real encode/decode/tiling code at a fraction of the cost."""
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
    fill_random(ae, 5)
    orig = comfy.sd.AutoencoderKL
    narrow = {"ch": 32, "num_res_blocks": 1}
    comfy.sd.AutoencoderKL = lambda ddconfig, embed_dim: orig(ddconfig={**ddconfig, **narrow}, embed_dim=embed_dim)
    try:
        return comfy.sd.VAE(sd=ae.state_dict())
    finally:
        comfy.sd.AutoencoderKL = orig


def fill_random(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight init: give every parameter values that keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                base = 1.0 if name.endswith("weight") else 0.0  # 1-D weights are norm gains
                p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def lf_modules(lf, kind: str, unet=None):
    """ModuleSpecs of the family of `kind`; with a UNet, widths taken from its attn1 layers."""
    fam = lf.FAMILIES[LF_FAMILY[kind]]
    specs = fam.modules()
    if unet is None:
        return specs
    out = []
    for s in specs:
        attn = unet.get_submodule(lf.diffusers_to_ldm(s.name))
        d = attn.to_q.weight.shape[1]
        h = attn.heads
        mid = d if fam.mid_dim(s.dim) == s.dim else d // 16
        out.append(lf.ModuleSpec(s.name, d, h, mid))
    return out


def random_state(lf, modules, seed: int = 0, dtype=torch.float16, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Official-format state dict (keys `i.<tensor>`) with random values of sane scale."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, spec in enumerate(modules):
        for k, shape in lf.weights.module_shapes(spec).items():
            if len(shape) == 2:
                t = torch.randn(shape, generator=g) * (scale / math.sqrt(shape[1]))
            elif k.endswith(".1.weight"):  # LayerNorm gain
                t = 1.0 + 0.02 * torch.randn(shape, generator=g)
            else:
                t = 0.02 * torch.randn(shape, generator=g)
            sd[f"{i}.{k}"] = t.to(dtype)
    return sd


def write_official(folder: Path, lf, modules, state: dict, early_config: bool = False) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors exactly as the hub has them."""
    folder.mkdir(parents=True, exist_ok=True)
    if early_config:
        cfg = {"_class_name": "StableMamba", "modules_list": [[m.name, m.dim, m.heads] for m in modules]}
    else:
        cfg = lf.weights.make_config(modules)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def raw_safetensors(path, n_tensors: int, metadata: dict | None = None) -> None:
    """A safetensors file of `n_tensors` one-byte int8 tensors, written directly (save_file
    would take half a minute for 300k tensors)."""
    header = {f"{i}.x": {"dtype": "I8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n_tensors)}
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(n_tensors))


def unet_inputs(kind: str, hw=(48, 40)):
    """(x, timesteps, context, y) for a UNet of `kind` called directly: a batch of 2 latents of `hw`,
    random text context, and for SDXL random `y`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([500.0, 300.0])
    ctx = torch.randn(2, 77, CONTEXT[kind], generator=g)
    y = torch.randn(2, 2816, generator=g) if kind == "sdxl" else None
    return x, t, ctx, y


def linfusion_unet(lf, kind: str):
    """A small UNet of `kind` with every attn1 replaced by a LinFusion layer with random weights."""
    unet = small_model(kind).model.diffusion_model.eval()
    for spec in lf_modules(lf, kind, unet):
        path = lf.diffusers_to_ldm(spec.name)
        layer = lf.LinFusionAttention(spec.dim, spec.heads, spec.mid_dim)
        fill_random(layer, 1)
        parent, name = path.rsplit(".", 1)
        setattr(unet.get_submodule(parent), name, layer.eval())
    return unet


def conds(kind: str, batch: int = 1, seed: int = 1, width: int = 512, height: int = 512):
    """(positive, negative) ComfyUI conditioning with random text embeddings."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        c = torch.randn(batch, 77, CONTEXT[kind], generator=g)
        extra = {}
        if kind == "sdxl":
            extra = {"pooled_output": torch.randn(batch, 1280, generator=g), "width": width, "height": height}
        out.append([[c, extra]])
    return out[0], out[1]


def first_output(out):
    """The first output of a node's `execute`: a V3 NodeOutput's result[0], or a V1 tuple's [0]."""
    return out.result[0] if hasattr(out, "result") else out[0]


def put_weights(lf, linfusion_dir: Path, kind: str, model, name: str | None = None, seed: int = 0) -> Path:
    """Official-format weights sized for this small model, in the linfusion folder (folder `name`,
    default: the family's own folder name, which `auto` finds)."""
    unet = model.get_model_object("diffusion_model")
    mods = lf_modules(lf, kind, unet)
    fam = lf.FAMILIES[LF_FAMILY[kind]]
    folder = linfusion_dir / (name or fam.folder_name)
    return write_official(folder, lf, mods, random_state(lf, mods, seed=seed))


def apply(node_classes, model, weights, softmax_max_tokens: int = 0):
    """Apply LinFusion through its node: the patched clone of `model`."""
    return first_output(node_classes["ApplyLinFusion"].execute(model, weights, softmax_max_tokens))


def attn1_objects(model) -> dict:
    """The UNet's self-attention modules by name (what Apply LinFusion replaces)."""
    unet = model.model.diffusion_model
    return {n: m for n, m in unet.named_modules() if n.endswith(".attn1")}


def count_linfusion_layers(model) -> int:
    """How many self-attention layers of `model` are LinFusion layers once ComfyUI has loaded it
    (its patches applied; unloaded again afterwards)."""
    m = model.clone()
    comfy.model_management.load_models_gpu([m])
    try:
        return sum(any(c.__name__ == "LinFusionAttention" for c in type(a).__mro__) for a in attn1_objects(m).values())
    finally:
        comfy.model_management.unload_all_models()


def sample(model, kind: str, latent_hw=(16, 16), steps: int = 4, seed: int = 42, batch: int = 1,
           sampler: str = "euler", scheduler: str = "normal", cfg: float = 5.0, callback=None) -> torch.Tensor:
    """Sample from an empty latent with ComfyUI's own sampling entry point."""
    h, w = latent_hw
    latent = torch.zeros(batch, 4, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds(kind, batch, width=w * 8, height=h * 8)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=seed,
                               callback=callback, disable_pbar=True)


@contextmanager
def progress_hook(fn: Callable) -> Iterator[None]:
    """ComfyUI's global progress-bar hook is `fn` for the block (as the server sets its own), the
    previous one put back afterwards whatever happens."""
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(fn)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


def interrupt_at(value: int) -> Callable:
    """A progress hook that raises ComfyUI's interrupt when the bar reaches `value` (Cancel)."""

    def hook(v, total, preview, **_kw):
        if v == value:
            raise comfy.model_management.InterruptProcessingException()

    return hook


def apply_random_linfusion(lf, node_classes, linfusion_dir: Path, model, kind: str = "sd15",
                           softmax_max_tokens: int = 0, seed: int = 0):
    """`model` through the Apply LinFusion node ('auto' weights), with official-format weights of
    random values written into `linfusion_dir` (the conftest fixture's models/linfusion)."""
    mods = lf_modules(lf, kind, model.get_model_object("diffusion_model"))
    write_official(linfusion_dir / lf.FAMILIES[LF_FAMILY[kind]].folder_name, lf, mods,
                   random_state(lf, mods, seed=seed))
    out = node_classes["ApplyLinFusion"].execute(model, "auto", softmax_max_tokens)
    return out.result[0] if hasattr(out, "result") else out[0]
