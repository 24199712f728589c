"""The High-Res nodes' inputs as tests/test_highres_inputs.py and tests/test_hostile_nodes.py
give them to the nodes' public `execute`: the node ids, a small latent, keyword arguments that
pass every check (override one to break it), and the check that a call is refused before any work.
"""

from __future__ import annotations

import helpers
import pytest
import torch

KIND = "sd15"
ADV = "LinFusionHighResSamplerAdvanced"
SIMPLE = "LinFusionHighResSampler"
SR = "LinFusionSuperResolution"


def latent(batch=1, channels=4, hw=(4, 4)):
    return {"samples": torch.randn(batch, channels, *hw)}


def adv_kw(model, vae=None, **over):
    pos, neg = helpers.conds(KIND)
    kw = dict(model=model, positive=pos, negative=neg, latent_image=latent(), scale_by=2.0, width=0, height=0,
              seed=1, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", method="sdedit",
              upscale_strength=0.0, strength_schedule="linear", upscale_method="latent", cosine_scale_1=3.0,
              cosine_scale_2=1.0, cosine_scale_3=1.0, gaussian_sigma=1.0, anchor_stats="auto", low_memory=False,
              vae_tile_size=2048, vae=vae)
    kw.update(over)
    return kw


def sr_kw(model, vae, **over):
    kw = adv_kw(model, vae, upscale_method="pixel", stages="single", image=torch.rand(1, 32, 32, 3))
    del kw["latent_image"]
    kw.update(over)
    return kw


def refused(node_classes, node, kw, *fragments):
    """Run the node; it must raise a ValueError whose text holds every fragment. Returns it."""
    with torch.inference_mode(), pytest.raises(ValueError) as exc:
        node_classes[node].execute(**kw)
    text = str(exc.value)
    for f in fragments:
        assert f in text, text
    return text
