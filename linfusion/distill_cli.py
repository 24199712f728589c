"""The distillation command line, pure PyTorch: its arguments, the image folder, the latent cache
and the run.

    python scripts/distill.py --checkpoint model.safetensors --data images/ --out my_linfusion/

Reads a folder of images with a caption beside each (`cat.png` + `cat.txt`), encodes them
once with the checkpoint's own VAE and text encoder (cached in `<out>/.cache/`), trains
LinFusion layers against the checkpoint's UNet (`linfusion.distill`), and writes the weights
in the official format into `<out>/` (config.json + diffusion_pytorch_model.safetensors), the
folder the pack's loader reads. Resumable checkpoints go to `<out>/checkpoints/step-NNNNNN/`.

The model comes from a `load_model` callable returning a `LoadedModel`: the command line
(scripts/distill.py) passes the pack's ComfyUI reader (nodes/distill_model.py); tests pass
small stand-ins, so the data pipeline and the training loop run without a checkpoint file.
Images are read with Pillow (imported where used; every ComfyUI has it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distill import DTYPES, DistillConfig, Distiller, DistillError, Forward, collate_conds, latest_checkpoint
from .patching import IncompatibleModelError, describe_model, model_family
from .weights import CONFIG_NAME, WEIGHTS_NAME, LinFusionWeightsError, load_weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_DIR = ".cache"
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


# -- the dataset folder ------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def scan_dataset(folder: str | os.PathLike) -> list[Example]:
    """Images (any depth, hidden folders skipped) each with the caption of its same-named .txt.

    Raises DistillError for a missing or empty folder, images without a caption, or a caption
    that is not UTF-8 text; the message lists the files concerned.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DistillError(f"--data {root}: no such folder")
    images = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not images:
        raise DistillError(f"--data {root} holds no images ({', '.join(IMAGE_SUFFIXES)}): put images there, each "
                           "with its caption in a .txt file of the same name (cat.png + cat.txt)")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        names = ", ".join(str(p.relative_to(root)) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DistillError(f"{len(missing)} of {len(images)} images in {root} have no caption file: {names}. Write "
                           "each caption into a .txt file beside its image (cat.png -> cat.txt)")
    out = []
    for p in images:
        try:
            caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DistillError(f"cannot read the caption {p.with_suffix('.txt')}: {exc}. Save it as UTF-8 "
                               "text") from exc
        out.append(Example(p, caption))
    return out


def check_images(examples: Sequence[Example]) -> None:
    """Decode every image once, so a broken file stops the run before anything is loaded or written."""
    from PIL import Image

    bad = []
    for ex in examples:
        try:
            with Image.open(ex.image) as im:
                im.load()
        except Exception as exc:  # PIL raises many types for damaged files
            bad.append(f"{ex.image} ({type(exc).__name__}: {exc})")
    if bad:
        raise DistillError(f"{len(bad)} image(s) cannot be read: {'; '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}. Replace or remove them")


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side = resolution, bicubic) and centre-cropped: (res, res, 3) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(resolution, resolution, 3).float() / 255.0


# -- the model ------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What distillation needs from a checkpoint.

    unet: the diffusion UNet (teacher), on `device`. forward(unet, x_t, t, cond) calls it.
    encode_images: (B, H, W, 3) in [0, 1] -> latents (B, C, H/8, W/8) scaled for the UNet.
    encode_text: (caption, width, height) -> cond tensors (name -> (1, ...)), e.g. context, y.
    identity: a string that changes when the checkpoint file changes (names the latent cache).
    The UNet may still be on the CPU: `run` moves it to `device` once the data is encoded.
    """

    unet: nn.Module
    forward: Forward
    alphas_cumprod: torch.Tensor
    prediction: str
    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[str, int, int], dict[str, torch.Tensor]]
    device: torch.device
    identity: str
    input_dtype: torch.dtype | None = None
    release: Callable[[], None] | None = None  # frees the encoders' memory once the data is encoded


# -- the latent cache -----------------------------------------------------------------------------------
class LatentCache:
    """Precomputed latents and text conditionings in one safetensors file, read per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = safe_open(str(path), framework="pt", device="cpu")
        meta = json.loads(self._f.metadata()["linfusion_cache"])
        self.count, self.cond_names = int(meta["count"]), list(meta["cond"])

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lat = torch.stack([self._f.get_tensor(f"latent.{i}") for i in indices])
        conds = [{n: self._f.get_tensor(f"{n}.{i}") for n in self.cond_names} for i in indices]
        return lat, collate_conds(conds)


def cache_key(examples: Sequence[Example], identity: str, resolution: int) -> str:
    h = hashlib.sha256(f"v1|{identity}|{resolution}".encode())
    for ex in examples:
        st = ex.image.stat()
        h.update(f"|{ex.image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{ex.caption}".encode())
    return h.hexdigest()[:20]


def precompute(examples: Sequence[Example], model: LoadedModel, resolution: int, cache_dir: Path,
               progress: bool = True) -> LatentCache:
    """Encode every example once (VAE latents, text conditionings) into `cache_dir`; reused while
    the images, captions, checkpoint and resolution are unchanged. Written atomically."""
    from tqdm import tqdm

    target = cache_dir / f"latents-{cache_key(examples, model.identity, resolution)}.safetensors"
    if target.is_file():
        return LatentCache(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    names: list[str] | None = None
    for i, ex in enumerate(tqdm(examples, desc="encoding images and captions", unit="img", disable=not progress)):
        tensors[f"latent.{i}"] = model.encode_images(load_image(ex.image, resolution)[None])[0].contiguous()
        cond = model.encode_text(ex.caption, resolution, resolution)
        if names is None:
            names = sorted(cond)
        for n in names:
            tensors[f"{n}.{i}"] = cond[n][0].contiguous()
    meta = {"count": len(examples), "cond": names, "resolution": resolution,
            "images": [str(ex.image) for ex in examples]}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"linfusion_cache": json.dumps(meta)})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return LatentCache(target)


# -- the run ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/distill.py",
        description="Distill LinFusion weights for an SD1.x / SD2.x / SDXL checkpoint (teacher: its own UNet).",
    )
    p.add_argument("--checkpoint", required=True, help="the model: a full .safetensors checkpoint (UNet, text "
                   "encoder, VAE), e.g. ComfyUI/models/checkpoints/myModel.safetensors")
    p.add_argument("--data", required=True, help="folder of images, each with its caption in a .txt file of the "
                   "same name (cat.png + cat.txt)")
    p.add_argument("--out", required=True, help="output folder: the weights (config.json + "
                   "diffusion_pytorch_model.safetensors), checkpoints/ and the .cache/ of encoded data")
    p.add_argument("--init", help="LinFusion weights to start from (a folder or .safetensors), e.g. the release "
                   "for the model's family; default: the model's own attention projections")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (default 2000)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4, the reference's)")
    p.add_argument("--resolution", type=int, help="training size in pixels, square, a multiple of 64 (default: "
                   "512 for SD1.x, 768 for SD2.x, 1024 for SDXL)")
    p.add_argument("--save-every", type=int, default=500, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", nargs="?", const="latest", help="continue a run: a checkpoint folder, or no value "
                   "for the latest one in <out>/checkpoints")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: mixed precision in the UNet's half dtype on CUDA, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                   "pass: less memory, about a third more time")
    p.add_argument("--noise-weight", type=float, default=1.0, help="weight of MSE(student, noise target)")
    p.add_argument("--output-weight", type=float, default=0.5,
                   help="weight of MSE(student, teacher) of the UNet outputs")
    p.add_argument("--feature-weight", type=float, default=0.5, help="weight of the mean over layers of "
                   "MSE(student attn1 output, teacher attn1 output)")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", choices=sorted(DTYPES), default="fp16",
                   help="dtype of the written weights (fp16 like the releases; checkpoints keep fp32 for resuming)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--comfyui", help="ComfyUI folder to import (default: the one this pack is installed in)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_out(out: Path, resume: str | None) -> None:
    if resume is not None:
        return
    taken = [p for p in (out / WEIGHTS_NAME, out / CHECKPOINTS_DIR) if p.exists()]
    if taken:
        raise DistillError(f"--out {out} already holds a run ({', '.join(p.name for p in taken)}): pass --resume to "
                           "continue it, or choose another --out")


def _write_final(distiller: Distiller, out: Path) -> Path:
    """config.json + weights into `out`, built in a hidden folder first so both files are whole."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final.", suffix=".part"))
    try:
        distiller.save_weights(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(args: argparse.Namespace, load_model: Callable[..., LoadedModel]) -> Path:
    """Distill as the command line asks. `load_model(checkpoint, device, comfyui)` reads the model
    (the command line's: nodes/distill_model.py's `load_with_comfyui`). Every check that can fail
    runs before the first write."""
    out = Path(args.out)
    for name in ("steps", "batch_size", "save_every"):
        if getattr(args, name) < (0 if name == "save_every" else 1):
            raise DistillError(f"--{name.replace('_', '-')} must be at least {0 if name == 'save_every' else 1}")
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 64):
        raise DistillError(f"--resolution {args.resolution}: use a multiple of 64 (the UNet halves the latent 3 times)")
    _check_out(out, args.resume)
    examples = scan_dataset(args.data)
    check_images(examples)
    init = load_weights(args.init) if args.init else None
    model = load_model(args.checkpoint, args.device, getattr(args, "comfyui", None))
    fam = model_family(model.unet)
    if fam is None:
        raise IncompatibleModelError(f"{Path(args.checkpoint).name} is {describe_model(model.unet)}; LinFusion "
                                     "distillation supports SD1.x, SD2.x and SDXL checkpoints")
    config = DistillConfig(
        lr=args.lr, noise_weight=args.noise_weight, output_weight=args.output_weight,
        feature_weight=args.feature_weight, prediction=model.prediction, batch_size=args.batch_size,
        seed=args.seed, precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        max_grad_norm=args.max_grad_norm, save_dtype=args.save_dtype,
    )
    distiller = Distiller(model.unet, config, init_weights=init, alphas_cumprod=model.alphas_cumprod,
                          forward=model.forward, device=model.device, input_dtype=model.input_dtype)
    resume_from = None
    if args.resume is not None:
        resume_from = latest_checkpoint(out / CHECKPOINTS_DIR) if args.resume == "latest" else Path(args.resume)
        if resume_from is None:
            raise DistillError(f"--resume: {out / CHECKPOINTS_DIR} holds no checkpoint to continue from")
        distiller.load_checkpoint(resume_from)
    resolution = args.resolution or DEFAULT_RESOLUTION[fam.key]
    data = precompute(examples, model, resolution, out / CACHE_DIR, progress=not args.quiet)
    model.encode_images = model.encode_text = None  # the text encoder and VAE are no longer needed
    if model.release is not None:
        model.release()
    model.unet.to(model.device)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=min(distiller.step, args.steps), desc=f"distilling {fam.label} LinFusion",
               unit="step", disable=args.quiet, dynamic_ncols=True)

    def on_step(step: int, terms: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{terms['total']:.4f}", noise=f"{terms['noise']:.4f}", out=f"{terms['output']:.4f}",
                        attn=f"{terms['feature']:.4f}", refresh=False)

    try:
        distiller.fit(data, args.steps, checkpoint_dir=out / CHECKPOINTS_DIR if args.save_every else None,
                      save_every=args.save_every, on_step=on_step)
    finally:
        bar.close()
    _write_final(distiller, out)
    if not args.quiet:
        print(f"LinFusion weights for {fam.label} written to {out} ({distiller.step} steps). Copy the folder into "
              "ComfyUI/models/linfusion/ and pick it in Apply LinFusion.", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None, load_model: Callable[..., LoadedModel]) -> int:
    """The command line: parse `argv`, run; a one-line error and exit code 2 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        run(args, load_model)
    except (DistillError, IncompatibleModelError, LinFusionWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
