"""The VAE at 16K: host memory and decoder work of the high-res nodes' tiled decode
(linfusion/tiling.py, one pass, one output buffer) against ComfyUI's tiled decode (three
passes with differently shaped tiles, averaged), and the device memory of one tile.

    .dev/venv/bin/python bench/vae_tiled.py host [--px 2048] [--tile 512]
    .dev/venv/bin/python bench/vae_tiled.py device [--tiles 512 1024 2048]

host: ComfyUI's VAE class around a narrow SD-layout AutoencoderKL (widths 32..128, random
weights; tests/helpers.small_vae) decodes a px x px image on the CPU, fp32, both ways in
the same process: wall time, decoder calls, peak RSS growth of the call (bench/memory.py),
and that peak in units of the decoded image's bytes (what stays at any VAE width: the
buffers are image-sized).

device: the full SD VAE (ComfyUI's AutoencoderKL with SD's config, 83.7 M parameters) built
on the meta device, one tile decoded / encoded under the tensor-lifetime tracker of
bench/devmem.py, fp16 (attention as a fused kernel): the device peak of the tiled VAE at any
image size is the peak of one tile plus the weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def host(px: int, tile: int) -> None:
    import torch
    from helpers import small_vae

    from bench.memory import measure_once

    pack = sys.modules[str(REPO)]
    H = pack.nodes.highres
    torch.set_num_threads(2)
    vae = small_vae()
    lat = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
    calls = []
    own = vae.first_stage_model.decode
    vae.first_stage_model.decode = lambda z, **k: calls.append(1) or own(z, **k)
    image_bytes = px * px * 3 * 4
    overlap = min(H.VAE_TILE_OVERLAP, tile // 4)
    cases = {
        "ComfyUI VAE.decode_tiled": lambda: vae.decode_tiled(lat, tile_x=tile // 8, tile_y=tile // 8,
                                                             overlap=overlap // 8),
        "pack (linfusion/tiling.py)": lambda: H.vae_decode(vae, lat, tile),
    }
    print(f"SD-layout VAE (narrow, fp32, CPU), {px}x{px} px image ({image_bytes / 2**20:.0f} MiB), "
          f"{tile} px tiles, {overlap} px overlap")
    print("| decode | wall s | decoder calls | peak RSS growth MiB | peak / image bytes |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        H.vae_decode(vae, lat[..., :8, :8], 0)  # warm-up
        for name, fn in cases.items():
            calls.clear()
            seconds, peak = measure_once(fn, torch.device("cpu"))
            print(f"| {name} | {seconds:.1f} | {len(calls)} | {peak / 2**20:.0f} | {peak / image_bytes:.2f} |",
                  flush=True)


def device(tiles) -> None:
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from bench.devmem import LiveBytes, fused_cross_attention

    with torch.device("meta"):
        ae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4).to(torch.float16).eval()
    parts = {"decoder": sum(p.numel() * 2 for n, p in ae.named_parameters() if not n.startswith("encoder")),
             "encoder": sum(p.numel() * 2 for n, p in ae.named_parameters() if n.startswith("encoder"))}
    print("Full SD VAE on meta, fp16, one tile (batch 1); attention as a fused kernel")
    print("| tile px | decode: activations GiB | decode: device peak GiB (with decoder weights) | "
          "encode: activations GiB | encode: device peak GiB | tracker s |")
    print("|---|---|---|---|---|---|")
    for t in tiles:
        t0 = time.perf_counter()
        row = []
        for what, shape, run in (("decoder", (1, 4, t // 8, t // 8), ae.decode), ("encoder", (1, 3, t, t), ae.encode)):
            tracker = LiveBytes("meta")
            with tracker, torch.no_grad(), fused_cross_attention():
                x = torch.empty(shape, dtype=torch.float16, device="meta")
                tracker.reset_peak()
                base = tracker.live
                out = run(x)
                del out
            act = tracker.peak - base
            row += [act, act + parts[what]]
        print(f"| {t} | {row[0] / 2**30:.2f} | {row[1] / 2**30:.2f} | {row[2] / 2**30:.2f} | {row[3] / 2**30:.2f} | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["host", "device"])
    ap.add_argument("--px", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--tiles", type=int, nargs="+", default=[512, 1024, 2048])
    a = ap.parse_args()
    from bench.devmem import _setup

    _setup()
    if a.what == "host":
        host(a.px, a.tile)
    else:
        device(a.tiles)


if __name__ == "__main__":
    main()
