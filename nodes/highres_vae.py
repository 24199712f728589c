"""VAE glue of the high-res stages: tiled decode/encode through the VAE's own functions with
one output buffer (linfusion/tiling.py), the bicubic resizes between stages, and ComfyUI's
inner progress bars muted so the node's one bar does not jump."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import comfy.model_management
import comfy.utils
import torch

from ..linfusion import highres as hr
from ..linfusion import tiling

log = logging.getLogger("ComfyUI-LinFusion")

VAE_TILE_OVERLAP = 64  # px


@contextmanager
def inner_progress_muted():
    """ComfyUI's tiled VAE functions open progress bars of their own; between stages they would
    make the node's bar jump. While this is active, new progress bars only check for an
    interrupt (as the server's hook does) and report nothing."""
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def check_only(*_args, **_kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(check_only if previous is not None else None)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def _check_interrupt(_done: int, _total: int) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def vae_decode(vae, latent: torch.Tensor, tile: int) -> torch.Tensor:
    """Latent (B, C, h, w) -> IMAGE (B, H, W, 3); tiled when the long side exceeds `tile` px:
    each tile decoded once by the VAE's own decode and blended into one image buffer
    (linfusion/tiling.py), which at 16K is 3.2 GB of host memory instead of several."""
    long_px = max(latent.shape[-2:]) * hr.LATENT_GRID
    with inner_progress_muted():
        if tile > 0 and long_px > tile:
            comp = vae.spacial_compression_decode()
            overlap = min(VAE_TILE_OVERLAP, tile // 4)
            return tiling.tiled_map(vae.decode, latent, max(1, tile // comp), overlap // comp, scale=(comp, 1),
                                    dims=(2, 3), out_dims=(1, 2), progress=_check_interrupt)
        return vae.decode(latent)


def vae_encode(vae, image: torch.Tensor, tile: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> latent; tiled (one encode per tile, blended in latent space) when
    the long side exceeds `tile` px. Sides are cropped to the VAE's grid, centred, as its
    own encode does."""
    image = image[..., :3]
    with inner_progress_muted():
        if tile > 0 and max(image.shape[1:3]) > tile:
            comp = vae.spacial_compression_encode()
            h, w = image.shape[1] // comp * comp, image.shape[2] // comp * comp
            dy, dx = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
            image = image[:, dy:dy + h, dx:dx + w]
            tile = max(comp, tile // comp * comp)
            overlap = min(VAE_TILE_OVERLAP, tile // 4) // comp * comp
            return tiling.tiled_map(vae.encode, image, tile, overlap, scale=(1, comp), dims=(1, 2),
                                    out_dims=(2, 3), align=comp, progress=_check_interrupt)
        return vae.encode(image)


def resize_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize of an IMAGE (B, H, W, C), clamped to [0, 1] (bicubic overshoots)."""
    out = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "bicubic", "disabled").movedim(1, -1)
    if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        return out.clamp(0.0, 1.0)  # not a new tensor: the caller's image stays as it is
    return out.clamp_(0.0, 1.0)  # in place: a 16K image is 3.2 GB, a second copy is not needed


def resize_latent(latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return comfy.utils.common_upscale(latent, width, height, "bicubic", "disabled")


def grid_image(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE resized to the nearest multiple of the latent grid (logged when it changes)."""
    h, w = image.shape[1:3]
    gw, gh = hr.round_to_grid(w), hr.round_to_grid(h)
    if (gw, gh) == (w, h):
        return image
    log.info("LinFusion super-resolution: input %dx%d px resized to %dx%d (a multiple of %d px)", w, h, gw, gh,
             hr.LATENT_GRID)
    return resize_image(image, gw, gh)
