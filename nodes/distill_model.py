"""Reading a checkpoint for distillation through ComfyUI (UNet, text encoder, VAE): the
`load_model` of the distillation command line (scripts/distill.py; the command line itself
and the data pipeline are pure PyTorch in linfusion/distill_cli.py).

ComfyUI is imported inside the functions, so `--help` and bad arguments answer without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..linfusion.distill import DistillError
from ..linfusion.distill_cli import LoadedModel
from ..linfusion.patching import IncompatibleModelError, describe_model, model_family


def _find_comfyui(explicit: str | None) -> None:
    """Make `import comfy` work: --comfyui, $COMFYUI_PATH, the ComfyUI this pack is installed in
    (<ComfyUI>/custom_nodes/<pack>), or the dev setup's copy."""
    try:
        import comfy  # noqa: F401

        if explicit is None:
            return
    except ImportError:
        pass
    pack = Path(__file__).resolve().parents[1]
    candidates = [explicit, os.environ.get("COMFYUI_PATH"), str(pack.parents[1])]
    marker = Path(os.environ.get("LINFUSION_DEV", pack / ".dev")) / "comfyui_path"
    if marker.is_file():
        candidates.append(marker.read_text().strip())
    for c in candidates:
        if c and (Path(c) / "comfy" / "sd.py").is_file():
            sys.path.insert(0, str(Path(c)))
            return
    raise DistillError("ComfyUI not found: run this from a pack installed in ComfyUI/custom_nodes, or pass "
                       "--comfyui /path/to/ComfyUI (or set COMFYUI_PATH)")


def _comfy_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def load_with_comfyui(checkpoint: str | os.PathLike, device: str = "auto", comfyui: str | None = None) -> LoadedModel:
    """Read a checkpoint with ComfyUI as a library (UNet, text encoder, VAE)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise DistillError(f"--checkpoint {path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise DistillError(f"--checkpoint {path.name}: only .safetensors checkpoints are read (pickled .ckpt files "
                           "can run arbitrary code)")
    _find_comfyui(comfyui)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    import comfy.cli_args

    if dev.type == "cpu" and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True  # must precede the first import of model_management
    import comfy.sd

    try:
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                    embedding_directory=None)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleModelError(
            f"ComfyUI cannot read {path.name} as a model checkpoint ({first}). LinFusion distillation needs a full "
            "SD1.x, SD2.x or SDXL checkpoint (UNet, text encoder and VAE in one .safetensors file)"
        ) from exc
    patcher, clip, vae = out[0], out[1], out[2]
    return models_from_comfy(patcher, clip, vae, identity=_comfy_identity(path), device=dev, source=path.name)


def models_from_comfy(patcher, clip, vae, *, identity: str, device: torch.device, source: str) -> LoadedModel:
    """LoadedModel from ComfyUI's (ModelPatcher, CLIP, VAE) of one checkpoint."""
    import comfy.model_base

    base = patcher.model
    unet = getattr(base, "diffusion_model", None)
    if unet is None or model_family(unet) is None:
        what = describe_model(unet) if unet is not None else f"a {type(base).__name__} model"
        raise IncompatibleModelError(
            f"{source} is {what}; LinFusion distillation supports SD1.x, SD2.x and SDXL checkpoints")
    kinds = {comfy.model_base.ModelType.EPS: "eps", comfy.model_base.ModelType.V_PREDICTION: "v"}
    prediction = kinds.get(base.model_type)
    sigmas = getattr(base.model_sampling, "sigmas", None)
    if prediction is None or sigmas is None or getattr(base.model_sampling, "num_timesteps", None) is None:
        raise IncompatibleModelError(f"{source}: model type {base.model_type.name} is not supported (only eps and "
                                     "v-prediction models with a discrete 1000-step schedule)")
    if clip is None or vae is None or getattr(vae, "first_stage_model", None) is None:
        raise IncompatibleModelError(f"{source} has no text encoder or no VAE (a UNet-only file?): distillation "
                                     "needs a full checkpoint to encode the images and captions")
    alphas_cumprod = 1.0 / (1.0 + sigmas.double().cpu() ** 2)
    input_dtype = base.manual_cast_dtype or base.get_dtype()

    def forward(m, x, t, cond):
        return m(x, t, context=cond["context"], y=cond.get("y"), transformer_options={})

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return base.process_latent_in(vae.encode(pixels)).float().cpu()

    def encode_text(caption: str, width: int, height: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            out = {"context": cond.float().cpu()}
            y = base.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                target_width=width, target_height=height)
            if y is not None:
                out["y"] = y.float().cpu()
        return out

    def release() -> None:
        import comfy.model_management

        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()

    return LoadedModel(unet, forward, alphas_cumprod, prediction, encode_images, encode_text, device, identity,
                       input_dtype, release)
