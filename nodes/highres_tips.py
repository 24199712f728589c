"""The high-res nodes' tooltip prose and search words (used by nodes/highres.py's schemas)."""

from __future__ import annotations

from ..linfusion import highres as hr
from .lowmem import LowMemory

# What users type when they look for these nodes (ComfyUI releases whose Schema has search aliases).
SEARCH_ALIASES = ["hires fix", "highres", "upscale", "ultra resolution", "16K", "sdedit", "demofusion"]
TIP_STEPS = ("Steps of the FULL schedule. Each stage runs steps x its strength: rounded up for demofusion and "
             "super-resolution (SDXL pipelines), down for sdedit (diffusers img2img), at least 1 "
             "(reference, 50 steps: 20/15/10/5 for SD1.x, 16/12/8/4 for SDXL over four stages).")
TIP_METHOD = (
    "auto: 'demofusion' for SDXL-like models, 'sdedit' for SD1.x/SD2.x (the LinFusion reference's choices). "
    "sdedit: each stage is plain img2img of the upscaled image (SD1.5 notebook). demofusion: each step also "
    "pulls the state toward the noised upscaled image (skip residual, cosine_scale_1) and mixes in a "
    "global-structure branch run with dilated convolutions on a blurred latent (cosine_scale_2, "
    "cosine_scale_3, gaussian_sigma): two UNet evaluations per step."
)
TIP_STRENGTH = ("Denoising strength of the first upscaling stage, as a noise level: each stage starts at the "
                "noise the reference's 50-step schedule has at that strength (0.32 -> t 301, 0.24 -> 221, 0.16 -> "
                "141, 0.08 -> 61), whatever the scheduler; the scheduler shapes the steps from there down. "
                "0 = the reference value for the method: 0.4 for sdedit (SD1.5 notebook: 0.4, 0.3, 0.2, 0.1), "
                "0.32 for demofusion (SDXL: 0.32, 0.24, 0.16, 0.08). Higher changes the image more.")
TIP_SCHEDULE = ("How the strength falls from stage to stage. auto: notebook for sdedit, linear for demofusion (the "
                "reference's rules). notebook: 0.1 less each stage (0.4, 0.3, 0.2, 0.1; at least "
                f"{hr.MIN_STRENGTH}), the SD1.5 notebook. linear: stage k of n uses strength x (n-k+1)/n (the SDXL "
                "pipeline; 0.32, 0.24, 0.16, 0.08). constant: every stage uses the same strength.")
TIP_SIZE_COND = ("SDXL-like models only: the size the model is told (original and target size). final: the final "
                 "image's size at every stage, as the reference. per stage: each stage's own size (ComfyUI's "
                 "default for plain CLIPTextEncode). Sizes a CLIPTextEncodeSDXL sets are kept.")
TIP_STAGE_IMAGES = ("Images of the stages before the last. preview: shown on this node (temporary files); save: "
                    "written to the output folder as LinFusion/stage_<k>. Each stage is decoded (tiled like the "
                    "upscale), written and dropped before the next, so a 16K run never holds them all; pixel "
                    "upscaling reuses the decode it makes anyway. Needs the VAE.")
TIP_NATIVE = ("The model's native resolution (long side, px) that the dilated branch's dilation counts from: "
              "dilation = ceil(stage long side / this). 0 = the family's: 512 SD1.x, 768 SD2.x (v), 1024 SDXL. "
              "Set it for fine-tunes trained at another size.")
TIP_UPSCALE = ("pixel: decode, bicubic x2, encode between stages (the reference; VAE tiled above vae_tile_size). "
               "latent: bicubic on the latent, no VAE round trip (faster, softer).")
TIP_LOW_MEM = ("Lower peak memory for very large images (the reference's 16K-in-24GB settings and more): positive "
               "and negative are evaluated one after the other instead of as one doubled batch, feed-forward and "
               f"cross-attention run on at least {LowMemory.token_chunks} chunks of tokens, LinFusion reduces "
               "keys/values to their summary before streaming the queries, the resnets, upsamplers and output head "
               "of the two largest levels run in bands of rows without building the decoder's skip "
               "concatenations, and on a GPU the UNet's skip connections wait in CPU memory. Same result (up to "
               "float rounding). "
               "Projected fp16 peak: SD1.5 16384x8192 about 10.6 GiB, SDXL 16384x16384 about 13.9 GiB "
               "(bench/RESULTS.md).")
TIP_TILE = ("Images whose long side exceeds this many pixels are VAE-decoded/encoded in tiles of this size "
            "(the SD1.5 notebook tiles from 4K on with 2048 px tiles), each tile once, blended into one image "
            "buffer. GPU memory grows with the tile (SD VAE decode: ~5 GiB at 2048 px, ~1.3 GiB at 1024 px), "
            "not with the image. 0 = never tile.")

