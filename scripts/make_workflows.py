"""Builds workflows/*.json (ComfyUI UI format) from compact specs, using a running server's
/object_info for widget order. Dev tool: edit the specs here, then
    python scripts/make_workflows.py http://127.0.0.1:8188   (a running ComfyUI with this pack)
and review the diff of workflows/; tests/test_workflows.py checks the result."""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import run_workflow as rw  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "workflows"

HF = "https://huggingface.co"
MODELS = {
    "v1-5-pruned-emaonly.safetensors": (
        "checkpoints", f"{HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"),
    "v2-1_768-ema-pruned.safetensors": (
        "checkpoints", f"{HF}/stabilityai/stable-diffusion-2-1/resolve/main/v2-1_768-ema-pruned.safetensors"),
    "sd_xl_base_1.0.safetensors": (
        "checkpoints", f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "lcm-lora-sdv1-5.safetensors": (
        "loras", f"{HF}/latent-consistency/lcm-lora-sdv1-5/resolve/main/pytorch_lora_weights.safetensors"),
    "control_v11p_sd15_canny_fp16.safetensors": (
        "controlnet",
        f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11p_sd15_canny_fp16.safetensors"),
}
LINFUSION = {
    "sd15": "LinFusion-1-5 (https://huggingface.co/Yuanshi/LinFusion-1-5, 198 MB)",
    "sd21": "LinFusion-2-1 (https://huggingface.co/Yuanshi/LinFusion-2-1, 198 MB)",
    "sdxl": "LinFusion-XL (https://huggingface.co/Yuanshi/LinFusion-XL, 871 MB)",
}


def linfusion_text(fam: str) -> str:
    return (f"LinFusion weights: 'auto' downloads {LINFUSION[fam]} into models/linfusion/ on the first run. Offline: "
            f"put config.json and diffusion_pytorch_model.safetensors from that page into "
            f"models/linfusion/{LINFUSION[fam].split()[0]}/.")


def files_text(*names: str) -> str:
    lines = ["Files:"]
    for n in names:
        folder, url = MODELS[n]
        lines.append(f"- models/{folder}/{n}\n  from {url}" + (f"\n  (save it as {n})" if not url.endswith(n) else ""))
    return "\n".join(lines)


class G:
    def __init__(self, oi: dict) -> None:
        self.oi = oi
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, nid: int, kind: str, pos, size, title: str | None = None, widgets: dict | None = None,
             links: dict | None = None, color: str | None = None):
        widgets, links = widgets or {}, links or {}
        if kind == "Note":
            n = {"id": nid, "type": "Note", "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": 0,
                 "inputs": [], "outputs": [], "properties": {}, "widgets_values": [widgets["text"]],
                 "color": "#432", "bgcolor": "#653"}
            if title:
                n["title"] = title
            self.nodes.append(n)
            return n
        info = self.oi[kind]
        sockets, widget_entries, wvals = [], [], []
        used = set()
        for name, spec, required in rw.input_specs(info):
            if rw.is_widget(spec):
                if name not in widgets:
                    d = rw.spec_options(spec).get("default")
                    if d is None:
                        raise KeyError(f"{kind}.{name} needs a value")
                    widgets[name] = d
                used.add(name)
                wvals.append(widgets[name])
                extra = rw.extra_widget_count(name, spec)
                widget_entries.append({"localized_name": name, "name": name, "type": rw.spec_type(spec),
                                       "widget": {"name": name}, "link": None})
                if rw.spec_type(spec) == "INT" and extra:
                    wvals.append("fixed")
                elif rw.spec_type(spec) == "COMBO" and extra:
                    wvals.append("image")
                    widget_entries.append({"localized_name": "choose file to upload", "name": "upload",
                                           "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None})
            else:
                entry = {"localized_name": name, "name": name, "type": rw.spec_type(spec), "link": None}
                if not required:
                    entry["shape"] = 7
                sockets.append(entry)
        inputs = sockets + widget_entries  # the UI's order: sockets, then widgets
        for slot, entry in enumerate(inputs):
            if entry["name"] in links:
                entry["link"] = self._link(links[entry["name"]], nid, slot, entry["type"])
                used.add(entry["name"])
        unknown = (set(widgets) | set(links)) - used
        if unknown:
            raise KeyError(f"{kind}: unknown inputs {unknown}")
        outputs = [{"localized_name": oname, "name": oname, "type": otype, "links": []}
                   for otype, oname in zip(info["output"], info.get("output_name") or info["output"])]
        props = {"Node name for S&R": kind}
        models = [{"name": v, "url": MODELS[v][1], "directory": MODELS[v][0]} for v in widgets.values()
                  if isinstance(v, str) and v in MODELS]
        if models:
            props["models"] = models
        n = {"id": nid, "type": kind, "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": 0,
             "inputs": inputs, "outputs": outputs, "properties": props, "widgets_values": wvals}
        if title:
            n["title"] = title
        if color:
            n["color"], n["bgcolor"] = color
        self.nodes.append(n)
        return n

    def _link(self, src, target: int, slot: int, typ: str) -> int:
        lid = len(self.links) + 1
        self.links.append([lid, src[0], src[1], target, slot, typ])
        return lid

    def group(self, title: str, bounding, color: str = "#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    def finish(self) -> dict:
        by_id = {n["id"]: n for n in self.nodes}
        for lid, o, os_, _t, _ts, typ in self.links:
            src = by_id[o]
            if src["type"] != "Note":
                out = src["outputs"][os_]
                assert out["type"] == typ or typ in ("*",) or out["type"] == "*", (src["type"], out, typ)
                out["links"].append(lid)
                out["slot_index"] = os_
        for n in self.nodes:
            for o in n.get("outputs", []):
                if not o["links"]:
                    o["links"] = None
        # execution order (topological), as the UI stores it
        deps = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        order, done = [], set()
        while len(order) < len(self.nodes):
            for n in sorted(self.nodes, key=lambda n: n["id"]):
                if n["id"] not in done and deps[n["id"]] <= done:
                    order.append(n["id"])
                    done.add(n["id"])
        for i, nid in enumerate(order):
            by_id[nid]["order"] = i
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-linfusion/" + self.name)),
            "revision": 0,
            "last_node_id": max(by_id),
            "last_link_id": len(self.links),
            "nodes": sorted(self.nodes, key=lambda n: n["id"]),
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}},
            "version": 0.4,
        }


def text_encoders(g: G, clip, pos_text: str, neg_text: str, x: int, y: int, pid=3, nid=4):
    g.node(pid, "CLIPTextEncode", (x, y), (420, 160), "Positive prompt", {"text": pos_text}, {"clip": clip},
           color=("#232", "#353"))
    g.node(nid, "CLIPTextEncode", (x, y + 200), (420, 130), "Negative prompt", {"text": neg_text}, {"clip": clip},
           color=("#322", "#533"))


def sdxl_encoders(g: G, clip, pos_text: str, x: int, y: int, pid=3, nid=4):
    """SDXL as the reference runs it: no negative prompt, so the negative conditioning is zeros
    (diffusers' force_zeros_for_empty_prompt): ConditioningZeroOut of the positive."""
    g.node(pid, "CLIPTextEncode", (x, y), (420, 160), "Positive prompt", {"text": pos_text}, {"clip": clip},
           color=("#232", "#353"))
    g.node(nid, "ConditioningZeroOut", (x, y + 200), (320, 60), "Negative: zeros (as the reference)", {},
           {"conditioning": (pid, 0)}, color=("#322", "#533"))


NEG = "blurry, low quality, lowres, deformed, watermark, text, signature"


def wf_sd15_2k(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sd15_linfusion_512_to_2k"
    g.node(1, "CheckpointLoaderSimple", (40, 300), (340, 100), None, {"ckpt_name": "v1-5-pruned-emaonly.safetensors"})
    g.node(2, "ApplyLinFusion", (40, 460), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (1, 0)})
    text_encoders(g, (1, 1), "a cozy alpine village at dusk, warm lights in the windows, snow-covered roofs, "
                  "mountains in the background, highly detailed photograph", NEG, 420, 120)
    g.node(5, "EmptyLatentImage", (420, 520), (320, 110), "Base size (512 x 512)", {"width": 512, "height": 512, "batch_size": 1})
    g.node(6, "KSampler", (880, 120), (320, 270), "Base image (512 px)",
           {"seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)})
    g.node(7, "VAEDecode", (880, 440), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (880, 540), (320, 360), "Save 512 px", {"filename_prefix": "LinFusion/sd15_512"}, {"images": (7, 0)})
    g.node(9, "LinFusionHighResSampler", (1260, 120), (340, 300), "x4 upscale (512 -> 2048 px)",
           {"scale_by": 4.0, "seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal"},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (6, 0), "vae": (1, 2)})
    g.node(10, "VAEDecode", (1260, 470), (220, 50), None, {}, {"samples": (9, 0), "vae": (1, 2)})
    g.node(11, "SaveImage", (1640, 120), (520, 560), "Save 2048 px", {"filename_prefix": "LinFusion/sd15_2k"}, {"images": (10, 0)})
    g.node(12, "Note", (40, 40), (340, 220), "About this workflow", {"text": (
        "SD1.5 + LinFusion: text-to-image at 512 x 512, then x4 to 2048 x 2048.\n\n"
        "Apply LinFusion replaces every self-attention layer of the UNet with LinFusion's linear attention. "
        "The LinFusion High-Res Sampler then doubles the image twice (512 -> 1024 -> 2048), re-denoising each stage "
        "(progressive SDEdit, strengths 0.4 and 0.3 of a 50-step schedule, the reference notebook's table: 20 + 15 "
        "steps, starting at timesteps 381 and 281), as the LinFusion "
        "reference does for SD1.5. The 512 px base is saved too.\n\n"
        + files_text("v1-5-pruned-emaonly.safetensors") + "\n" + linfusion_text("sd15") + "\n\n"
        "Headless: python scripts/run_workflow.py workflows/sd15_linfusion_512_to_2k.json")})
    return g.name, g.finish()


def wf_sd15_16k(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sd15_linfusion_16k"
    g.node(1, "CheckpointLoaderSimple", (40, 340), (340, 100), None, {"ckpt_name": "v1-5-pruned-emaonly.safetensors"})
    g.node(2, "ApplyLinFusion", (40, 500), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (1, 0)})
    text_encoders(g, (1, 1), "A photo of the Milky Way galaxy", "", 420, 120)
    g.node(5, "EmptyLatentImage", (420, 520), (320, 110), "Base size (1024 x 512)", {"width": 1024, "height": 512, "batch_size": 1})
    g.node(6, "KSampler", (880, 120), (320, 270), "Base image (1024 x 512)",
           {"seed": 3, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)})
    g.node(7, "VAEDecode", (880, 440), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (880, 540), (420, 300), "Save 1024 x 512", {"filename_prefix": "LinFusion/sd15_1k"}, {"images": (7, 0)})
    g.node(9, "LinFusionHighResSamplerAdvanced", (1340, 120), (360, 620), "x16 in 4 stages (-> 16384 x 8192)",
           {"scale_by": 16.0, "width": 0, "height": 0, "seed": 3, "steps": 50, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "method": "sdedit", "upscale_strength": 0.4, "strength_schedule": "auto",
            "upscale_method": "pixel", "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0,
            "gaussian_sigma": 0.8, "anchor_stats": "auto", "low_memory": True, "vae_tile_size": 2048},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (6, 0), "vae": (1, 2)})
    g.node(10, "VAEDecodeTiled", (1740, 120), (300, 150), None,
           {"tile_size": 2048, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}, {"samples": (9, 0), "vae": (1, 2)})
    g.node(11, "SaveImage", (1740, 320), (520, 320), "Save 16384 x 8192", {"filename_prefix": "LinFusion/sd15_16k"},
           {"images": (10, 0)})
    g.node(12, "Note", (40, 40), (340, 260), "About this workflow", {"text": (
        "SD1.5 ultra resolution: 1024 x 512 base -> 16384 x 8192 (16K) in four x2 stages, the schedule of the "
        "LinFusion reference notebook (examples/inference/ultra_text2image_w_sdedit.ipynb): img2img strengths "
        "0.4, 0.3, 0.2, 0.1 (strength_schedule auto = the notebook's table for sdedit) of a 50-step schedule "
        "(20/15/10/5 steps from timesteps 381/281/181/81) at 2048 x 1024, 4096 x 2048, 8192 x 4096 "
        "and 16384 x 8192, the same seed at every stage, VAE tiled in 2048 px tiles from 4K on. Low-memory mode "
        "evaluates positive and negative one after the other and chunks the feed-forward layers.\n\n"
        "Expect many minutes on a large GPU (the reference needs 80 GB for the last stage; low-memory mode "
        "and tiled VAE bring it down); saving the 134-megapixel PNG alone takes a while.\n\n"
        + files_text("v1-5-pruned-emaonly.safetensors") + "\n" + linfusion_text("sd15") + "\n\n"
        "Try it small first: python scripts/run_workflow.py workflows/sd15_linfusion_16k.json --scale 1/8")})
    return g.name, g.finish()


def wf_sdxl_4k(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sdxl_linfusion_1024_to_4k"
    g.node(1, "CheckpointLoaderSimple", (40, 340), (340, 100), None, {"ckpt_name": "sd_xl_base_1.0.safetensors"})
    g.node(2, "ApplyLinFusion", (40, 500), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (1, 0)})
    sdxl_encoders(g, (1, 1), "An astronaut floating in space. Beautiful view of the stars and the universe in the "
                  "background.", 420, 120)
    g.node(5, "EmptyLatentImage", (420, 520), (320, 110), "Base size (1024 x 1024)",
           {"width": 1024, "height": 1024, "batch_size": 1})
    g.node(6, "KSampler", (880, 120), (320, 270), "Base image (1024 px)",
           {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)})
    g.node(7, "VAEDecode", (880, 440), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (880, 540), (380, 420), "Save 1024 px", {"filename_prefix": "LinFusion/sdxl_1k"}, {"images": (7, 0)})
    g.node(9, "LinFusionHighResSamplerAdvanced", (1300, 120), (360, 620), "x4, DemoFusion-style (-> 4096 px)",
           {"scale_by": 4.0, "width": 0, "height": 0, "seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "method": "demofusion", "upscale_strength": 0.32, "strength_schedule": "auto",
            "upscale_method": "pixel", "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0,
            "gaussian_sigma": 0.8, "anchor_stats": "auto", "low_memory": False, "vae_tile_size": 2048},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (6, 0), "vae": (1, 2)})
    g.node(10, "VAEDecodeTiled", (1700, 120), (300, 150), None,
           {"tile_size": 1024, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}, {"samples": (9, 0), "vae": (1, 2)})
    g.node(11, "SaveImage", (1700, 320), (520, 560), "Save 4096 px", {"filename_prefix": "LinFusion/sdxl_4k"}, {"images": (10, 0)})
    g.node(12, "Note", (40, 40), (340, 260), "About this workflow", {"text": (
        "SDXL + LinFusion: 1024 x 1024 base, then x4 to 4096 x 4096 with DemoFusion-style refinement "
        "(LinFusion's SDXL high-res pipeline, examples/inference/ultra_text2image_sdxl.ipynb): two x2 stages, "
        "strengths 0.32 and 0.16 of a 50-step schedule (16 + 8 steps from timesteps 301 and 141, dilation 2 and "
        "4); the negative conditioning is zeroed, as the reference's; in every step a skip residual toward the "
        "upscaled image "
        "(cosine_scale_1 = 3) and a global branch run with dilated convolutions on a blurred latent "
        "(cosine_scale_2 = 1, cosine_scale_3 = 1, gaussian_sigma = 0.8), two UNet evaluations per step; each "
        "stage re-standardised to the base latent's colour statistics.\n\n"
        "Out of memory? Turn on low_memory in the sampler (same result, slower).\n\n"
        + files_text("sd_xl_base_1.0.safetensors") + "\n" + linfusion_text("sdxl") + "\n\n"
        "Headless: python scripts/run_workflow.py workflows/sdxl_linfusion_1024_to_4k.json")})
    return g.name, g.finish()


def wf_sdxl_sr(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sdxl_linfusion_superres_x2"
    g.node(1, "CheckpointLoaderSimple", (40, 340), (340, 100), None, {"ckpt_name": "sd_xl_base_1.0.safetensors"})
    g.node(2, "ApplyLinFusion", (40, 500), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (1, 0)})
    sdxl_encoders(g, (1, 1), "a detailed, sharp, high-resolution photograph", 420, 120)
    g.node(5, "LoadImage", (420, 520), (340, 420), "Image to upscale", {"image": "example.png"})
    g.node(6, "LinFusionSuperResolution", (900, 120), (360, 660), "Super-resolution x2",
           {"scale_by": 2.0, "width": 0, "height": 0, "stages": "single", "seed": 123, "steps": 50, "cfg": 7.5,
            "sampler_name": "euler", "scheduler": "normal", "method": "demofusion", "upscale_strength": 0.32,
            "strength_schedule": "auto", "upscale_method": "pixel", "cosine_scale_1": 3.0, "cosine_scale_2": 1.0,
            "cosine_scale_3": 1.0, "gaussian_sigma": 0.8, "anchor_stats": "auto", "low_memory": False,
            "vae_tile_size": 2048},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "image": (5, 0), "vae": (1, 2)})
    g.node(7, "SaveImage", (1300, 120), (560, 600), "Save x2", {"filename_prefix": "LinFusion/sdxl_superres_x2"},
           {"images": (6, 0)})
    g.node(8, "Note", (40, 40), (340, 260), "About this workflow", {"text": (
        "SDXL super-resolution x2 of an existing image (LinFusion's SDXL super-resolution pipeline, "
        "examples/inference/superres_sdxl.ipynb): the image is resized bicubically to twice its size, encoded, "
        "and refined in one stage of strength 0.32 (16 of 50 steps) with the DemoFusion-style skip residual "
        "and dilated global branch (dilation = ceil(target long side / 1024): 2 for a 1024 px input, 4 for 2048 px; "
        "gaussian_sigma 0.8), negative conditioning zeroed as the reference's. Describe the image in the positive "
        "prompt.\n\n"
        "Load your own image in 'Image to upscale' (the reference upscales SDXL's 1024 px images to 2048 px; "
        "ComfyUI ships example.png, 768 px). For larger factors the reference README chains x2 runs (each at "
        "0.32, the dilation rising with the size): stages = progressive with strength_schedule = constant does "
        "exactly that in one node; 'auto' lowers the strength per stage as the high-res pipeline does.\n\n"
        + files_text("sd_xl_base_1.0.safetensors") + "\n" + linfusion_text("sdxl") + "\n\n"
        "Headless: python scripts/run_workflow.py workflows/sdxl_linfusion_superres_x2.json "
        "--input-file photo.png --set image=photo.png")})
    return g.name, g.finish()


def wf_sd21(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sd21_linfusion_768"
    g.node(1, "CheckpointLoaderSimple", (40, 340), (340, 100), None, {"ckpt_name": "v2-1_768-ema-pruned.safetensors"})
    g.node(2, "ApplyLinFusion", (40, 500), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (1, 0)})
    text_encoders(g, (1, 1), "a red fox in a snowy birch forest, morning light, highly detailed photograph", NEG, 420, 120)
    g.node(5, "EmptyLatentImage", (420, 520), (320, 110), "Size (768 x 768)", {"width": 768, "height": 768, "batch_size": 1})
    g.node(6, "KSampler", (880, 120), (320, 270), "768 px (v-prediction)",
           {"seed": 7, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)})
    g.node(7, "VAEDecode", (880, 440), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (880, 540), (420, 460), "Save 768 px", {"filename_prefix": "LinFusion/sd21_768"}, {"images": (7, 0)})
    g.node(9, "LinFusionHighResSampler", (1340, 120), (340, 300), "x2 (-> 1536 px)",
           {"scale_by": 2.0, "seed": 7, "steps": 30, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"},
           {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (6, 0), "vae": (1, 2)})
    g.node(10, "VAEDecode", (1340, 470), (220, 50), None, {}, {"samples": (9, 0), "vae": (1, 2)})
    g.node(11, "SaveImage", (1720, 120), (520, 560), "Save 1536 px", {"filename_prefix": "LinFusion/sd21_1536"},
           {"images": (10, 0)})
    g.node(12, "Note", (40, 40), (340, 260), "About this workflow", {"text": (
        "SD2.1 768 (v-prediction) + LinFusion: text-to-image at 768 x 768, then x2 to 1536 x 1536 with the "
        "high-res sampler (progressive SDEdit, strength 0.4: 12 of 30 steps).\n\n"
        "ComfyUI recognises v2-1_768-ema-pruned as a v-prediction model by itself; for a v-prediction fine-tune "
        "it does not recognise (grey or washed-out images), put a ModelSamplingDiscrete node (sampling: "
        "v_prediction) between the checkpoint and Apply LinFusion.\n\n"
        + files_text("v2-1_768-ema-pruned.safetensors") + "\n" + linfusion_text("sd21") + "\n\n"
        "Headless: python scripts/run_workflow.py workflows/sd21_linfusion_768.json")})
    return g.name, g.finish()


def wf_lora_cn(oi) -> tuple[str, dict]:
    g = G(oi)
    g.name = "sd15_linfusion_lora_controlnet"
    g.node(1, "CheckpointLoaderSimple", (40, 380), (340, 100), None, {"ckpt_name": "v1-5-pruned-emaonly.safetensors"})
    g.node(13, "LoraLoader", (40, 530), (340, 130), "LoRA (LCM-LoRA)",
           {"lora_name": "lcm-lora-sdv1-5.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
           {"model": (1, 0), "clip": (1, 1)})
    g.node(2, "ApplyLinFusion", (40, 710), (340, 110), None, {"weights": "auto", "softmax_max_tokens": 0}, {"model": (13, 0)})
    text_encoders(g, (13, 1), "a futuristic glass house on a lake, golden hour, architectural photograph, "
                  "highly detailed", NEG, 420, 120)
    g.node(14, "LoadImage", (420, 520), (320, 380), "Control image", {"image": "example.png"})
    g.node(15, "Canny", (420, 940), (320, 90), None, {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (14, 0)})
    g.node(16, "PreviewImage", (420, 1080), (320, 300), "Edges", {}, {"images": (15, 0)})
    g.node(17, "ControlNetLoader", (880, 120), (380, 60), None,
           {"control_net_name": "control_v11p_sd15_canny_fp16.safetensors"})
    g.node(18, "ControlNetApplyAdvanced", (880, 230), (320, 190), None,
           {"strength": 0.9, "start_percent": 0.0, "end_percent": 1.0},
           {"positive": (3, 0), "negative": (4, 0), "control_net": (17, 0), "image": (15, 0), "vae": (1, 2)})
    g.node(5, "EmptyLatentImage", (880, 470), (320, 110), "Base size (512 x 512)", {"width": 512, "height": 512, "batch_size": 1})
    g.node(6, "KSampler", (1260, 120), (320, 270), "Base image (512 px, LCM)",
           {"seed": 11, "steps": 8, "cfg": 1.5, "sampler_name": "lcm", "scheduler": "sgm_uniform", "denoise": 1.0},
           {"model": (2, 0), "positive": (18, 0), "negative": (18, 1), "latent_image": (5, 0)})
    g.node(7, "VAEDecode", (1260, 440), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (1260, 540), (360, 400), "Save 512 px", {"filename_prefix": "LinFusion/lora_cn_512"},
           {"images": (7, 0)})
    g.node(9, "LinFusionHighResSampler", (1660, 120), (340, 300), "x2 with LoRA + ControlNet (-> 1024 px)",
           {"scale_by": 2.0, "seed": 11, "steps": 8, "cfg": 1.5, "sampler_name": "lcm", "scheduler": "sgm_uniform"},
           {"model": (2, 0), "positive": (18, 0), "negative": (18, 1), "latent_image": (6, 0), "vae": (1, 2)})
    g.node(10, "VAEDecode", (1660, 470), (220, 50), None, {}, {"samples": (9, 0), "vae": (1, 2)})
    g.node(11, "SaveImage", (2040, 120), (520, 560), "Save 1024 px", {"filename_prefix": "LinFusion/lora_cn_1024"},
           {"images": (10, 0)})
    g.node(12, "Note", (40, 40), (340, 300), "About this workflow", {"text": (
        "LinFusion together with a LoRA and a ControlNet (SD1.5): LoRA -> Apply LinFusion -> KSampler with "
        "Canny ControlNet conditioning at 512 px, then the high-res sampler x2 to 1024 px with the same "
        "conditioning (the ControlNet follows every stage's size).\n\n"
        "The LoRA applies to LinFusion's own projections too (LoRA before or after Apply LinFusion both work). "
        "The LoRA here is LCM-LoRA (8 steps, cfg 1.5, sampler lcm, scheduler sgm_uniform); any SD1.5 LoRA "
        "works: with a style LoRA set the samplers back to euler / normal, 25 steps, cfg 7. Replace the "
        "control image with your own (any size).\n\n"
        + files_text("v1-5-pruned-emaonly.safetensors", "lcm-lora-sdv1-5.safetensors",
                     "control_v11p_sd15_canny_fp16.safetensors") + "\n" + linfusion_text("sd15") + "\n\n"
        "Headless: python scripts/run_workflow.py workflows/sd15_linfusion_lora_controlnet.json")})
    return g.name, g.finish()


BUILDERS = [wf_sd15_2k, wf_sd15_16k, wf_sdxl_4k, wf_sdxl_sr, wf_sd21, wf_lora_cn]

if __name__ == "__main__":
    url = sys.argv[1].rstrip("/")
    oi = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/object_info").read())
    OUT.mkdir(exist_ok=True)
    for b in BUILDERS:
        name, wf = b(oi)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=2, ensure_ascii=False) + "\n")
        print(name, len(wf["nodes"]), "nodes", len(wf["links"]), "links")
