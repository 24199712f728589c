"""Tiled VAE decode/encode with one output buffer (linfusion/tiling.py, nodes/highres_vae.py's
vae_decode / vae_encode): spans cover every axis with the asked overlap, the blend weights
sum to one everywhere, a pointwise function comes through tiling unchanged, and the VAE path
decodes each pixel once (ComfyUI's own 2-D tiled decode runs three passes)."""

from __future__ import annotations

import itertools

import comfy.model_management
import helpers
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def tl(lf):
    return lf.tiling


def test_spans_cover_with_overlap_and_alignment(tl):
    for size, tile, overlap, align in itertools.product((8, 37, 64, 100, 257, 1024, 2048), (8, 16, 64, 256),
                                                         (0, 2, 8, 16), (1, 8)):
        if overlap >= tile or tile - overlap - (align - 1) <= 0 or size % align or tile % align:
            continue
        sp = tl.spans(size, tile, overlap, align)
        assert sp[0][0] == 0 and sp[-1][1] == size
        assert all(e - s == min(tile, size) for s, e in sp) and all(s % align == 0 for s, _ in sp)
        for (s0, e0), (s1, _) in zip(sp, sp[1:]):
            assert s0 < s1 and e0 - s1 >= overlap, (size, tile, overlap, align, sp)
    with pytest.raises(ValueError, match="overlap"):
        tl.spans(100, 16, 16)


def test_weights_sum_to_one(tl):
    for size, tile, overlap in ((100, 32, 8), (64, 32, 16), (1000, 256, 64), (33, 32, 4)):
        sp = tl.spans(size, tile, overlap)
        total = torch.zeros(size, dtype=torch.float64)
        for (s, e), w in zip(sp, tl.axis_weights(sp, size, overlap, torch.float64)):
            assert (w > 0).all()
            total[s:e] += w
        assert (total - 1).abs().max() < 1e-12


def test_pointwise_functions_come_through_unchanged(tl):
    """x8 nearest upsampling + a nonlinearity (a decoder without context) and 8x8 mean pooling
    (an encoder without context), channels-first and channels-last: tiled == whole within
    fp32 rounding; one call per tile, each tile of the asked size."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 21, 30, generator=g)

    def up(t):
        return torch.tanh(F.interpolate(t, scale_factor=8, mode="nearest")).movedim(1, -1)

    calls = []
    out = tl.tiled_map(lambda t: calls.append(tuple(t.shape)) or up(t), lat, 8, 2, scale=(8, 1), out_dims=(1, 2))
    assert out.shape == (2, 168, 240, 4) and (out - up(lat)).abs().max() < 1e-6
    assert len(calls) == len(tl.spans(21, 8, 2)) * len(tl.spans(30, 8, 2)) and set(calls) == {(2, 4, 8, 8)}
    img = torch.rand(1, 96, 136, 3, generator=g)

    def down(t):
        return F.avg_pool2d(t.movedim(-1, 1), 8)

    out = tl.tiled_map(down, img, 32, 16, scale=(1, 8), dims=(1, 2), out_dims=(2, 3), align=8)
    assert out.shape == (1, 3, 12, 17) and (out - down(img)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="multiples of 8"):
        tl.tiled_map(down, img[:, :95], 32, 16, scale=(1, 8), dims=(1, 2), align=8)


def test_vae_tiles_decoded_once_and_blend_seamlessly(pack, monkeypatch):
    """The high-res nodes' tiled VAE decode against the VAE's whole decode (a narrow SD-layout
    AutoencoderKL with random weights): one decoder call per tile, at the tile's size; the
    blend stays close to the whole decode (the VAE's receptive field crosses tile borders,
    so it cannot be exact) and is no worse than ComfyUI's three-pass tiled decode with the
    same tiles. Encode: one call per tile, as close to the whole encode as ComfyUI's tiled encode. An interrupt between
    tiles stops the work."""
    H = pack.nodes.highres
    vae = helpers.small_vae()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 24, 40, generator=g)
    with torch.inference_mode():  # as ComfyUI runs nodes
        whole = vae.decode(lat)
        decodes = []
        own = vae.first_stage_model.decode
        monkeypatch.setattr(vae.first_stage_model, "decode",
                            lambda z, **k: decodes.append(tuple(z.shape)) or own(z, **k))
        tiled = H.vae_decode(vae, lat, 128)  # 16-latent tiles, 4-latent (32 px = a quarter tile) overlap
        sp = pack.linfusion.tiling.spans
        n = len(sp(24, 16, 4)) * len(sp(40, 16, 4))
        assert len(decodes) == n == 2 * 3 and set(decodes) == {(1, 4, 16, 16)}
        assert tiled.shape == whole.shape == (1, 192, 320, 3)
        decodes.clear()
        comfy_tiled = vae.decode_tiled(lat, tile_x=16, tile_y=16, overlap=4)
        assert len(decodes) > 2 * n  # three passes
        ours, theirs = (tiled - whole).abs().mean().item(), (comfy_tiled - whole).abs().mean().item()
        assert ours <= theirs * 1.25 and (tiled - whole).abs().max() < 0.5, (ours, theirs)
        encodes = []
        own_enc = vae.first_stage_model.encode
        monkeypatch.setattr(vae.first_stage_model, "encode", lambda x: encodes.append(tuple(x.shape)) or own_enc(x))
        img = whole[:, :190, :318]  # not on the 8 px grid: cropped as the VAE's own encode crops
        ref = vae.encode(img)
        encodes.clear()
        enc = H.vae_encode(vae, img, 128)
        assert enc.shape == ref.shape == (1, 4, 23, 39)
        assert len(encodes) == len(sp(184, 128, 32, 8)) * len(sp(312, 128, 32, 8)) == 2 * 4
        theirs = (vae.encode_tiled(img[:, 3:187, 3:315], tile_x=128, tile_y=128, overlap=32) - ref).abs().mean()
        assert (enc - ref).abs().mean() <= theirs * 1.25, ((enc - ref).abs().mean(), theirs)

        def stop(*_a):
            raise comfy.model_management.InterruptProcessingException()

        decodes.clear()
        monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", stop)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            H.vae_decode(vae, lat, 128)
        assert len(decodes) == 1


def test_resize_image_clamps_in_place_without_touching_the_input(pack):
    """The pixel-space upscale between stages: bicubic, clamped to [0, 1] in the new tensor
    (no second full-size copy at 16K); the caller's image never changes, also at the same size."""
    import comfy.utils

    H = pack.nodes.highres
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 24, 40, 3, generator=g)
    before = img.clone()
    want = comfy.utils.common_upscale(img.movedim(-1, 1), 80, 48, "bicubic", "disabled").movedim(1, -1).clamp(0, 1)
    got = H.resize_image(img, 80, 48)
    assert torch.equal(got, want) and torch.equal(img, before) and got.min() >= 0 and got.max() <= 1
    assert (want - comfy.utils.common_upscale(img.movedim(-1, 1), 80, 48, "bicubic", "disabled")
            .movedim(1, -1)).abs().max() > 0  # bicubic overshoots: the clamp matters
    same = H.resize_image(img * 2 - 0.5, 40, 24)
    assert same.shape == img.shape and same.min() >= 0 and torch.equal(img, before)
