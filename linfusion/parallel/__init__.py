"""Exact band (patch) parallelism of one UNet forward over a torch.distributed process group.

The latent (B, C, H, W) is cut into horizontal bands of rows, one per rank; every rank runs
the whole UNet on its band, and the result equals the single-process forward (up to float
rounding), unlike DistriFusion's displaced (stale-activation) patch parallelism:

- LinFusion self-attention needs from the other bands only their key/value summary
  (`kv_summary`: [mean phi(k) v^T | mean phi(k)], B x H x dh x (dh+1) numbers): each rank
  all-reduces its summary times its token count together with the count, divides by the
  global count, and applies it to its own queries. ComfyUI's and diffusers' transformer
  blocks flatten (B, C, h, W) to (B, h*W, C), so a band's tokens are exactly its rows.
- Every Conv2d with a kernel taller than one row reads halo rows of its neighbours, sent
  with non-blocking point-to-point ops while the rows that need no halo are computed.
  Strided convs (the UNet's Downsample: k3, stride 2, padding 1) give each output row to
  the rank owning the centre of its receptive field; nearest 2x upsampling (the UNet's
  Upsample: interpolate, then a 3x3 conv) is exact per band as long as band edges are even
  at every level, which `split_rows` guarantees by cutting at multiples of `row_multiple`.
- GroupNorm normalises with global statistics: an all-reduce of per-group sums and sums of
  squares (fp64, built from each band's own fp32 mean and variance, so no cancellation).
- Everything per token or per pixel (linear layers, LayerNorm, cross-attention to the text,
  feed-forward, 1x1 convs, activations) runs on the band alone.
- ControlNet / T2I-Adapter residuals are added per pixel at each level: `split_control` gives
  each rank the rows of its band of every residual (`level_bands`: the latent's band edges
  halved once per level, as the activations' bands are).
- Any other self-attention (a model's own softmax `attn1`, or a LinFusion layer in hybrid
  mode taking its softmax branch) gathers every band's tokens, runs on all of them and keeps
  its own rows (exact, with the memory cost of the full sequence), or refuses if asked to.

Modules are found by type (nn.Conv2d, nn.GroupNorm, LinFusionAttention, modules with
`to_q`/`to_k`/`to_v`), so the same code serves ComfyUI's UNet and a diffusers UNet. Patches
are instance-level `forward` attributes, removed on exit of `band_parallel` (also on error).
Every collective has a timeout; a failure names this rank, the operation and the module.

Layout: `geometry.py` (the row partition, conv halos, the fit checks: pure functions),
`runtime.py` (BandParallel and `band_parallel`: the patched forwards and their collectives),
`workers.py` (`Workers`, the one supervisor of spawned worker processes; `launch`, a group
of spawned processes for tests and benchmarks; `serve`, the loop of a host's persistent
worker). Every public name is importable from here.
"""

from .geometry import (
    BandParallelError,
    Bands,
    ConvPlan,
    Halo,
    check_conv_fit,
    conv_geometry,
    conv_plan,
    conv_settings,
    conv_settings_applied,
    level_bands,
    replaced_forwards,
    split_control,
    split_rows,
)
from .runtime import DEFAULT_TIMEOUT_S, OTHER_ATTENTION, BandParallel, band_parallel
from .workers import WorkerError, Workers, forward_message, host_store, join_group, launch, serve

__all__ = ["DEFAULT_TIMEOUT_S", "OTHER_ATTENTION", "BandParallel", "BandParallelError", "Bands", "ConvPlan", "Halo",
           "WorkerError", "Workers", "band_parallel", "check_conv_fit", "conv_geometry", "conv_plan",
           "conv_settings", "conv_settings_applied", "forward_message", "host_store", "join_group", "launch",
           "level_bands", "replaced_forwards", "serve", "split_control", "split_rows"]
