"""Distilling LinFusion weights for a UNet (reference recipe: arXiv 2409.02097, section 6).

Teacher: the frozen UNet as it is. Student: the same UNet with a LinFusion layer in place of
every self-attention `attn1`. Only the LinFusion layers train (AdamW). For one batch:

    x_t  = sqrt(a_t) x_0 + sqrt(1 - a_t) noise              (a_t: the model's alphas_cumprod)
    loss = w_noise * MSE(student, target)                    target: noise (eps) or v
         + w_out   * MSE(student, teacher)                   the UNet outputs
         + w_feat  * mean over layers MSE(student attn1 out, teacher attn1 out)

with w = (1, 0.5, 0.5) by default, and v = sqrt(a_t) noise - sqrt(1 - a_t) x_0.

Pure PyTorch: the UNet is any module whose self-attention layers sit at the original (LDM)
paths (`input_blocks.1.1.transformer_blocks.0.attn1`, ..., which is ComfyUI's layout), and
`forward(unet, x_t, t, cond)` says how to call it (default: `unet(x_t, t, **cond)`). The
student is the teacher's own module tree with the layers swapped in only while it runs, in a
context that always restores them: the teacher's weights, modules and flags stay untouched
(the layers and the swap: linfusion/distill_student.py).

Checkpoints are folders in the official format (config.json + diffusion_pytorch_model.safetensors,
readable by the pack's loader) plus `training_state.safetensors` (fp32 weights and the AdamW
moments) and `training_state.json` (step, settings, optimizer hyper-parameters). No pickles.
Every random draw of step s comes from a generator seeded with (seed, s), so a resumed run
repeats exactly the draws of an uninterrupted one.

The command line (`python scripts/distill.py ...`: arguments, data pipeline and run in
linfusion/distill_cli.py) reads the checkpoint through ComfyUI (nodes/distill_model.py); this
module never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .distill_student import DistillError, init_student, student_in_place
from .weights import LinFusionWeights, make_config, parse_config, save_weights

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_FORMAT = "linfusion-distill-state/1"
CHECKPOINT_PREFIX = "step-"

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class DistillConfig:
    """Settings of a run. The ones marked (trajectory) must not change when resuming."""

    lr: float = 1e-4
    weight_decay: float = 0.0  # the reference trains with AdamW and no weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    noise_weight: float = 1.0
    output_weight: float = 0.5
    feature_weight: float = 0.5
    prediction: str = "eps"  # (trajectory) "eps" or "v": what the UNet predicts
    batch_size: int = 1  # (trajectory)
    seed: int = 0  # (trajectory)
    precision: str = "fp32"  # "fp32", "bf16", "fp16" (CUDA only) or "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.0  # 0: no clipping
    save_dtype: str = "fp16"  # dtype of the official-format weights written (the releases are fp16)

    TRAJECTORY = ("prediction", "batch_size", "seed")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.prediction not in ("eps", "v"):
            raise DistillError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise DistillError(f"precision must be fp32, bf16, fp16 or auto, not {self.precision!r}")
        if self.save_dtype not in DTYPES:
            raise DistillError(f"save_dtype must be one of {sorted(DTYPES)}, not {self.save_dtype!r}")
        if self.batch_size < 1:
            raise DistillError(f"batch_size must be at least 1, not {self.batch_size}")
        if min(self.noise_weight, self.output_weight, self.feature_weight) < 0:
            raise DistillError("loss weights must be >= 0")
        if self.lr <= 0:
            raise DistillError(f"lr must be > 0, not {self.lr}")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd_alphas_cumprod(timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """alphas_cumprod of the SD 1.x/2.x/XL training schedule ("scaled linear" betas). (T,) fp64."""
    betas = torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def default_forward(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return unet(x, t, **cond)


# -- data -----------------------------------------------------------------------------------
class Dataset(Protocol):
    """What the training loop reads: `len()` examples, and a batch of them by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latents (B, C, h, w) already scaled for the UNet, cond: name -> (B, ...))."""
        ...


def collate_conds(conds: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-example conditionings (each (1, ...) or (...)) into a batch.

    Text embeddings of long prompts come in multiples of 77 tokens; like ComfyUI, shorter ones
    are repeated to the least common multiple of the lengths so they stack.
    """
    out = {}
    for key in conds[0]:
        ts = [c[key] if c[key].ndim > 1 and c[key].shape[0] == 1 else c[key].unsqueeze(0) for c in conds]
        if ts[0].ndim == 3 and len({t.shape[1] for t in ts}) > 1:
            n = math.lcm(*(t.shape[1] for t in ts))
            ts = [t.repeat(1, n // t.shape[1], 1) for t in ts]
        out[key] = torch.cat(ts, dim=0)
    return out


class TensorDataset:
    """Examples held in memory: latents[i] (C, h, w) and conds[i] (name -> tensor)."""

    def __init__(self, latents: Sequence[torch.Tensor], conds: Sequence[dict[str, torch.Tensor]]) -> None:
        if len(latents) != len(conds) or not latents:
            raise DistillError("a dataset needs as many conditionings as latents, and at least one")
        self.latents, self.conds = list(latents), list(conds)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lat = torch.stack([self.latents[i] for i in indices])
        return lat, collate_conds([self.conds[i] for i in indices])


# -- the distiller ---------------------------------------------------------------------------------
class Distiller:
    """Trains LinFusion layers for `unet` against the unet itself (see the module docstring).

    unet: the teacher, on `device`, in any dtype; never modified (its attn1 modules are swapped
    only while the student runs). alphas_cumprod: (T,) of the model's noise schedule
    (default: SD's). init_weights: released LinFusion weights to start from. forward: how to
    call the UNet (default `unet(x_t, t, **cond)`); input_dtype: what x_t and cond are cast to.
    """

    def __init__(
        self,
        unet: nn.Module,
        config: DistillConfig | None = None,
        *,
        init_weights: LinFusionWeights | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        forward: Forward = default_forward,
        device: torch.device | str | None = None,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        self.unet = unet
        self.config = config or DistillConfig()
        self.forward = forward
        # dtype the UNet's inputs are cast to (ComfyUI's manual-cast models compute in another
        # dtype than their stored weights): default, the first floating parameter's
        self.input_dtype = input_dtype or next(p.dtype for p in unet.parameters() if p.is_floating_point())
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.specs, self.paths, self.layers = init_student(unet, init_weights, self.config.seed)
        self.layers.to(self.device)
        ac = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.alphas_cumprod = ac.detach().to(torch.float64).cpu()
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        c = self.config
        self.optimizer = torch.optim.AdamW(self.layers.parameters(), lr=c.lr, betas=c.betas,
                                           weight_decay=c.weight_decay)
        self.step = 0
        self._perm: tuple[int, int, torch.Tensor] | None = None

    # -- precision --------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        p, dev = self.config.precision, self.device.type
        if p == "auto":
            if dev != "cuda":
                return None
            udt = self.input_dtype
            if udt in (torch.float16, torch.bfloat16):
                return udt
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if p == "fp16" and dev != "cuda":
            raise DistillError("fp16 mixed precision needs a CUDA device (use bf16 or fp32 on this device)")
        return None if p == "fp32" else DTYPES[p]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- swapping -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """UNet parameters need no gradients while we train; their flags are restored after."""
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    @contextlib.contextmanager
    def student(self, sink: list | None = None, checkpointing: bool | None = None) -> Iterator[nn.Module]:
        """The UNet with the LinFusion layers in place of every attn1, for the body of the block.

        Outputs of the LinFusion layers are appended to `sink` (call order). Always restores the
        original modules and parameter flags, also on errors.
        """
        ckpt = self.config.gradient_checkpointing if checkpointing is None else checkpointing
        with self._frozen(), student_in_place(self.unet, self.paths, self.layers, sink, ckpt) as unet:
            yield unet

    @contextlib.contextmanager
    def _teacher_hooks(self, sink: list) -> Iterator[None]:
        hooks = [self.unet.get_submodule(p).register_forward_hook(lambda _m, _i, out: sink.append(out))
                 for p in self.paths]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    # -- predictions ------------------------------------------------------------------------------
    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        dt = self.input_dtype
        x = x.to(self.device, dt)
        cond = {k: v.to(self.device, dt) if v.is_floating_point() else v.to(self.device) for k, v in cond.items()}
        with self._autocast():
            return self.forward(self.unet, x, t.to(self.device, torch.float32), cond)

    @torch.no_grad()
    def teacher_predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict, sink: list | None = None) -> torch.Tensor:
        """The original UNet's prediction for noisy latents x (B, C, h, w) at timesteps t (B,)."""
        with self._frozen(), self._teacher_hooks(sink) if sink is not None else contextlib.nullcontext():
            return self._call(x, t, cond)

    def student_predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The student's prediction (no gradients): the UNet with the LinFusion layers."""
        with torch.no_grad(), self.student(checkpointing=False):
            return self._call(x, t, cond)

    # -- the loss ---------------------------------------------------------------------------------
    def noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) for clean latents, noise and integer timesteps t (B,); fp32."""
        a = self.alphas_cumprod[t.cpu()].to(torch.float32).view(-1, *([1] * (latents.ndim - 1)))
        a = a.to(latents.device)
        x0, n = latents.float(), noise.float()
        xt = a.sqrt() * x0 + (1 - a).sqrt() * n
        target = n if self.config.prediction == "eps" else a.sqrt() * n - (1 - a).sqrt() * x0
        return xt, target

    def teacher(self, xt: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor | None, list]:
        """(prediction, attn1 outputs) of the teacher, or (None, []) when no loss term needs it.
        Must run outside `student()`."""
        c = self.config
        if c.output_weight == 0 and c.feature_weight == 0:
            return None, []
        feats: list = []
        return self.teacher_predict(xt, t, cond, feats), feats

    def loss_terms(self, s_pred: torch.Tensor, s_feats: list, target: torch.Tensor,
                   t_pred: torch.Tensor | None, t_feats: list) -> dict[str, torch.Tensor]:
        """total, noise, output and feature losses (fp32 scalars) from the two runs."""
        c = self.config
        out = {"noise": F.mse_loss(s_pred.float(), target.to(s_pred.device))}
        zero = out["noise"].new_zeros(())
        out["output"] = F.mse_loss(s_pred.float(), t_pred.float()) if t_pred is not None else zero
        if t_feats:
            if len(s_feats) != len(t_feats):
                raise DistillError(f"the student ran {len(s_feats)} LinFusion layers but the teacher {len(t_feats)} "
                                   "attn1 layers: the forward function must call the UNet exactly once")
            out["feature"] = sum(F.mse_loss(s.float(), tt.float()) for s, tt in zip(s_feats, t_feats)) / len(t_feats)
        else:
            out["feature"] = zero
        out["total"] = (c.noise_weight * out["noise"] + c.output_weight * out["output"]
                        + c.feature_weight * out["feature"])
        return out

    # -- randomness and data order --------------------------------------------------------------------
    def generator(self, step: int) -> torch.Generator:
        """The generator of step `step`: every draw of that step (noise, timesteps) comes from it."""
        return torch.Generator().manual_seed((self.config.seed % (1 << 31)) * (1 << 32) + step)

    def batch_indices(self, step: int, n: int) -> list[int]:
        """Examples of step `step`: consecutive slices of a fresh permutation per epoch."""
        b = self.config.batch_size
        out = []
        for pos in range(step * b, step * b + b):
            epoch, i = divmod(pos, n)
            if self._perm is None or self._perm[:2] != (epoch, n):
                g = torch.Generator().manual_seed((self.config.seed % (1 << 31)) * (1 << 32) + (1 << 31) + epoch)
                self._perm = (epoch, n, torch.randperm(n, generator=g))
            out.append(int(self._perm[2][i]))
        return out

    def draw(self, step: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise like latents, timesteps (B,)) of step `step`, drawn on the CPU (same on any device)."""
        g = self.generator(step)
        noise = torch.randn(latents.shape, generator=g, dtype=torch.float32)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=g)
        return noise, t

    # -- training -----------------------------------------------------------------------------------
    def train_step(self, latents: torch.Tensor, cond: dict) -> dict[str, float]:
        """One optimizer step on a batch; returns the loss terms as floats and advances `step`."""
        noise, t = self.draw(self.step, latents)
        xt, target = self.noise(latents.to(self.device), noise.to(self.device), t)
        t_pred, t_feats = self.teacher(xt, t, cond)
        sink: list = []
        with self.student(sink):
            s_pred = self._call(xt, t, cond)
            terms = self.loss_terms(s_pred, sink, target, t_pred, t_feats)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise DistillError(f"step {self.step + 1}: the loss is {loss.item()} (diverged). Lower the learning "
                                   "rate, use fp32 or bf16, or resume from an earlier checkpoint")
            self.optimizer.zero_grad(set_to_none=True)
            sink.clear()  # gradient checkpointing re-runs the layers during backward
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            sink.clear()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.layers.parameters(), self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {k: float(terms[k].detach()) for k in ("total", "noise", "output", "feature")}

    @torch.no_grad()
    def evaluate(self, latents: torch.Tensor, cond: dict, noise: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
        """Loss terms on a fixed batch, and `rel_error` = |student - teacher| / |teacher| of the predictions."""
        xt, target = self.noise(latents.to(self.device), noise.to(self.device), t)
        t_pred, t_feats = self.teacher(xt, t, cond)
        if t_pred is None:
            t_pred = self.teacher_predict(xt, t, cond)
        sink: list = []
        with self.student(sink, checkpointing=False):
            s_pred = self._call(xt, t, cond)
        terms = self.loss_terms(s_pred, sink, target, t_pred, t_feats)
        out = {k: float(terms[k]) for k in ("total", "noise", "output", "feature")}
        s, tt = s_pred.float(), t_pred.float()
        out["rel_error"] = float((s - tt).norm() / tt.norm().clamp_min(1e-12))
        return out

    def fit(
        self,
        dataset: Dataset,
        steps: int,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        save_every: int = 0,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, float] | None:
        """Train until `self.step == steps`. With `checkpoint_dir` and `save_every`, writes
        `<checkpoint_dir>/step-NNNNNN` every `save_every` steps (and at the last step).
        Returns the last step's loss terms (None when there was nothing to do)."""
        if len(dataset) == 0:
            raise DistillError("the dataset is empty")
        last = None
        while self.step < steps:
            lat, cond = dataset.batch(self.batch_indices(self.step, len(dataset)))
            last = self.train_step(lat, cond)
            if on_step is not None:
                on_step(self.step, last)
            if checkpoint_dir is not None and save_every > 0 and (self.step % save_every == 0 or self.step == steps):
                self.save_checkpoint(Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{self.step:06d}")
        return last

    # -- saving ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LinFusion weights in the official key format (`i.to_q.weight`, ...), fp32."""
        return {f"{i}.{k}": v.detach() for i, layer in enumerate(self.layers) for k, v in layer.state_dict().items()}

    def save_weights(self, folder: str | os.PathLike, dtype: str | None = None) -> Path:
        """Write config.json + diffusion_pytorch_model.safetensors (each file atomically)."""
        return save_weights(folder, self.specs, self.state_dict(), dtype=DTYPES[dtype or self.config.save_dtype])

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write a resumable checkpoint folder: built beside its target, then renamed into place."""
        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
        try:
            self.save_weights(tmp)
            tensors = {f"param.{k}": v.float().contiguous().cpu() for k, v in self.state_dict().items()}
            opt = self.optimizer.state_dict()
            for pid, st in opt["state"].items():
                for name, v in st.items():
                    if not torch.is_tensor(v):
                        v = torch.tensor(v)
                    tensors[f"optim.{pid}.{name}"] = v.detach().contiguous().cpu()
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
            meta = {
                "format": STATE_FORMAT,
                "step": self.step,
                "config": self.config.to_json(),
                "modules": make_config(self.specs),
                "paths": list(self.paths),
                "param_groups": opt["param_groups"],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": {"kind": "per-step torch.Generator seeded from (seed, step)", "seed": self.config.seed},
            }
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Continue from a checkpoint folder: weights (fp32), optimizer state and step."""
        folder = Path(folder)
        jpath, tpath = folder / STATE_JSON, folder / STATE_TENSORS
        if not jpath.is_file() or not tpath.is_file():
            raise DistillError(f"{folder} is not a distillation checkpoint (it needs {STATE_JSON} and "
                               f"{STATE_TENSORS}); checkpoints are the {CHECKPOINT_PREFIX}NNNNNN folders of a run's "
                               "checkpoints/ folder")
        try:
            meta = json.loads(jpath.read_text())
            tensors = load_file(str(tpath))
        except Exception as exc:
            raise DistillError(f"cannot read the checkpoint {folder}: {exc}. It is damaged: resume from another "
                               "one") from exc
        if meta.get("format") != STATE_FORMAT:
            raise DistillError(f"{jpath}: unknown format {meta.get('format')!r} (expected {STATE_FORMAT})")
        specs = parse_config(meta["modules"])
        if specs != self.specs or list(meta["paths"]) != list(self.paths):
            raise DistillError(f"the checkpoint {folder} was trained for another model layout "
                               f"({len(specs)} layers, widths {sorted({s.dim for s in specs})}); this model has "
                               f"{len(self.specs)} layers, widths {sorted({s.dim for s in self.specs})}")
        saved = meta["config"]
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in DistillConfig.TRAJECTORY
                   if saved.get(k) != getattr(self.config, k)]
        if changed:
            raise DistillError(f"resuming {folder} with different settings ({'; '.join(changed)}) would not continue "
                               "the same run: use the settings of the checkpoint or start a new run")
        params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                prefix = f"{i}."
                layer.load_state_dict({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)},
                                      strict=True)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
            g["lr"] = self.config.lr  # the learning rate may change between sessions
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step in `checkpoint_dir`, or None."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_JSON).is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


