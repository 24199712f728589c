"""One high-res stage band-parallel across processes and machines, launched by torchrun.

Real mode (--checkpoint): a workflow's high-res stage, as ComfyUI's KSampler would run it
(img2img from --latent or a VAE-encoded --image, --steps at --denoise, --cfg, --seed, ComfyUI's
sampler and scheduler), with a checkpoint loaded by ComfyUI's own loader and LinFusion applied by
the pack's Apply LinFusion code (nodes/apply.py). Rank 0 runs ComfyUI's sampler; every UNet call
it makes is sent to the other ranks (latent, timesteps, text embeddings) and split into
horizontal bands by linfusion/parallel/, the code the LinFusion Multi-GPU node runs, so the
result is the single-process one. At the end rank 0 sends the final latent to every rank (each
rank checks it holds the same bytes) and writes --out atomically in ComfyUI's Save Latent format
(Load Latent reads it, and so does --latent of the next stage). Each machine needs the checkpoint
and the LinFusion weights on its own disk; the input latent or image and the prompt only rank 0.

Two machines with 2 GPUs each (run on both; the first machine's address is 10.0.0.1, port
29500 open between them; NCCL needs the same torch and CUDA on both):
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 10.0.0.1 --master-port 29500 \\
        scripts/band_parallel_stage.py --checkpoint sd15.safetensors --linfusion models/linfusion/LinFusion-1-5 \\
        --prompt "a castle" --latent stage_in.safetensors --steps 10 --denoise 0.4 --out stage_out.safetensors
    (the same line with --node-rank 1 on the second machine)
One process, no torchrun: the same arguments give the single-device result to compare with.

Random mode (no --checkpoint): every rank builds the same UNet (SD1.5/SD2.1/SDXL layout through
ComfyUI's own classes, random weights, LinFusion in every attn1) and runs the stage's Euler steps
itself, each UNet evaluation split into bands; with --check, rank 0 then samples the stage alone
and prints the largest difference of the final latents. It checks a setup and measures it:
    torchrun --standalone --nproc-per-node gpu scripts/band_parallel_stage.py --layout sdxl --px 4096 --check
CPU only (gloo), a quick local check:
    torchrun --standalone --nproc-per-node 2 scripts/band_parallel_stage.py --device cpu --channels 32 --px 256 --check
Ranks are ordered by node, then local rank: rank 0 (node 0) owns the top band.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))
PACK_MODULE = "comfyui_linfusion_stage"  # the pack imported as a package under this name (real mode)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    real = ap.add_argument_group("real mode: a workflow's stage")
    real.add_argument("--checkpoint", type=Path, help="a .safetensors checkpoint (SD1.x/SD2.x/SDXL), on every machine")
    real.add_argument("--linfusion", default="auto", help=(
        "LinFusion weights: the path of an official-format folder (config.json + diffusion_pytorch_model.safetensors) "
        "or file, a name under ComfyUI's models/linfusion, or 'auto' (the release of the checkpoint's family from "
        "models/linfusion, downloaded there only when missing)"))
    real.add_argument("--softmax-max-tokens", type=int, default=0, help="Apply LinFusion's hybrid mode (0: off)")
    real.add_argument("--prompt", default="", help="positive prompt, encoded by the checkpoint's CLIP on rank 0")
    real.add_argument("--negative", default="", help="negative prompt")
    source = real.add_mutually_exclusive_group()
    source.add_argument("--latent", type=Path, help=(
        "the stage's input latent (.safetensors: key 'latent', or ComfyUI's Save Latent format), e.g. the previous "
        "stage's output upscaled; read on rank 0"))
    source.add_argument("--image", type=Path, help="the stage's input image (PNG etc.), VAE-encoded on rank 0")
    real.add_argument("--sampler", default="euler", help="ComfyUI sampler name (it runs on rank 0 only)")
    real.add_argument("--scheduler", default="normal", help="ComfyUI scheduler name")
    real.add_argument("--out", type=Path, help="where rank 0 writes the stage's latent (.safetensors)")
    real.add_argument("--extra-model-paths-config", type=Path, help="ComfyUI's extra_model_paths.yaml, for 'auto'")
    rnd = ap.add_argument_group("random mode (no --checkpoint)")
    rnd.add_argument("--layout", choices=("sd15", "sd21", "sdxl"), default="sd15")
    rnd.add_argument("--px", type=int, default=1024, help="image side in pixels (latent = px / 8; a multiple of 64)")
    rnd.add_argument("--channels", type=int, default=None, help="model_channels (default: the full model, 320)")
    ap.add_argument("--steps", type=int, default=3, help="steps of the stage (as KSampler's steps with its denoise)")
    ap.add_argument("--denoise", type=float, default=0.4, help="the stage's strength (as KSampler's denoise)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may take")
    ap.add_argument("--check", action="store_true", help="rank 0 also samples the stage alone and compares")
    a = ap.parse_args(argv)
    if a.checkpoint is not None:
        if a.latent is None and a.image is None:
            ap.error("--checkpoint needs the stage's input: --latent IN.safetensors or --image IN.png")
        if a.out is None:
            ap.error("--checkpoint needs --out OUT.safetensors (where rank 0 writes the stage's latent)")
    else:
        given = [f"--{n}" for n in ("latent", "image", "out") if getattr(a, n) is not None]
        given += ["--prompt"] if a.prompt else []
        if given:
            ap.error(f"{', '.join(given)} belong to the real mode: add --checkpoint PATH")
    if not 0.0 < a.denoise <= 1.0 or a.steps < 1:
        ap.error("--steps must be >= 1 and --denoise in (0, 1]")
    problem = argument_problem(a)
    if problem:
        ap.error(problem)
    return a


MAX_LATENT_ABS = 1e4  # as the high-res nodes (nodes/highres_checks.py): VAE latents stay within about 50
MAX_SAFETENSORS_HEADER = 100 << 20


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a readable .safetensors file (from its first bytes), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = os.fstat(f.fileno()).st_size
            if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
                return "not a .safetensors file (its first 8 bytes are not a safetensors header length)"
            text = f.read(n)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    import json

    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        header = None
    return None if isinstance(header, dict) else "not a .safetensors file (its header is not a JSON object)"


def _latent_problem(path: Path) -> str | None:
    """Why the --latent file cannot be a stage's input (read on rank 0 before anything else)."""
    import torch

    try:
        t = read_latent(path)
    except SystemExit as e:
        return str(e)
    where = f"--latent {path}"
    if t.shape[1] != 4 and bool(t.any()):
        return (f"{where} has {t.shape[1]} channels; SD1.x, SD2.x and SDXL latents have 4: encode the image with "
                "this checkpoint's VAE (the latent comes from another model family)")
    if t.shape[-1] < 2 or t.shape[-2] < 2:
        return (f"{where} is {t.shape[-1]}x{t.shape[-2]} cells ({t.shape[-1] * 8}x{t.shape[-2] * 8} px); the "
                "smallest stage is 2x2 cells (16 px): give the previous stage's latent")
    if not bool(torch.isfinite(t).all()):
        return f"{where} holds NaN or infinite values: re-run the stage that made it"
    peak = float(t.abs().max())
    if peak > MAX_LATENT_ABS:
        return (f"{where} holds values up to {peak:.3g}, far beyond a real latent (|x| <= {MAX_LATENT_ABS:g}): give "
                "a latent made by a VAE or a sampler")
    return None


def _out_problem(out: Path) -> str | None:
    """Why rank 0 could not write --out (checked before any work), or None."""
    if out.is_dir():
        return f"--out {out} is a folder: give a file name (e.g. {out / 'stage.safetensors'})"
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out} cannot be written ({parent} is not a folder this user can write to): choose another path"
    return None


def argument_problem(a: argparse.Namespace) -> str | None:
    """The first argument that cannot work, as a one-line message with the fix; checked on every
    rank before any process group, model or ComfyUI is set up (the input latent and --out only
    on rank 0, the one that reads and writes them)."""
    import math

    rank0 = os.environ.get("RANK", "0") == "0"
    if not (math.isfinite(a.timeout) and 1 <= a.timeout <= 86400):
        return f"--timeout {a.timeout}: give the seconds a collective may take, from 1 to 86400"
    if not math.isfinite(a.cfg) or not 0 <= a.cfg <= 100:
        return f"--cfg {a.cfg}: give a finite guidance scale from 0 to 100"
    if a.softmax_max_tokens < 0 or a.softmax_max_tokens > 1 << 24:
        return f"--softmax-max-tokens {a.softmax_max_tokens}: give 0 (off) up to {1 << 24}"
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device: use --device cpu"
    if a.checkpoint is None:
        if a.px < 64 or a.px % 64:
            return f"--px {a.px}: give the image side in pixels as a multiple of 64 from 64 on (e.g. 1024)"
        if a.channels is not None and (a.channels < 32 or a.channels % 32):
            return (f"--channels {a.channels}: give model_channels as a multiple of 32 from 32 on (GroupNorm), or "
                    "leave it out")
        if not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(os.environ):
            return ("random mode runs under torchrun: torchrun --standalone --nproc-per-node 2 "
                    "scripts/band_parallel_stage.py --device cpu --channels 32 --px 256 --check")
        return None
    if not a.checkpoint.is_file():
        return f"--checkpoint {a.checkpoint}: no such file on {socket.gethostname()}"
    why = _safetensors_problem(a.checkpoint)
    if why:
        return f"--checkpoint {a.checkpoint}: {why}: give a .safetensors checkpoint of SD1.x, SD2.x or SDXL"
    if rank0 and a.latent is not None:
        why = _latent_problem(a.latent)
        if why:
            return why
    if rank0 and a.image is not None and not a.image.is_file():
        return f"--image {a.image}: no such file"
    return _out_problem(a.out) if rank0 else None


# --------------------------------------------------------------------------------------------
# Real mode


def read_latent(path: Path):
    """The stage's input latent (1+, C, H, W) fp32 from a .safetensors file: key 'latent' as it
    is, or ComfyUI's Save Latent format ('latent_tensor'; without 'latent_format_version_0' it is
    scaled by 1/0.18215, as Load Latent does)."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise SystemExit(f"--latent {path}: cannot read it as .safetensors ({e})") from None
    if "latent" in sd:
        t = sd["latent"]
    elif "latent_tensor" in sd:
        t = sd["latent_tensor"] * (1.0 if "latent_format_version_0" in sd else 1.0 / 0.18215)
    else:
        raise SystemExit(f"--latent {path}: no tensor named 'latent' or 'latent_tensor' (it has {sorted(sd)}): "
                         "save the latent under 'latent', or with ComfyUI's Save Latent node")
    t = t.float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise SystemExit(f"--latent {path}: expected a (batch, channels, height, width) latent, got {tuple(t.shape)}")
    return t


def write_latent(path: Path, latent, metadata: dict[str, str]) -> None:
    """ComfyUI's Save Latent format, written to a temporary name beside `path`, then renamed."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        save_file({"latent_tensor": latent.contiguous().cpu(), "latent_format_version_0": torch.tensor([])}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_image(path: Path):
    """(1, H, W, 3) fp32 in [0, 1], as ComfyUI's Load Image gives it."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:
        raise SystemExit(f"--image {path}: cannot read it as an image ({e})") from None
    h, w = arr.shape[:2]
    if h % 8 or w % 8:
        raise SystemExit(f"--image {path}: {w}x{h} px; both sides must be multiples of 8 (the VAE's factor)")
    return torch.from_numpy(arr)[None]


def import_pack():
    """The pack imported as a package (as ComfyUI imports a custom node folder), so nodes/apply.py runs as is."""
    import importlib
    import importlib.util

    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = pack
        spec.loader.exec_module(pack)
        if not hasattr(pack, "comfy_entrypoint"):
            raise SystemExit("this ComfyUI is too old for ComfyUI-LinFusion (see the log line above): update ComfyUI")
    for sub in ("nodes.apply", "nodes.weights_store", "linfusion.parallel"):
        importlib.import_module(f"{PACK_MODULE}.{sub}")
    return sys.modules[PACK_MODULE]


def linfusion_choice(spec: str, weights_store, links: Path) -> str:
    """The Apply LinFusion `weights` entry for --linfusion: 'auto', an entry of the linfusion model
    folders, or a path, offered through a folder of its own holding one link to it (the node only
    reads entries of those folders; this way the user's folder is not scanned)."""
    import folder_paths

    if spec == weights_store.AUTO:
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        name = "weights" + (p.suffix if p.is_file() else "")
        (links / name).symlink_to(p.resolve())
        paths, exts = folder_paths.folder_names_and_paths[weights_store.FOLDER]
        folder_paths.folder_names_and_paths[weights_store.FOLDER] = ([str(links), *paths], exts)
        return name
    if spec in weights_store.choices():
        return spec
    raise SystemExit(f"--linfusion {spec!r}: no such file or folder, and no entry of that name in the linfusion "
                     f"model folders {weights_store.folders()}: give the path of a LinFusion folder (config.json + "
                     "diffusion_pytorch_model.safetensors) or file, a name under models/linfusion, or 'auto'")


class Channel:
    """Rank 0's requests to the other ranks over the process group: a pickled header (operation,
    tensor shapes and dtypes, a text), then the tensors, broadcast on `device`."""

    def __init__(self, device) -> None:
        self.device = device

    def send(self, op: str, tensors: dict | None = None, info: str = "") -> None:
        import torch.distributed as dist

        tensors = {k: v for k, v in (tensors or {}).items() if v is not None}
        dist.broadcast_object_list([(op, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, info)], src=0)
        for v in tensors.values():
            dist.broadcast(v.to(self.device).contiguous(), src=0)

    def receive(self) -> tuple[str, dict, str]:
        import torch
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        op, meta, info = box[0]
        out = {}
        for k, (shape, dtype) in meta.items():
            out[k] = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(out[k], src=0)
        return op, out, info


def band_wrapper(par, channel: Channel, timeout_s: float, stats: dict):
    """Rank 0's DIFFUSION_MODEL wrapper: send the call to the other ranks, run this rank's band."""
    import torch

    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        if control is not None:
            raise par.BandParallelError("band_parallel_stage.py applies no ControlNet, yet the UNet got ControlNet "
                                        "residuals: run the stage in ComfyUI with the LinFusion Multi-GPU node")
        patches = {k: sorted(v) for k, v in transformer_options.items() if k in ("patches", "patches_replace") and v}
        extra = sorted(k for k, v in kwargs.items() if torch.is_tensor(v))
        if patches or extra:
            raise par.BandParallelError(f"band_parallel_stage.py: the model carries patches {patches} or inputs "
                                        f"{extra} that the other ranks would not get")
        channel.send("forward", {"x": x, "timesteps": timesteps, "context": context, "y": y})
        stats["calls"] += 1
        stats["in_forward"] = True
        with par.band_parallel(executor.class_obj, timeout_s=timeout_s) as bp:
            out = bp.forward(lambda xb: executor(xb, timesteps, context, y, control, transformer_options, **kwargs), x)
        stats["in_forward"] = False
        for k, v in bp.bytes_sent.items():
            stats["sent"][k] = stats["sent"].get(k, 0) + v
        return out
    return wrapper


def serve_calls(par, channel: Channel, unet, timeout_s: float):
    """A rank other than 0: run its band of every UNet call rank 0 sends; returns (final latent, calls)."""
    import torch

    calls = 0
    while True:
        op, t, info = channel.receive()
        if op == "forward":
            kw = {"y": t["y"]} if "y" in t else {}
            with par.band_parallel(unet, timeout_s=timeout_s) as bp, torch.no_grad():
                bp.forward(unet, t["x"], t["timesteps"], t["context"], **kw)
            calls += 1
        elif op == "result":
            return t["latent"], calls
        elif op == "error":
            raise SystemExit(f"rank 0 failed, so this rank stops too: {info}")
        else:
            raise RuntimeError(f"unknown request {op!r} from rank 0")


def real_stage(a: argparse.Namespace) -> None:
    import comfy_env

    comfy_env.setup(cpu=a.device == "cpu")
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device: use --device cpu")
        torch.cuda.set_device(local)  # before ComfyUI picks its device
    dev = torch.device("cuda", local) if a.device == "cuda" else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=a.timeout))
    rank = dist.get_rank() if world > 1 else 0
    links = Path(tempfile.mkdtemp(prefix="linfusion-stage-"))
    try:
        _real_stage(a, rank, world, local, dev, links)
    finally:
        for p in links.iterdir():
            p.unlink()
        links.rmdir()
        if world > 1:
            dist.destroy_process_group()


def _real_stage(a, rank: int, world: int, local: int, dev, links: Path) -> None:
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import folder_paths
    import torch
    import torch.distributed as dist
    from comfy.patcher_extension import WrappersMP

    if a.sampler not in comfy.samplers.KSampler.SAMPLERS or a.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise SystemExit(f"--sampler {a.sampler!r} / --scheduler {a.scheduler!r}: pick from "
                         f"{comfy.samplers.KSampler.SAMPLERS} / {comfy.samplers.KSampler.SCHEDULERS}")
    if a.extra_model_paths_config is not None:
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(a.extra_model_paths_config))
    pack = import_pack()
    ws, apply, par = pack.nodes.weights_store, pack.nodes.apply, pack.linfusion.parallel
    t0 = time.perf_counter()

    # Load phase: every rank loads and patches the model; rank 0 also reads the input and encodes
    # the prompts. Errors are collected and shared, so every rank stops with the same message.
    error, model, latent, conds = None, None, None, None

    def load() -> None:
        nonlocal model, latent, conds
        if not a.checkpoint.is_file():
            raise SystemExit(f"--checkpoint {a.checkpoint}: no such file on {socket.gethostname()}")
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(a.checkpoint), output_vae=rank == 0 and a.image is not None, output_clip=rank == 0,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        model, summary = apply.apply_linfusion(model, linfusion_choice(a.linfusion, ws, links), a.softmax_max_tokens)
        if rank != 0:
            comfy.model_management.load_models_gpu([model])  # onto this rank's device, LinFusion layers in place
            return
        print(summary, flush=True)
        if a.latent is not None:
            latent = read_latent(a.latent)
        else:
            if vae is None:
                raise SystemExit(f"--image needs a VAE, and {a.checkpoint} has none: pass --latent instead")
            latent = vae.encode(read_image(a.image)).float().cpu()
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        if clip is None:
            raise SystemExit(f"{a.checkpoint} has no text encoder (CLIP) to encode the prompts with")
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in (a.prompt, a.negative)]

    # 'auto' may download: one rank per machine first, so the others find the files.
    for turn in ((True,), (True, False)) if world > 1 and a.linfusion == ws.AUTO else ((True, False),):
        if (local == 0) in turn and model is None and error is None:
            try:
                load()
            except SystemExit as e:
                error = str(e)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        if world > 1 and len(turn) == 1:
            dist.barrier()
    base = None if model is None else model.model
    me = {"rank": rank, "host": socket.gethostname(), "device": str(dev), "error": error,
          "dtype": None if base is None else str(base.manual_cast_dtype or base.get_dtype()),
          "latent": None if latent is None else tuple(latent.shape)}
    everyone = [me]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, me)
    failed = [f"rank {r['rank']} ({r['host']}): {r['error']}" for r in everyone if r["error"]]
    if failed:
        raise SystemExit("band_parallel_stage.py: " + "; ".join(failed))
    dtypes = {r["dtype"] for r in everyone}
    if len(dtypes) > 1:
        held = [(r["rank"], r["dtype"]) for r in everyone]
        raise SystemExit(f"the ranks hold the UNet in different dtypes ({held}): use the same kind of device on every "
                         "rank")
    shape = everyone[0]["latent"]
    try:
        bands = par.split_rows(shape[-2], world)  # the same answer on every rank
    except par.BandParallelError as e:
        raise SystemExit(f"{e} (latent {shape})") from None
    if rank == 0:
        where = ", ".join(f"{r['host']} {r['device']}" for r in everyone)
        print(f"{a.checkpoint.name}: latent {shape}, {world} ranks ({where}), {dtypes.pop()}, bands {bands.edges}; "
              f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    channel = Channel(dev if dev.type == "cuda" else torch.device("cpu"))
    stats = {"calls": 0, "sent": {}, "in_forward": False}
    if rank == 0:
        m = model
        t1 = time.perf_counter()

        def progress(step, x0, x, total):
            print(f"step {step + 1}/{total}: {time.perf_counter() - t1:.1f} s", flush=True)

        try:
            if world > 1:
                m = model.clone()
                m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "linfusion_band_stage",
                                       band_wrapper(par, channel, a.timeout, stats))
            noise = comfy.sample.prepare_noise(latent, a.seed)
            with torch.no_grad():
                out = comfy.sample.sample(m, noise, a.steps, a.cfg, a.sampler, a.scheduler, conds[0], conds[1], latent,
                                          denoise=a.denoise, seed=a.seed, callback=progress, disable_pbar=True)
        except BaseException as e:
            if world > 1 and not stats["in_forward"]:  # the group is still in step: tell the others
                channel.send("error", info=f"{type(e).__name__}: {e}")
            raise
        took = time.perf_counter() - t1
        out = out.float().cpu()
        if world > 1:
            channel.send("result", {"latent": out})
        calls = stats["calls"]
    else:
        final, calls = serve_calls(par, channel, model.model.diffusion_model, a.timeout)
        out = final.float().cpu()
    digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]
    digests = [digest]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, (rank, digest, calls))
        if rank != 0:
            print(f"rank {rank}: {calls} band calls, final latent sha256 {digest}", flush=True)
        if len({d for _, d, _ in digests}) != 1:
            raise SystemExit(f"the ranks ended with different latents: {digests}")
    if rank != 0:
        return
    sent = {k: f"{v / 2**20:.2f} MiB" for k, v in sorted(stats["sent"].items())}
    print(f"stage: {a.steps} steps ({a.sampler}, {a.scheduler}, denoise {a.denoise}, cfg {a.cfg}) in {took:.2f} s, "
          f"{calls} UNet calls band-parallel on {world} ranks; rank 0 sent {sent}; all {world} ranks hold the same "
          f"final latent (sha256 {digest}), |latent| up to {out.abs().max().item():.3f}", flush=True)
    write_latent(a.out, out, {"checkpoint": a.checkpoint.name, "prompt": a.prompt, "negative": a.negative,
                              "steps": str(a.steps), "denoise": str(a.denoise), "cfg": str(a.cfg),
                              "seed": str(a.seed), "sampler": a.sampler, "scheduler": a.scheduler,
                              "ranks": str(world)})
    print(f"wrote {a.out}", flush=True)
    if a.check and world > 1:
        with torch.no_grad():
            single = comfy.sample.sample(model, noise, a.steps, a.cfg, a.sampler, a.scheduler, conds[0], conds[1],
                                         latent, denoise=a.denoise, seed=a.seed, disable_pbar=True).float().cpu()
        print(f"single process: max abs difference of the final latents: {(out - single).abs().max().item():.3e}",
              flush=True)


# --------------------------------------------------------------------------------------------
# Random mode


def random_stage(a: argparse.Namespace) -> None:
    """The random-weight stage (no --checkpoint): a quick check of a setup, and --check against one process."""
    for p in (REPO, REPO / "tests", REPO / "scripts"):  # tests/helpers builds the layout; never in the real mode
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    import torch
    import torch.distributed as dist
    from band_parallel_check import random_linfusion_model

    model, dev, dtype = random_linfusion_model(a.layout, a.channels, a.device, a.timeout)
    try:
        import comfy.samplers
        import helpers

        import linfusion.parallel as par

        rank, world = dist.get_rank(), dist.get_world_size()
        unet = model.diffusion_model
        model = model.to(dev, dtype).eval().requires_grad_(False)
        lat = a.px // 8
        bands = par.split_rows(lat, world)  # refuses a latent that does not split before any work
        g = torch.Generator().manual_seed(a.seed)
        start = torch.randn(1, 4, lat, lat, generator=g)  # "the previous stage, upscaled"
        noise = torch.randn(1, 4, lat, lat, generator=g)
        ctx = torch.randn(2, 77, helpers.CONTEXT[a.layout], generator=g).to(dev, dtype)  # cond, uncond
        kw = {"y": torch.randn(2, 2816, generator=g).to(dev, dtype)} if a.layout == "sdxl" else {}
        ms = model.model_sampling
        full = int(a.steps / a.denoise)
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", full)[-(a.steps + 1):].to(dev)

        def denoise(x, sigma, forward):
            """CFG-combined x0 prediction of the whole latent; forward(fn, x2) runs the UNet call."""
            x2 = torch.cat([x, x]).to(dtype)
            out = forward(lambda xb: model.apply_model(xb, sigma.expand(2), c_crossattn=ctx, **kw), x2).float()
            cond, uncond = out.chunk(2)
            return uncond + a.cfg * (cond - uncond)

        def stage(forward):
            x = ms.noise_scaling(sigmas[0], noise.to(dev), start.to(dev))
            for i in range(a.steps):
                d = (x - denoise(x, sigmas[i], forward)) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
            return x

        if rank == 0:
            print(f"{a.layout} {a.px} px (latent {lat}), {world} ranks on {dist.get_backend()}, bands {bands.edges}, "
                  f"{a.steps} Euler steps from sigma {float(sigmas[0]):.3f}", flush=True)
        with par.band_parallel(unet, timeout_s=a.timeout) as bp, torch.no_grad():
            t0 = time.perf_counter()
            banded = stage(bp.forward)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
        sent = {k: f"{v / 2**20:.2f} MiB" for k, v in sorted(bp.bytes_sent.items())}
        print(f"rank {rank}: rows {bands.edges[rank]}-{bands.edges[rank + 1]}, stage {took:.2f} s "
              f"({took / a.steps:.2f} s per step), sent {sent}", flush=True)
        dist.barrier()
        if a.check and rank == 0:
            with torch.no_grad():
                t0 = time.perf_counter()
                single = stage(lambda fn, x: fn(x))
                took1 = time.perf_counter() - t0
            err = (banded - single).abs().max().item()
            print(f"single process: stage {took1:.2f} s; max abs difference of the final latents: {err:.3e} "
                  f"(|latent| up to {single.abs().max().item():.2f}, {dtype})", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    a = parse_args(argv)
    (real_stage if a.checkpoint is not None else random_stage)(a)


if __name__ == "__main__":
    main()
