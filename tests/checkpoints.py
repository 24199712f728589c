"""Full-size model files with random values, for tests that run real ComfyUI loaders.

* `sd15_checkpoint()`: an SD1.5 checkpoint in the original LDM key format
  (`model.diffusion_model.*`, `cond_stage_model.transformer.text_model.*`,
  `first_stage_model.*`), fp16, about 2.1 GB. Key names and shapes come from ComfyUI's own
  classes built on the meta device: the UNet from the SD1.5 LDM config ComfyUI ships
  (models/configs/v1-inference.yaml) through `model_detection.convert_config`,
  `supported_models.SD15` and `model_base.BaseModel`; CLIP-L from `sd1_clip.SDClipModel`;
  the VAE from `AutoencoderKL` with the same config's ddconfig. Before writing, ComfyUI's
  `model_detection.model_config_from_unet` must recognise the layout as SD15.
* `linfusion_weights(lf)`: LinFusion weights for SD1.x in the official folder format
  (config.json + diffusion_pytorch_model.safetensors), fp16, about 200 MB.

Values keep activations finite: weights of 2+ dims ~ N(0, 1/fan_in), 1-D weights (all are
norm gains) 1, biases 0; one seeded generator, so a file is reproducible.

Both are cached in $LINFUSION_TEST_CACHE, else $LINFUSION_DEV/test-cache (LINFUSION_DEV defaults
to <repo>/.dev), built into a temporary name and renamed (atomic), under a file lock (parallel
sessions build once). The file names carry GENERATOR_VERSION: bump it when the content rules
change and the next run rebuilds.

Prebuild from a shell: .dev/venv/bin/python tests/checkpoints.py
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

GENERATOR_VERSION = 1
REPO = Path(__file__).resolve().parents[1]
SD15_PREFIXES = {"unet": "model.diffusion_model.", "clip": "cond_stage_model.", "vae": "first_stage_model."}
# The time the last build in this process took (None: taken from the cache).
last_build_seconds: dict[str, float] = {}


def cache_dir() -> Path:
    dev = Path(os.environ.get("LINFUSION_DEV", REPO / ".dev"))  # a worktree shares the main checkout's
    d = Path(os.environ.get("LINFUSION_TEST_CACHE") or dev / "test-cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(name: str):
    with open(cache_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- SD1.5 layout from ComfyUI's own classes -----------------------------------------------
def _ldm_config() -> dict:
    import comfy.model_detection
    import yaml

    comfyui = Path(comfy.model_detection.__file__).resolve().parents[1]
    path = comfyui / "models" / "configs" / "v1-inference.yaml"
    return yaml.safe_load(path.read_text())["model"]["params"]


def sd15_layout() -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of a full SD1.5 checkpoint in the LDM format (no memory used)."""
    import comfy.ldm.models.autoencoder
    import comfy.model_base
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models

    params = _ldm_config()
    unet_cfg = comfy.model_detection.convert_config(dict(params["unet_config"]["params"]))
    unet_cfg = {**comfy.supported_models.SD15.unet_config, **unet_cfg, "use_checkpoint": False}
    vae_params = params["first_stage_config"]["params"]
    with torch.device("meta"):
        unet = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet_cfg)).diffusion_model
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=vae_params["ddconfig"],
                                                         embed_dim=vae_params["embed_dim"])
    layout: dict[str, tuple[int, ...]] = {}
    parts = (("unet", unet.state_dict()),
             # The LDM format has the text model only (no projection / logit scale).
             ("clip", {k: v for k, v in clip.state_dict().items() if k.startswith("transformer.text_model.")}),
             ("vae", vae.state_dict()))
    for part, sd in parts:
        for k, v in sd.items():
            assert v.is_floating_point(), f"{part} {k} is {v.dtype}"
            layout[SD15_PREFIXES[part] + k] = tuple(v.shape)
    return layout


def detected_model_config(shapes: dict[str, tuple[int, ...]]):
    """What ComfyUI's checkpoint detection makes of a key -> shape layout (its model config or None)."""
    import comfy.model_detection

    sd = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in shapes.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    return comfy.model_detection.model_config_from_unet(sd, prefix)


def file_layout(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape read from a safetensors header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def random_value(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) >= 2:
        return torch.randn(shape, generator=g).div_(math.sqrt(math.prod(shape[1:])))
    if name.endswith(".weight"):  # every 1-D weight of these models is a norm gain
        return torch.ones(shape)
    return torch.zeros(shape)


def build_sd15_checkpoint(target: Path, seed: int = 0) -> None:
    """Write the random full-size SD1.5 checkpoint to `target` (not atomic: see sd15_checkpoint)."""
    import comfy.supported_models
    from safetensors.torch import save_file

    layout = sd15_layout()
    cfg = detected_model_config(layout)
    if type(cfg) is not comfy.supported_models.SD15:
        raise RuntimeError(f"ComfyUI detects the generated layout as {type(cfg).__name__}, not SD15")
    g = torch.Generator().manual_seed(seed)
    tensors = {k: random_value(k, s, g).to(torch.float16) for k, s in layout.items()}
    save_file(tensors, str(target), metadata={
        "format": "pt", "generator": "ComfyUI-LinFusion tests/checkpoints.py",
        "generator_version": str(GENERATOR_VERSION), "seed": str(seed)})


def sd15_checkpoint(seed: int = 0) -> Path:
    """The cached random SD1.5 checkpoint, built on first use (about 25 s)."""
    target = cache_dir() / f"sd15-random-v{GENERATOR_VERSION}-s{seed}.safetensors"
    with _locked("sd15"):
        if target.is_file():
            last_build_seconds.pop("sd15", None)
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        t0 = time.monotonic()
        try:
            build_sd15_checkpoint(tmp, seed)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        last_build_seconds["sd15"] = time.monotonic() - t0
        # Older generator versions are dead weight (2 GB each).
        for old in cache_dir().glob("sd15-random-v*.safetensors"):
            if not old.name.startswith(f"sd15-random-v{GENERATOR_VERSION}-"):
                old.unlink(missing_ok=True)
    return target


# -- LinFusion weights -----------------------------------------------------------------------
def linfusion_weights(lf, family: str = "sd1", seed: int = 0) -> Path:
    """A cached folder with full-size random LinFusion weights of `family` in the official format.

    The folder name carries a hash of the config and tensor shapes the pack's own code gives,
    so a change of the format makes a new folder rather than a stale one."""
    import helpers

    modules = lf.FAMILIES[family].modules()
    desc = json.dumps([lf.weights.make_config(modules), [lf.weights.module_shapes(m) for m in modules]],
                      sort_keys=True, default=list)
    key = hashlib.sha256(desc.encode()).hexdigest()[:12]
    folder = cache_dir() / f"linfusion-{family}-random-v{GENERATOR_VERSION}-s{seed}-{key}"
    with _locked(f"linfusion-{family}"):
        if (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file():
            last_build_seconds.pop(f"linfusion-{family}", None)
            return folder
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.part")
        t0 = time.monotonic()
        try:
            state = helpers.random_state(lf, modules, seed=seed, dtype=torch.float16)
            helpers.write_official(tmp, lf, modules, state)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        last_build_seconds[f"linfusion-{family}"] = time.monotonic() - t0
    return folder


if __name__ == "__main__":  # prebuild the checkpoint outside pytest
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from comfy_server import comfyui_path

    sys.path.insert(0, str(comfyui_path()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    t = time.monotonic()
    print(sd15_checkpoint(), f"{time.monotonic() - t:.1f} s")
