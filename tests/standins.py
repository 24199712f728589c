"""Stand-in model files for running the example workflows: the real formats and full-size
layouts of the public files the workflows name, filled with random values.

* `checkpoint("sd21")`: SD2.1-768-v in the original LDM format (`model.diffusion_model.*`,
  OpenCLIP ViT-H text model under `cond_stage_model.model.*`, `first_stage_model.*`), fp16,
  about 2.6 GB. ComfyUI detects SD2 v-prediction checkpoints by the spread of one LayerNorm
  bias (supported_models.SD20.model_type: std of
  `output_blocks.11.1.transformer_blocks.0.norm1.bias` > 0.09), so that bias gets std 0.2,
  as the real v2-1_768-ema-pruned has.
* `checkpoint("sdxl")`: SDXL base in the sgm format (`conditioner.embedders.0.transformer.*`
  CLIP-L, `conditioner.embedders.1.model.*` OpenCLIP bigG), fp16, about 6.9 GB.
* `controlnet_sd15()`: an SD1.5 ControlNet in the original format (`control_model.*`), fp16,
  about 0.7 GB, as control_v11p_sd15_*_fp16.safetensors.
* `lora_sd15()`: a kohya-format LoRA (`lora_unet_*`, `lora_te_*`; rank 4) on every attention
  projection of the SD1.5 UNet and on the text encoder's attention, a few MB.

Key names and shapes come from ComfyUI's own classes built on the meta device and its own
conversion for saving (`model_config.process_*_state_dict_for_saving`), and each layout is
checked against ComfyUI's detection before anything is written.

Values: 2+-D tensors ~ N(0, 1/fan_in), 1-D weights 1 (norm gains), biases 0, as
tests/checkpoints.py does. To stay fast at 7 GB, normals come from one seeded pool of 2**24
values read at a random offset per tensor, and files are written tensor by tensor
(safetensors' layout written directly), so memory stays at the size of the largest tensor.
Files are cached like checkpoints.py's (same folder, lock, atomic rename, version in the name).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import time
from pathlib import Path

import checkpoints
import torch

GENERATOR_VERSION = 1
POOL_SIZE = 1 << 24
V_PRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
LORA_RANK = 4
# The time the last build of each file took in this process (absent: taken from the cache).
last_build_seconds: dict[str, float] = {}

_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}


# -- layouts -----------------------------------------------------------------------------------
def _vae_meta():
    import comfy.ldm.models.autoencoder

    vae = checkpoints._ldm_config()["first_stage_config"]["params"]  # the same VAE layout for all three families
    with torch.device("meta"):
        return comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=vae["ddconfig"], embed_dim=vae["embed_dim"])


def checkpoint_layout(kind: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a full checkpoint of `kind` ('sd21' or 'sdxl') in its original format."""
    import helpers

    model = helpers.base_model(kind, meta=True)
    cfg = model.model_config
    target = cfg.clip_target()
    with torch.device("meta"):
        clip = target.clip(device="meta")
    clip_sd = clip.state_dict()
    sd = model.state_dict_for_saving(clip_sd, _vae_meta().state_dict())
    sd.pop("v_pred", None)  # the public SD2.1 file has no marker: ComfyUI goes by the bias spread
    return {k: (tuple(v.shape), v.dtype if not v.is_floating_point() else torch.float16) for k, v in sd.items()}


def check_checkpoint_layout(kind: str, layout) -> None:
    """ComfyUI must detect the family, and its loader must find every text-encoder weight."""
    import comfy.model_detection
    import comfy.supported_models as sm
    import helpers

    want = {"sd21": sm.SD20, "sdxl": sm.SDXL}[kind]
    sd = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in layout.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    cfg = comfy.model_detection.model_config_from_unet(sd, prefix)
    if type(cfg) is not want:
        raise RuntimeError(f"ComfyUI detects the generated {kind} layout as {type(cfg).__name__}, not {want.__name__}")
    clip_keys = set(cfg.process_clip_state_dict(dict(sd)))
    with torch.device("meta"):
        expected = set(helpers.base_model(kind, meta=True).model_config.clip_target().clip(device="meta").state_dict())
    # Buffers, and CLIP-L's projection (SDXL's text model does not use it; the public file lacks it too).
    missing = {k for k in expected - clip_keys
               if not k.endswith(("position_ids", "logit_scale", "clip_l.transformer.text_projection.weight"))}
    if missing:
        raise RuntimeError(f"{kind}: ComfyUI's loader would miss {len(missing)} text encoder weights, "
                           f"e.g. {sorted(missing)[:3]}")


def controlnet_layout() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """An SD1.5 ControlNet (hint: RGB image) in the original `control_model.*` format."""
    import comfy.cldm.cldm
    import helpers

    unet = helpers.base_model("sd15", meta=True).model_config.unet_config
    cfg = {k: v for k, v in unet.items() if k not in ("out_channels", "dtype", "device", "operations")}
    with torch.device("meta"):
        cn = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg)
    layout = {f"control_model.{k}": (tuple(v.shape), torch.float16) for k, v in cn.state_dict().items()}
    import comfy.model_detection

    sd = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in layout.items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "control_model.", True)
    if detected is None or detected.unet_config.get("model_channels") != 320:
        raise RuntimeError(f"ComfyUI does not detect the generated ControlNet as SD1.5: {detected}")
    return layout


def lora_tensors(seed: int = 0, channels: int | None = None) -> dict[str, torch.Tensor]:
    """Kohya LoRA for SD1.5: every attn1/attn2 projection of the UNet and every text-encoder
    attention projection, rank 4, small random up/down matrices, alpha = rank. `channels`: for
    the small SD1.5 layout of that width (helpers.base_model), instead of the full size."""
    import comfy.utils
    import helpers

    model = helpers.base_model("sd15", channels, meta=True)
    unet_sd = model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(name: str, shape: tuple[int, int]) -> None:
        out_f, in_f = shape
        out[f"{name}.lora_down.weight"] = (torch.randn(LORA_RANK, in_f, generator=g) / math.sqrt(in_f)).half()
        out[f"{name}.lora_up.weight"] = (torch.randn(out_f, LORA_RANK, generator=g) * 0.01).half()
        out[f"{name}.alpha"] = torch.tensor(float(LORA_RANK)).half()

    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        if ".attn" in diffusers_key and diffusers_key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight",
                                                               ".to_out.0.weight")):
            add("lora_unet_" + diffusers_key[:-len(".weight")].replace(".", "_"), tuple(unet_sd[ldm_key].shape))
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}", (768, 768))
    return out


# -- values and the streaming writer -----------------------------------------------------------
class _Values:
    """Reproducible values of sane scale, produced quickly for billions of parameters: each
    tensor is a run of consecutive values (from a random offset, wrapping) of one pool of
    standard normals, kept pre-scaled in the file's dtype for each distinct fan-in."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(POOL_SIZE, generator=self.g)
        self.scaled: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def normal_chunks(self, n: int, std: float, dtype: torch.dtype) -> list[torch.Tensor]:
        pool = self.scaled.get((std, dtype))
        if pool is None:
            pool = self.scaled[(std, dtype)] = (self.pool * std).to(dtype)
        start = int(torch.randint(0, POOL_SIZE, (1,), generator=self.g))
        chunks = []
        while n > 0:
            take = min(n, POOL_SIZE - start)
            chunks.append(pool[start:start + take])
            n -= take
            start = 0
        return chunks

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """The tensor's values in order, as one or more flat chunks."""
        if not dtype.is_floating_point:  # position ids
            return [torch.arange(shape[-1], dtype=dtype).expand(shape).flatten()]
        n = math.prod(shape)
        if name == V_PRED_KEY:
            return self.normal_chunks(n, 0.2, dtype)
        if len(shape) >= 2:
            return self.normal_chunks(n, 1.0 / math.sqrt(math.prod(shape[1:])), dtype)
        if name.endswith(".weight") or len(shape) == 0:  # norm gains (and the logit scale)
            return [torch.ones(n, dtype=dtype)]
        return [torch.zeros(n, dtype=dtype)]


def write_safetensors(target: Path, layout: dict, make, metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor: `make(name, shape, dtype)` gives each tensor,
    whole or as a list of flat chunks in order."""
    header, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in layout.items():
            made = make(name, shape, dtype)
            chunks = [made] if isinstance(made, torch.Tensor) else made
            if sum(c.numel() for c in chunks) != math.prod(shape) or any(c.dtype != dtype for c in chunks):
                raise RuntimeError(f"{name}: made values do not fit the layout {shape} {dtype}")
            for c in chunks:
                c = c.contiguous()
                f.write(memoryview(c.view(torch.uint8).numpy() if c.dtype == torch.bfloat16 else c.numpy()).cast("B"))


def _cached(name: str, build) -> Path:
    target = checkpoints.cache_dir() / name
    key = name.split("-v")[0]
    with checkpoints._locked(key):
        if target.is_file():
            last_build_seconds.pop(key, None)
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        t0 = time.monotonic()
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        last_build_seconds[key] = time.monotonic() - t0
        for old in checkpoints.cache_dir().glob(f"{key}-v*.safetensors"):
            if old.name != target.name:
                old.unlink(missing_ok=True)
    return target


def _meta(kind: str, seed: int) -> dict[str, str]:
    return {"format": "pt", "generator": "ComfyUI-LinFusion tests/standins.py", "kind": kind,
            "generator_version": str(GENERATOR_VERSION), "seed": str(seed)}


# -- public builders ---------------------------------------------------------------------------
def checkpoint(kind: str, seed: int = 0) -> Path:
    """The cached random full-size checkpoint of `kind` ('sd21' or 'sdxl'), built on first use."""

    def build(tmp: Path) -> None:
        layout = checkpoint_layout(kind)
        check_checkpoint_layout(kind, layout)
        values = _Values(seed)
        write_safetensors(tmp, layout, values.tensor, _meta(kind, seed))

    return _cached(f"{kind}-random-v{GENERATOR_VERSION}-s{seed}.safetensors", build)


def controlnet_sd15(seed: int = 0) -> Path:
    def build(tmp: Path) -> None:
        values = _Values(seed)
        write_safetensors(tmp, controlnet_layout(), values.tensor, _meta("controlnet-sd15", seed))

    return _cached(f"controlnet_sd15-random-v{GENERATOR_VERSION}-s{seed}.safetensors", build)


def lora_sd15(seed: int = 0) -> Path:
    def build(tmp: Path) -> None:
        tensors = lora_tensors(seed)
        layout = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        write_safetensors(tmp, layout, lambda name, _s, _d: tensors[name], _meta("lora-sd15", seed))

    return _cached(f"lora_sd15-random-v{GENERATOR_VERSION}-s{seed}.safetensors", build)


def layout_bytes(layout) -> int:
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in layout.values())


if __name__ == "__main__":  # prebuild: python tests/standins.py [sd21] [sdxl] [controlnet] [lora]
    import sys

    sys.path.insert(0, str(checkpoints.REPO / "tests"))
    sys.path.insert(0, str(checkpoints.REPO / "scripts"))
    import comfy_env

    comfy_env.setup(cpu=True)
    for what in sys.argv[1:] or ["sd21", "sdxl", "controlnet", "lora"]:
        t = time.monotonic()
        path = {"controlnet": controlnet_sd15, "lora": lora_sd15}.get(what, lambda w=what: checkpoint(w))()
        print(what, path, f"{path.stat().st_size / 2**30:.2f} GiB", f"{time.monotonic() - t:.1f} s", flush=True)


# -- a server with stand-ins under the names the example workflows use --------------------------
def example_image(target: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small RGB PNG with structure (gradients and a square) for LoadImage / Canny."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, 128)], -1).astype(np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255 - img[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(target)
    return target


def _link(target: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return
        target.unlink()
    target.symlink_to(source, target_is_directory=source.is_dir())


class WorkflowServer:
    """One real ComfyUI server (started with scripts/run_workflow.py's launcher) whose model
    folders, registered through an extra model paths file, hold stand-ins under the file names
    the example workflows use. Built on first use and shared by the test modules of a session.

    `sdxl`: 'reduced' (default) places the SD1.5 stand-in under the SDXL checkpoint's name (a
    full-size SDXL stand-in costs 6.5 GB on disk, up to 16 GB of server RAM and one to two
    minutes per tiny prompt on 2 CPU cores: see tests/test_workflows.py); 'full' places the
    real-layout SDXL stand-in and LinFusion-XL weights. Environment: LINFUSION_TEST_SDXL=full.
    """

    _shared: WorkflowServer | None = None
    # file name in the workflows -> (models folder, builder); builders take (lf, sdxl mode)
    FILES = {
        "v1-5-pruned-emaonly.safetensors": ("checkpoints", lambda lf, m: checkpoints.sd15_checkpoint()),
        "v2-1_768-ema-pruned.safetensors": ("checkpoints", lambda lf, m: checkpoint("sd21")),
        "sd_xl_base_1.0.safetensors": (
            "checkpoints", lambda lf, m: checkpoint("sdxl") if m == "full" else checkpoints.sd15_checkpoint()),
        "lcm-lora-sdv1-5.safetensors": ("loras", lambda lf, m: lora_sd15()),
        "control_v11p_sd15_canny_fp16.safetensors": ("controlnet", lambda lf, m: controlnet_sd15()),
    }
    INPUT_IMAGE_SIZE = (64, 48)

    def __init__(self, root: Path, lf, sdxl: str | None = None) -> None:
        import sys

        from comfy_env import comfyui_path
        from comfy_process import ComfyUIProcess, offline_flag

        self.root = Path(root)
        self.lf = lf
        self.sdxl = sdxl or os.environ.get("LINFUSION_TEST_SDXL", "reduced")
        if self.sdxl not in ("reduced", "full"):
            raise ValueError(f"LINFUSION_TEST_SDXL={self.sdxl!r}: use 'reduced' or 'full'")
        self.models = self.root / "models"
        self.dirs = {k: self.root / k for k in ("in", "out", "tmp", "user", "hf")}
        self.build_seconds: dict[str, float] = {}
        self.placed: dict[str, Path] = {}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.yaml = self.root / "standin_models.yaml"
        folders = ("checkpoints", "loras", "controlnet", "linfusion")
        self.yaml.write_text("standins:\n" + "".join(
            f"  {f}: {json.dumps(str(self.models / f))}\n" for f in folders))
        for f in folders:
            (self.models / f).mkdir(parents=True, exist_ok=True)
        self.server = ComfyUIProcess(
            python=sys.executable, workdir=self.root / "server", extra_model_paths=[self.yaml], cpu=True,
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(self.dirs["hf"])},
            args=["--output-directory", str(self.dirs["out"]), "--input-directory", str(self.dirs["in"]),
                  "--temp-directory", str(self.dirs["tmp"]), "--user-directory", str(self.dirs["user"]),
                  "--database-url", f"sqlite:///{self.dirs['user'] / 'comfyui.db'}",
                  # previews on, as most users have them: samplers grow to show them (the browser
                  # test checks the layouts leave them room)
                  "--preview-method", "latent2rgb",
                  offline_flag(comfyui_path())])
        self.client = None

    @classmethod
    def shared(cls, root_factory, lf, config) -> WorkflowServer:
        """The session's server: built and started by the first caller, closed at session end."""
        if cls._shared is None:
            srv = cls(root_factory(), lf)
            config.add_cleanup(srv.close)
            srv.place_all()
            srv.start()
            cls._shared = srv
        return cls._shared

    def place_all(self) -> None:
        for name, (folder, build) in self.FILES.items():
            t0 = time.monotonic()
            src = build(self.lf, self.sdxl)
            self.build_seconds[name] = time.monotonic() - t0
            _link(self.models / folder / name, src)
            self.placed[name] = src
        fams = ["sd1", "sd2"] + (["sdxl"] if self.sdxl == "full" else [])
        for fam in fams:  # where 'auto' looks: <linfusion folder>/<official repo name>
            t0 = time.monotonic()
            src = checkpoints.linfusion_weights(self.lf, fam)
            self.build_seconds[f"LinFusion {fam}"] = time.monotonic() - t0
            _link(self.models / "linfusion" / self.lf.FAMILIES[fam].folder_name, src)
        example_image(self.dirs["in"] / "example.png", self.INPUT_IMAGE_SIZE)

    def start(self) -> None:
        import run_workflow

        self.server.start()
        self.client = run_workflow.ComfyClient(self.server.url, timeout=120)
        # A fresh user folder would open the UI's template browser over the canvas.
        self.client.request("/api/settings", {"Comfy.TutorialCompleted": True})

    @property
    def url(self) -> str:
        return self.server.url

    def log_text(self) -> str:
        return self.server.log_text()

    def free(self) -> None:
        """Drop the server's loaded models and cached outputs (RAM for the tests that follow)."""
        if self.client is not None and self.server.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.client.request("/free", {"unload_models": True, "free_memory": True})

    def close(self) -> None:
        self.server.close()
        if WorkflowServer._shared is self:
            WorkflowServer._shared = None
