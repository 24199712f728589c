"""Low-memory UNet tricks (linfusion/lowmem.py, linfusion/banded.py, nodes/lowmem.py): banded GroupNorm+SiLU+conv
resnets and skip connections parked off-device give the plain results, and every patch is
undone, also after an interrupt.

The tricks are the reference's 16K-in-24GB settings (LinFusion src/tools.py and the
superres_sdxl_low_w_mem notebook: in-place resnet activations, UNet skip connections kept in
CPU memory); what is checked here is that ours change memory only, not numbers.
"""

from __future__ import annotations

import dataclasses

import comfy.model_management
import comfy.utils
import helpers
import pytest
import torch
import torch.nn.functional as F

TOL = helpers.LOWMEM_TOL


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def lm(lf):
    return lf.lowmem


@pytest.fixture(scope="module")
def bd(lf):
    return lf.banded


@pytest.fixture(scope="module")
def LM(pack):
    return pack.nodes.lowmem


@pytest.mark.parametrize("dilation", [1, 3])
def test_banded_norm_act_conv_equals_full(bd, dilation):
    """conv(silu(group_norm(x))) over bands of 8 rows (halo = the conv's padding) against the
    unbanded layers; also accumulating into an existing tensor."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 37, 21, generator=g) * 3 + 1.5  # mean far from 0: the centred variance pass matters
    norm = torch.nn.GroupNorm(32, 64)
    conv = torch.nn.Conv2d(64, 48, 3, padding=dilation, dilation=dilation)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1, generator=g)
        norm.bias.normal_(0, 0.1, generator=g)
        ref = conv(F.silu(norm(x)))
        x_before = x.clone()
        out = bd.chunked_norm_act_conv(norm, conv, x, band_bytes=1)  # 8-row bands: 5 of them
        assert torch.equal(x, x_before)  # the input is never changed in place
        assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
        base = torch.randn(ref.shape, generator=g)
        acc = bd.chunked_norm_act_conv(norm, conv, x, band_bytes=1, out=base.clone(), accumulate=True)
        assert (acc - (base + ref)).abs().max() <= TOL
        mean, rstd = bd.group_stats(x, 32, norm.eps, rows=8)
        xs = x.view(2, 32, -1)
        assert (mean.flatten() - xs.mean(-1).flatten()).abs().max() < 1e-5
        assert (rstd.flatten() - (xs.var(-1, unbiased=False) + norm.eps).rsqrt().flatten()).abs().max() < 1e-5


def test_top_level_resblocks_by_layout(bd):
    """The two highest levels' ResBlocks: SD1.5/2.1 input blocks 1, 2, 4, 5 and output blocks 6-11;
    SDXL (no attention at level 0) input 1, 2, 4, 5 and output 3-8."""
    for kind, want in (("sd15", ["input_blocks.1", "input_blocks.2", "input_blocks.4", "input_blocks.5"]
                        + [f"output_blocks.{i}" for i in range(6, 12)]),
                       ("sdxl", ["input_blocks.1", "input_blocks.2", "input_blocks.4", "input_blocks.5"]
                        + [f"output_blocks.{i}" for i in range(3, 9)])):
        unet = helpers.base_model(kind, meta=True).diffusion_model
        names = {id(m): n for n, m in unet.named_modules()}
        got = [names[id(m)].rsplit(".", 1)[0] for m in bd.top_level_resblocks(unet, 2)]
        assert got == want, kind
        assert all(bd.chunkable(m) for m in bd.top_level_resblocks(unet, 2))


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_low_memory_unet_equals_plain(lf, lm, bd, LM, kind, monkeypatch):
    """Small layouts with LinFusion, fp32: parking alone is bit-exact (copies); banded resnets,
    token-chunked LinFusion projections and parking together within 1e-5 (GroupNorm's
    normalisation is written out in fp32, see linfusion/banded.py; row subsets of a matmul may
    round differently). The parking hook runs once per input block, the skips come back once
    each, bytes moved = 2x the skips; 2 banded norm-act-convs per ResBlock of the two highest
    levels; each LinFusion layer projects in ceil(tokens / 64) chunks."""
    unet = helpers.linfusion_unet(lf, kind)
    layers = [m for m in unet.modules() if isinstance(m, lf.LinFusionAttention)]
    x, t, ctx, y = helpers.unet_inputs(kind)
    tokens, q_calls = [], []
    for m in layers:
        m.register_forward_pre_hook(lambda _m, a: tokens.append(a[0].shape[1]))
        m.to_q.register_forward_hook(lambda *_: q_calls.append(1))
    skips = []

    def record(h, _opts):  # ComfyUI calls it on each input block's output, the tensor it stores as a skip
        skips.append(h.numel() * h.element_size())
        return h

    with torch.no_grad():
        ref = unet(x, t, ctx, y, transformer_options={"patches": {"input_block_patch": [record]}})
    assert len(skips) == len(unet.input_blocks) and len(tokens) == len(q_calls) == len(layers) > 0
    banded = []
    own = bd.chunked_norm_act_conv
    monkeypatch.setattr(bd, "chunked_norm_act_conv", lambda *a, **k: banded.append(1) or own(*a, **k))
    monkeypatch.setattr(bd, "BAND_BYTES", 1)  # 8-row bands
    monkeypatch.setattr(lm, "PROJECTION_CHUNK_TOKENS", 64)
    n_blocks = len(bd.top_level_resblocks(unet, 2))
    with torch.no_grad():
        mo = {}
        with LM.low_memory_unet(unet, mo, lm.LowMemory(min_chunk_bytes=1 << 40), park_device="cpu") as park:
            park.min_bytes = 0
            monkeypatch.setattr(lm, "PROJECTION_CHUNK_TOKENS", 1 << 30)  # parking alone
            parked_only = unet(x, t, ctx, y, transformer_options=mo["transformer_options"])
            monkeypatch.setattr(lm, "PROJECTION_CHUNK_TOKENS", 64)
        assert torch.equal(parked_only, ref)
        assert park.parked == park.fetched == len(unet.input_blocks) and banded == []
        assert park.bytes_moved == 2 * sum(skips)
        q_calls.clear()
        mo = {}
        deferred, ups = [], []
        own_split = bd.split_input_resblock
        monkeypatch.setattr(bd, "split_input_resblock", lambda *a, **k: deferred.append(1) or own_split(*a, **k))
        own_up = bd.banded_upsample_forward
        monkeypatch.setattr(bd, "banded_upsample_forward", lambda *a, **k: ups.append(1) or own_up(*a, **k))
        with LM.low_memory_unet(unet, mo, lm.LowMemory(min_chunk_bytes=0), park_device="cpu") as park:
            park.min_bytes = 0
            out = unet(x, t, ctx, y, transformer_options=mo["transformer_options"])
            counts = (len(banded), len(deferred), len(ups), len(q_calls), park.parked, park.fetched)
            with pytest.raises(ZeroDivisionError):  # an exception mid-UNet leaves nothing pending
                unet.output_blocks[-2][0].out_layers[3].register_forward_pre_hook(lambda *_: 1 / 0)
                unet(x, t, ctx, y, transformer_options=mo["transformer_options"])
            unet.output_blocks[-2][0].out_layers[3]._forward_pre_hooks.clear()
        n_ups = sum(1 for m in bd.top_level_upsamples(unet, 2) if bd.is_upsample(m))
        assert mo == {}
    # the 6 output blocks of the two highest levels take their skip concatenation in bands
    # (split_input_resblock: in_layers and the skip inside it, out_layers banded as usual);
    # the UNet's out head (GroupNorm, SiLU, conv) is one more banded norm-act-conv
    assert counts[:2] == (2 * n_blocks - 6 + 1, 6) == (15, 6)
    assert counts[2] == n_ups == 2  # output blocks 5 and 8 upsample into levels 1 and 0: banded
    assert counts[3] == sum(-(-n // 64) for n in tokens[:len(layers)]) > 2 * len(layers)
    assert not any("forward" in vars(m) for m in unet.modules())
    assert counts[4] == counts[5] == len(unet.input_blocks)
    assert (out - ref).abs().max() <= TOL


def test_parking_hands_host_copies_to_the_skip_list(lm):
    """What the UNet stores is a separate copy on the park device, allocated through the hook;
    the computation continues on the original; output blocks get an equal tensor back."""
    made = []
    park = lm.SkipParking("cpu", min_bytes=64, allocate=lambda s, d, like: made.append(torch.empty(s, dtype=d))
                          or made[-1])
    h = torch.randn(1, 4, 8, 8)
    small = torch.randn(1, 2, 2, 2)
    stored = park.park(h)
    assert stored is made[0] and stored is not h and torch.equal(stored, h)
    assert park.resume(stored) is h
    assert park.park(small) is small and park.resume(small) is small  # below min_bytes: stays
    _, back = park.fetch(h, stored)
    assert back is not stored and torch.equal(back, h)
    assert park.fetch(h, small)[1] is small
    assert (park.parked, park.fetched, park.bytes_moved) == (1, 1, 2 * h.numel() * 4)


def _state(model, unet):
    return {
        "own_forward": sorted(n for n, m in unet.named_modules() if "forward" in m.__dict__),
        "model_options": repr(model.model_options),
    }


def test_patches_undone_after_sampling_and_interrupt(pack, LM, lm, bd, monkeypatch):
    """Through the high-res sampler with low_memory (parking forced on the CPU, tiny bands): the
    same result as without, the parking hook ran, and nothing stays on the model or in the
    options, after a normal run, an interrupt from the progress bar, and an exception raised
    inside a banded resblock."""
    H = pack.nodes.highres
    model = helpers.small_model("sd15")
    unet = model.model.diffusion_model
    monkeypatch.setattr(LM, "PARK_DEVICE", "cpu")
    monkeypatch.setattr(bd, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(bd, "BAND_BYTES", 1)
    parks = []
    own_park = lm.SkipParking.park
    monkeypatch.setattr(lm.SkipParking, "park", lambda self, h, o=None: parks.append(1) or own_park(self, h, o))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 4, 8, 8, generator=g) * 5
    pos, neg = helpers.conds("sd15")

    def run(low):
        s = H.HighResSettings(seed=7, steps=10, cfg=5.0, sampler_name="euler", scheduler="normal",
                              method="demofusion", upscale_method="latent", low_memory=low)
        with torch.inference_mode():
            return H.run_stages(model, pos, neg, {"samples": base}, None, (128, 128), s)[0]["samples"].clone()

    before = _state(model, unet)
    normal = run(False)
    low = run(True)
    assert _state(model, unet) == before
    assert (low - normal).abs().max() <= 1e-4  # as the cond split's own test: batch 1 vs 2 convs differ slightly
    # 3 steps at stage 1: local + dilated branch, each cond alone; 12 skips parked per UNet call
    assert len(parks) > 0 and len(parks) % len(unet.input_blocks) == 0

    with helpers.progress_hook(helpers.interrupt_at(2)), \
            pytest.raises(comfy.model_management.InterruptProcessingException):
        run(True)
    assert _state(model, unet) == before

    conv = unet.output_blocks[9][0].out_layers[3]
    h = conv.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(
        comfy.model_management.InterruptProcessingException()))
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(True)
    finally:
        h.remove()
    assert _state(model, unet) == before
    assert torch.equal(run(True), low)  # works as before


def test_wrapper_patch_order_parking_and_controlnet(LM, lm):
    """The wrapper's patches per evaluation: ControlNet outputs (added to each skip by the UNet
    before any patch sees it) turn parking off for that call but keep the skip concatenation
    deferral; with no other output patch, parking and deferral share one output patch (parked
    skips stay on the host, their moments measured at parking); with another output patch,
    skips come back first (fetch), the other patch sees device tensors, deferral runs last."""
    park = lm.SkipParking("cpu", min_bytes=0)
    concat = lm.SkipConcat(torch.nn.Module(), [])
    seen = []

    def executor(x, timesteps, context, y, control, transformer_options, **kw):
        seen.append(transformer_options.get("patches", {}))
        return x

    other = object()
    wrapper = LM.low_memory_wrapper(park, concat)
    wrapper(executor, 1, None, None, None, {"output": [torch.zeros(1)]}, {"patches": {"x": [1]}})
    assert seen[-1] == {"x": [1], "output_block_patch": [concat.patch]} and concat.parking is None
    wrapper(executor, 1, None, None, None, {"output": [None]}, {"patches": {"x": [1]}})
    assert seen[-1]["input_block_patch"] == [park.park] and seen[-1]["x"] == [1]
    assert seen[-1]["input_block_patch_after_skip"] == [park.resume]
    assert seen[-1]["output_block_patch"] == [concat.patch] and concat.parking is park and park.moments
    wrapper(executor, 1, None, None, None, None, {"patches": {"output_block_patch": [other]}})
    assert seen[-1]["output_block_patch"] == [park.fetch, other, concat.patch]
    assert concat.parking is None and not park.moments
    LM.low_memory_wrapper(park, None)(executor, 1, None, None, None, None, {})
    assert seen[-1]["output_block_patch"] == [park.fetch] and not park.moments
    LM.low_memory_wrapper(None, None)(executor, 1, None, None, None, None, {"patches": {"x": [1]}})
    assert seen[-1] == {"x": [1]}


def test_low_memory_estimate_while_sampling_and_restored(lf, pack, LM, node_classes, linfusion_dir):
    """With low_memory on a LinFusion model, ComfyUI's memory planning gets the low-memory
    estimate of ONE evaluation (a doubled CFG batch is asked for, one cond runs) while the stage
    samples; Apply LinFusion's estimate is back afterwards, and gone after the call as before.
    A model without LinFusion keeps its own estimate."""
    model = helpers.small_model("sd15")
    unet = model.get_model_object("diffusion_model")
    mods = helpers.lf_modules(lf, "sd15", unet)
    helpers.write_official(linfusion_dir / "LinFusion-1-5", lf, mods, helpers.random_state(lf, mods))
    out = node_classes["ApplyLinFusion"].execute(model, "auto", 0)
    patched = helpers.first_output(out)
    H = pack.nodes.highres
    lf_base = base = model.model
    big = [2, 4, 2048, 1024]  # what ComfyUI asks at 16384x8192 px: cond + uncond
    seen = {True: [], False: []}
    mode = [True]

    def hook(value, total, preview, **_kw):
        seen[mode[0]].append(base.memory_required(big))

    g = torch.Generator().manual_seed(3)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=g) * 5}
    pos, neg = helpers.conds("sd15")
    with helpers.progress_hook(hook):
        for low in (True, False):
            mode[0] = low
            s = H.HighResSettings(seed=7, steps=10, cfg=5.0, sampler_name="euler", scheduler="normal",
                                  method="sdedit", upscale_method="latent", low_memory=low)
            with torch.inference_mode():
                H.run_stages(patched, pos, neg, lat, None, (128, 128), s)
            assert "memory_required" not in vars(base)
        plain = helpers.small_model("sd15")  # no LinFusion: its own estimate, also with low_memory
        base, mode[0] = plain.model, "plain"
        seen["plain"] = []
        with torch.inference_mode():
            H.run_stages(plain, pos, neg, lat, None, (128, 128), dataclasses.replace(s, low_memory=True))
    low_est = lf.memory.low_memory_inference_bytes([1, 4, 2048, 1024], 4, True)
    normal_est = pack.nodes.apply.linfusion_memory_required(lf_base, big)
    # the last progress update of a run comes after sampling, when no wrapper is active
    assert len(seen[True]) == 5 and set(seen[True][:-1]) == {low_est}
    assert len(seen[False]) == 5 and set(seen[False][:-1]) == {normal_est}
    assert len(seen["plain"]) == 5 and set(seen["plain"]) == {plain.model.memory_required(big)}
    assert low_est < normal_est / 4


def test_banded_norm_through_comfy_weight_casting(bd, LM):
    """A GroupNorm of ComfyUI's casting ops (partially loaded / LoRA-patched models keep weights
    elsewhere or in another dtype): the banded path takes gamma/beta through ComfyUI's cast and
    still equals the layer itself."""
    import comfy.ops

    g = torch.Generator().manual_seed(1)
    norm = comfy.ops.manual_cast.GroupNorm(32, 64)
    norm.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(64, generator=g)).half(), requires_grad=False)
    norm.bias = torch.nn.Parameter((0.1 * torch.randn(64, generator=g)).half(), requires_grad=False)
    norm.weight_function = [lambda w: w * 2]  # as a weight patch would
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(1, 64, 24, 16, generator=g)
    with torch.no_grad():
        ref = conv(F.silu(norm(x)))
        out = bd.chunked_norm_act_conv(norm, conv, x, band_bytes=1, affine=LM._affine)
    assert (out - ref).abs().max() <= TOL


def _resblock(channels, out_channels, emb=24):
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    g = torch.Generator().manual_seed(5)
    block = ResBlock(channels, emb, 0.0, out_channels=out_channels, dims=2,
                     operations=comfy.ops.disable_weight_init).eval()
    for prm in block.parameters():
        with torch.no_grad():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.2 + (1.0 if prm.ndim == 1 and prm.shape[0] in
                                                                   (channels, out_channels) else 0.0))
    return block


def test_split_input_resblock_equals_block_on_the_concatenation(bd, LM):
    """block(cat([h, skip]), emb) against the ResBlock itself, fp32, 8-row bands: with the
    moments measured inside and handed in (as parking measures them); 96 channels in 32 groups
    of 3, so the group of channels 63-65 straddles the two parts (the combined moments must be
    exact). The parts list is emptied, the parts themselves are never changed."""
    import comfy.ops  # noqa: F401

    block = _resblock(96, 64)
    assert bd.chunkable(block)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 64, 29, 17, generator=g) * 2 + 3
    skip = torch.randn(2, 32, 29, 17, generator=g) - 1
    emb = torch.randn(2, 24, generator=g)
    with torch.no_grad():
        ref = block(torch.cat([h, skip], 1), emb)
        h0, s0 = h.clone(), skip.clone()
        for moments in (None, [bd.channel_moments(h, 8), bd.channel_moments(skip, 5)]):
            parts = [h, skip]
            out = bd.split_input_resblock(block, parts, emb, moments, band_bytes=1, affine=LM._affine)
            assert parts == [] and torch.equal(h, h0) and torch.equal(skip, s0)
            assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
        mine = h.clone()  # overwrite_first: the output goes into the first part's storage, rows as they finish
        parts = [mine, skip]
        out = bd.split_input_resblock(block, parts, emb, None, band_bytes=1, affine=LM._affine, overwrite_first=True)
        assert out.untyped_storage().data_ptr() == mine.untyped_storage().data_ptr()
        assert (out - ref).abs().max() <= TOL and torch.equal(skip, s0)
        mean, m2 = bd.channel_moments(skip, 4)
        assert (mean - skip.mean((2, 3))).abs().max() < 1e-6
        assert (m2 - (skip - skip.mean((2, 3), keepdim=True)).square().sum((2, 3))).abs().max() < 1e-3


def test_banded_upsample_equals_layer(bd):
    """Nearest x2 + conv over 8-row bands of the output (odd and even band starts, the conv's
    halo) against the Upsample layer; an explicit output_shape other than 2x, and small maps,
    take the layer's own forward."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    g = torch.Generator().manual_seed(7)
    up = Upsample(24, True, dims=2, out_channels=16, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for prm in up.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
        x = torch.randn(1, 24, 19, 11, generator=g)
        ref = up(x)
        fwd = bd.banded_upsample_forward(up, band_bytes=1, min_bytes=0)
        out = fwd(x)
        assert out.shape == ref.shape == (1, 16, 38, 22) and (out - ref).abs().max() <= TOL
        assert (fwd(x, output_shape=(1, 16, 38, 22)) - ref).abs().max() <= TOL
        odd = up(x, output_shape=(1, 16, 37, 22))
        assert torch.equal(fwd(x, output_shape=(1, 16, 37, 22)), odd)  # the layer's own path
        assert torch.equal(bd.banded_upsample_forward(up, band_bytes=1)(x), ref)  # below MIN_CHUNK_BYTES
