"""A pure-PyTorch net with every layer kind band parallelism patches (3x3, dilated and stride-2
convs, nearest upsampling, GroupNorm, a LinFusion layer), for worker processes that should
start fast: it imports torch and the pack's `linfusion` only, never ComfyUI."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import linfusion.parallel as par  # noqa: E402
from linfusion.attention import LinFusionAttention  # noqa: E402


class TinyUNet(nn.Module):
    """(B, 4, H, W) -> (B, 4, H, W), H a multiple of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.attn1 = LinFusionAttention(16, 2)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.up = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv_in(x))
        b, c, rows, cols = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # a band's tokens are its rows, as in a SpatialTransformer
        h = h + self.attn1(tokens).transpose(1, 2).reshape(b, c, rows, cols)
        d = self.dilated(self.down(h))
        u = self.up(nn.functional.interpolate(d, scale_factor=2.0, mode="nearest"))
        return self.conv_out(torch.cat([h, u], dim=1))


def tiny(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    net = TinyUNet()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval().requires_grad_(False)


def latent(height: int) -> torch.Tensor:
    return torch.randn(2, 4, height, 8, generator=torch.Generator().manual_seed(height))


def overlap_cases(rank: int, world: int, heights: list[int]) -> dict:
    """Band outputs with and without overlapping halo exchange, per height (numpy)."""
    torch.set_num_threads(1)
    net = tiny()
    out = {}
    for height in heights:
        for overlap in (True, False):
            with par.band_parallel(net, timeout_s=20, overlap=overlap) as bp, torch.no_grad():
                out[(height, overlap)] = bp.forward(net, latent(height)).numpy()
    return out


def die_mid_step(rank: int, world: int) -> str:
    """Rank 1 kills itself (SIGKILL) inside the forward, after the first collective; rank 0 must
    fail with an error, not hang."""
    torch.set_num_threads(1)
    net = tiny()

    def die(*_):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    net.down.register_forward_pre_hook(die)
    with par.band_parallel(net, timeout_s=10) as bp, torch.no_grad():
        bp.forward(net, latent(16))
    return "finished"
