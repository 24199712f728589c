"""A small checkpoint that ComfyUI's own loader detects as SD1.5, and LinFusion weights for it,
for tests that run scripts/band_parallel_stage.py's real mode in fresh processes.

ComfyUI detects SD1.5 from model_channels 320 and the text width 768, not from the depth of the
UNet: this one keeps SD1.5's block structure (2 resnets per level, one transformer per block,
the 16 attn1 layers LinFusion replaces) with channel_mult [1, 1, 1, 1] (111 M parameters
instead of 860 M). CLIP-L and the VAE are full size (the loader builds them from fixed
configs). fp16, about 640 MB; values as in tests/checkpoints.py (N(0, 1/fan_in), norm gains 1,
biases 0). Cached beside the full-size stand-ins, built once under a lock, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import checkpoints
import comfy.model_base
import comfy.supported_models as sm
import helpers
import torch
from safetensors.torch import save_file

VERSION = 1
UNET = {**helpers._SD15, "model_channels": 320, "channel_mult": [1, 1, 1, 1]}


def _unet_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return comfy.model_base.BaseModel(sm.SD15(dict(UNET))).diffusion_model


def layout() -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape: the small UNet, CLIP-L and the VAE under the LDM prefixes."""
    unet = {checkpoints.SD15_PREFIXES["unet"] + k: tuple(v.shape) for k, v in _unet_meta().state_dict().items()}
    rest = {k: s for k, s in checkpoints.sd15_layout().items() if not k.startswith(checkpoints.SD15_PREFIXES["unet"])}
    return {**unet, **rest}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:12]


def small_sd15_checkpoint(seed: int = 0) -> Path:
    shapes = layout()
    target = checkpoints.cache_dir() / f"sd15-small-random-v{VERSION}-s{seed}-{_key(shapes)}.safetensors"
    with checkpoints._locked("sd15-small"):
        if target.is_file():
            return target
        cfg = checkpoints.detected_model_config(shapes)
        if type(cfg) is not sm.SD15:
            raise RuntimeError(f"ComfyUI detects the small layout as {type(cfg).__name__}, not SD15")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        t0 = time.monotonic()
        try:
            g = torch.Generator().manual_seed(seed)
            save_file({k: checkpoints.random_value(k, s, g).to(torch.float16) for k, s in shapes.items()}, str(tmp),
                      metadata={"format": "pt", "generator": "ComfyUI-LinFusion tests/parallel_checkpoint.py"})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        checkpoints.last_build_seconds["sd15-small"] = time.monotonic() - t0
    return target


def small_linfusion_weights(lf, seed: int = 0) -> Path:
    """Official-format LinFusion weights (config.json + safetensors, fp16) for the small UNet's 16 attn1 layers."""
    modules = helpers.lf_modules(lf, "sd15", _unet_meta())
    desc = [lf.weights.make_config(modules), [lf.weights.module_shapes(m) for m in modules]]
    folder = checkpoints.cache_dir() / f"linfusion-sd1-small-v{VERSION}-s{seed}-{_key(desc)}"
    with checkpoints._locked("linfusion-sd1-small"):
        if (folder / "diffusion_pytorch_model.safetensors").is_file():
            return folder
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.part")
        try:
            helpers.write_official(tmp, lf, modules, helpers.random_state(lf, modules, seed=seed, dtype=torch.float16))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
