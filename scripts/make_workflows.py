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
LINFUSION = {"sd15": ("LinFusion-1-5", "198 MB"), "sd21": ("LinFusion-2-1", "198 MB"), "sdxl": ("LinFusion-XL", "871 MB")}
FAMILY_LABEL = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}


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
            "extra": {"ds": {"scale": VIEW_SCALE, "offset": list(VIEW_OFFSET)}},
            "version": 0.4,
        }


# -- layout ------------------------------------------------------------------------------------
# Left to right, as data flows: model (the Note below it) | prompts | base image | [ControlNet] |
# upscale | save. Samplers and image nodes grow downwards when they show their previews after a
# run (a square preview adds about its width), so nothing is placed below them and each group
# leaves them that room (PREVIEW). The saved view (VIEW_SCALE, VIEW_OFFSET) shows the whole graph
# at a zoom where ComfyUI still draws text (its level of detail switches at 8 px / 14 px = 0.57)
# in a 1920 x 1080 browser window. tests/test_browser.py checks that no two node boxes intersect
# and that every node stays inside its group after a run, and the view.
TOP = 100  # the first row's node tops; titles sit 30 px above, group titles 40 px above those
GAP = 40
GROUP_TOP = TOP - 75
PREVIEW = 400  # room below a sampler or preview node for the image it shows after a run
PROMPT_X = 440  # the prompt column, under Apply LinFusion
VIEW_SCALE = 0.6
VIEW_OFFSET = (100, 120)  # canvas units: the graph's top left clears the UI's side and top bars
POS_COLOR, NEG_COLOR = ("#232", "#353"), ("#322", "#533")


def note(g: G, nid: int, text: str, y: int) -> None:
    """The workflow's Note, below the model group: what it does and which files, sized so the
    text needs no scrolling (about 46 characters a line and 17 px a line in the UI's note font
    at width 360)."""
    assert len(text) <= 800, f"{g.name}: keep the note short ({len(text)} characters); details go to the README"
    lines = sum(max(1, -(-len(line) // 46)) for line in text.split("\n"))
    g.node(nid, "Note", (40, y), (360, 40 + 17 * lines), "About this workflow", {"text": text})


def model_group(g: G, ckpt: str, lora: dict | None = None) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Load Checkpoint [above LoRA] -> Apply LinFusion. Returns (model, clip, the group's bottom)."""
    g.node(1, "CheckpointLoaderSimple", (40, TOP + 60), (340, 100), "Load Checkpoint", {"ckpt_name": ckpt})
    model, clip = (1, 0), (1, 1)
    bottom = TOP + 180
    if lora is not None:
        g.node(13, "LoraLoader", (40, TOP + 210), (340, 130), "LoRA", lora, {"model": model, "clip": clip})
        model, clip = (13, 0), (13, 1)
        bottom = TOP + 360
    g.node(2, "ApplyLinFusion", (PROMPT_X, TOP), (340, 110), "Apply LinFusion",
           {"weights": "auto", "softmax_max_tokens": 0}, {"model": model})
    g.group("Model", (20, GROUP_TOP, PROMPT_X + 340 + 20 - 20, bottom + 20 - GROUP_TOP))
    return (2, 0), clip, bottom + 20


def prompts(g: G, clip, y: int, pos_text: str, neg_text: str | None, final_px: tuple[int, int] | None = None) -> int:
    """Positive and negative prompt below Apply LinFusion, from `y` (the prompt group's top).
    SDXL with a base image (`final_px`): the positive is CLIPTextEncodeSDXL at the final size,
    since the reference conditions its base generation on the final size too
    (pipeline_highres_sdxl.py, the added time ids from the target size). SDXL (neg_text None)
    gets the zeroed negative of the reference (diffusers' force_zeros_for_empty_prompt):
    ConditioningZeroOut. Returns the y below them."""
    x, y = PROMPT_X, y + 80
    if final_px is not None:
        w, h = final_px
        g.node(3, "CLIPTextEncodeSDXL", (x, y), (420, 400), "Positive prompt (conditioned on the final size)",
               {"width": w, "height": h, "crop_w": 0, "crop_h": 0, "target_width": w, "target_height": h,
                "text_g": pos_text, "text_l": pos_text}, {"clip": clip}, color=POS_COLOR)
        y += 440
    else:
        g.node(3, "CLIPTextEncode", (x, y), (420, 160), "Positive prompt", {"text": pos_text}, {"clip": clip},
               color=POS_COLOR)
        y += 200
    if neg_text is None:
        g.node(4, "ConditioningZeroOut", (x, y), (320, 60), "Negative: zeros (as the reference)", {},
               {"conditioning": (3, 0)}, color=NEG_COLOR)
        return y + 100
    g.node(4, "CLIPTextEncode", (x, y), (420, 130), "Negative prompt", {"text": neg_text}, {"clip": clip},
           color=NEG_COLOR)
    return y + 170


def prompt_group(g: G, top: int, bottom: int, title: str = "Prompt") -> None:
    """The group around the prompt column, below the Model group."""
    g.group(title, (PROMPT_X - 20, top, 460, bottom + 40 - top))


def sampling(seed: int, steps: int, cfg: float, sampler: str = "euler", scheduler: str = "normal") -> dict:
    """The sampling widgets a KSampler and the High-Res Samplers share."""
    return {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler}


def stage_links(model, positive=(3, 0), negative=(4, 0)) -> dict:
    """A High-Res Sampler's inputs: the base KSampler's latent (6) and the checkpoint's VAE (1)."""
    return {"model": model, "positive": positive, "negative": negative, "latent_image": (6, 0), "vae": (1, 2)}


def base_image(g: G, x: int, model, pos, neg, latent, ksampler: dict, prefix: str) -> int:
    """KSampler (6, `ksampler`: sampling() widgets) -> VAE Decode (7) -> Save (8), each in its own
    column. Returns the next x."""
    g.node(6, "KSampler", (x, TOP), (320, 270), "Base image", {**ksampler, "denoise": 1.0},
           {"model": model, "positive": pos, "negative": neg, "latent_image": latent})
    g.node(7, "VAEDecode", (x + 360, TOP), (220, 50), None, {}, {"samples": (6, 0), "vae": (1, 2)})
    g.node(8, "SaveImage", (x + 360, TOP + 100), (360, 360), "Save base image", {"filename_prefix": prefix},
           {"images": (7, 0)})
    g.group("Base image", (x - 20, GROUP_TOP, 360 + 360 + 40, TOP + 270 + PREVIEW + 20 - GROUP_TOP))
    return x + 360 + 360 + 60


def upscale(g: G, x: int, kind: str, widgets: dict, links: dict, title: str, height: int, nid: int = 9) -> int:
    """The LinFusion high-res node (`nid`). Returns the next x."""
    g.node(nid, kind, (x, TOP), (360, height), title, widgets, links)
    g.group("Upscale", (x - 20, GROUP_TOP, 400, TOP + height + PREVIEW + 20 - GROUP_TOP))
    return x + 360 + 60


def refine_widgets(seed: int, method: str, strength: float, low_memory: bool, **size) -> dict:
    """The widgets of the High-Res Sampler (advanced) and the Super-Resolution node: `size`
    (scale_by, width, height, stages) and the reference's sampling and refinement settings."""
    return {**size, **sampling(seed, 50, 7.5),
            "method": method, "upscale_strength": strength, "strength_schedule": "auto", "upscale_method": "pixel",
            "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0, "gaussian_sigma": 0.8,
            "anchor_stats": "auto", "low_memory": low_memory, "vae_tile_size": 2048}


def save_final(g: G, x: int, prefix: str, tiled: int = 0, source=(9, 0), save_id: int = 11) -> None:
    """[VAE Decode (10) ->] Save (11): the final image."""
    if source == (9, 0):
        if tiled:
            g.node(10, "VAEDecodeTiled", (x, TOP), (300, 150), None,
                   {"tile_size": tiled, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8},
                   {"samples": source, "vae": (1, 2)})
            y = TOP + 200
        else:
            g.node(10, "VAEDecode", (x, TOP), (220, 50), None, {}, {"samples": source, "vae": (1, 2)})
            y = TOP + 100
        source = (10, 0)
    else:
        y = TOP
    g.node(save_id, "SaveImage", (x, y), (440, 500), "Save final image", {"filename_prefix": prefix},
           {"images": source})
    g.group("Save", (x - 20, GROUP_TOP, 480, y - GROUP_TOP + 540))


NEG = "blurry, low quality, lowres, deformed, watermark, text, signature"
SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"


def repo(url: str) -> str:
    """huggingface.co/<owner>/<repo> of a file URL: where a user finds the file."""
    return "/".join(url.split("/")[2:5])


def files_note(fam: str, *names: str) -> str:
    """The note's file list: each model file's folder and where to get it, and LinFusion's 'auto'."""
    folder, size = LINFUSION[fam]
    lines = ["Files:"] + [f"- models/{MODELS[n][0]}/{n} ({repo(MODELS[n][1])})" for n in names]
    lines.append(f"- LinFusion weights: 'auto' downloads huggingface.co/Yuanshi/{folder} ({size}) into "
                 f"models/linfusion/{folder}/ on the first run.")
    return "\n".join(lines)


# -- the workflows -------------------------------------------------------------------------------
# Each builder returns (graph named by its template title, family, stage sizes in px, thumbnail subtitle).
# Node titles say what a node does, never a size or factor: those are widgets a user changes.
BASE_X = PROMPT_X + 460 + 20  # the base image column, right of the prompt group


def head(g: G, ckpt: str, pos: str, neg: str | None, base: tuple[int, int] | None, final: tuple[int, int] | None = None,
         lora: dict | None = None) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Model group, prompt group (with the base size when `base`), and the y for the Note.
    Returns (model, clip, note y)."""
    model, clip, bottom = model_group(g, ckpt, lora)
    top = bottom + 20
    y = prompts(g, clip, top, pos, neg, final)
    if base is not None:
        g.node(5, "EmptyLatentImage", (PROMPT_X, y), (320, 110), "Base size",
               {"width": base[0], "height": base[1], "batch_size": 1})
        y += 110
    prompt_group(g, top, y)
    return model, clip, top + 60


def wf_sd15_2k(oi):
    g = G(oi)
    g.name = "SD1.5 512 to 2K with LinFusion"
    model, clip, note_y = head(g, SD15, "a cozy alpine village at dusk, warm lights in the windows, snow-covered roofs, "
                               "mountains in the background, highly detailed photograph", NEG, (512, 512))
    x = base_image(g, BASE_X, model, (3, 0), (4, 0), (5, 0),
                   sampling(42, 25, 7.5),
                   "LinFusion/sd15_512")
    x = upscale(g, x, "LinFusionHighResSampler",
                {"scale_by": 4.0, **sampling(42, 50, 7.5)},
                stage_links(model),
                "High-Res Sampler", 300)
    save_final(g, x, "LinFusion/sd15_2k")
    note(g, 12, (
        "SD1.5 with LinFusion: a 512 x 512 image, then x4 to 2048 x 2048 in two x2 stages. Each stage is "
        "upscaled and re-denoised (SDEdit strengths 0.4 and 0.3, as the LinFusion reference for SD1.5).\n\n"
        + files_note("sd15", SD15)), note_y)
    return g, "sd15", [(512, 512), (1024, 1024), (2048, 2048)], "x4 in two stages"


def wf_sd15_16k(oi):
    g = G(oi)
    g.name = "16K image with SD1.5 and LinFusion"
    model, clip, note_y = head(g, SD15, "A photo of the Milky Way galaxy", "", (1024, 512))
    x = base_image(g, BASE_X, model, (3, 0), (4, 0), (5, 0),
                   sampling(3, 50, 7.5),
                   "LinFusion/sd15_1k")
    x = upscale(g, x, "LinFusionHighResSamplerAdvanced",
                refine_widgets(3, "sdedit", 0.4, True, scale_by=16.0, width=0, height=0),
                stage_links(model),
                "High-Res Sampler (advanced)", 660)
    save_final(g, x, "LinFusion/sd15_16k", tiled=2048)
    note(g, 12, (
        "The paper's headline: a 16384 x 8192 image from SD1.5 with LinFusion. A 1024 x 512 image is doubled four "
        "times; each stage is re-denoised (strengths 0.4, 0.3, 0.2, 0.1, the reference notebook's schedule) with "
        "low-memory mode and a tiled VAE. Expect many minutes on a large GPU; try a smaller scale_by first.\n\n"
        + files_note("sd15", SD15)), note_y)
    return g, "sd15", [(1024, 512), (2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)], "four x2 stages"


def wf_sdxl_4k(oi):
    g = G(oi)
    g.name = "SDXL 1024 to 4K with LinFusion"
    model, clip, note_y = head(g, SDXL, "An astronaut floating in space. Beautiful view of the stars and the universe "
                               "in the background.", None, (1024, 1024), final=(4096, 4096))
    x = base_image(g, BASE_X, model, (3, 0), (4, 0), (5, 0),
                   sampling(42, 50, 7.5),
                   "LinFusion/sdxl_1k")
    x = upscale(g, x, "LinFusionHighResSamplerAdvanced",
                refine_widgets(42, "demofusion", 0.32, False, scale_by=4.0, width=0, height=0),
                stage_links(model),
                "High-Res Sampler (DemoFusion-style)", 660)
    save_final(g, x, "LinFusion/sdxl_4k", tiled=1024)
    note(g, 12, (
        "SDXL with LinFusion: a 1024 x 1024 image, then x4 to 4096 x 4096 in two x2 stages with the reference's "
        "DemoFusion-style refinement (strengths 0.32 and 0.16, dilated global branch). As in the reference, the "
        "prompt is conditioned on the final size (set its sizes to match scale_by) and the negative is zeroed. "
        "Out of memory? Turn on low_memory.\n\n"
        + files_note("sdxl", SDXL)), note_y)
    return g, "sdxl", [(1024, 1024), (2048, 2048), (4096, 4096)], "x4, DemoFusion-style"


def wf_sdxl_sr(oi):
    g = G(oi)
    g.name = "SDXL super-resolution x2 with LinFusion"
    model, clip, bottom = model_group(g, SDXL)
    top = bottom + 20
    # plain CLIPTextEncode: the node conditions every stage on the final size of whatever image comes
    y = prompts(g, clip, top, "a detailed, sharp, high-resolution photograph", None)
    g.node(5, "LoadImage", (PROMPT_X, y), (340, 420), "Image to upscale", {"image": "example.png"})
    prompt_group(g, top, y + 420, "Prompt and image")
    x = upscale(g, BASE_X, "LinFusionSuperResolution",
                refine_widgets(123, "demofusion", 0.32, False, scale_by=2.0, width=0, height=0, stages="single"),
                {"model": model, "positive": (3, 0), "negative": (4, 0), "image": (5, 0), "vae": (1, 2)},
                "Super-Resolution", 700, nid=6)
    save_final(g, x, "LinFusion/sdxl_superres_x2", source=(6, 0), save_id=7)
    note(g, 8, (
        "SDXL super-resolution of your own picture with LinFusion: pick it in 'Image to upscale' and describe it "
        "in the prompt. It is doubled and refined in one stage (strength 0.32, the "
        "reference's pipeline). x4 and more: stages progressive (x2 stages at 0.32, 0.24, ...).\n\n"
        + files_note("sdxl", SDXL)
        + "\n- input/example.png: the picture to upscale (ComfyUI's input folder; put yours there or upload it)."),
        top + 60)
    return g, "sdxl", [(1024, 1024), (2048, 2048)], "one refined stage"


def wf_sd21(oi):
    g = G(oi)
    g.name = "SD2.1 768 to 1536 with LinFusion"
    model, clip, note_y = head(g, "v2-1_768-ema-pruned.safetensors", "a red fox in a snowy birch forest, morning "
                               "light, highly detailed photograph", NEG, (768, 768))
    x = base_image(g, BASE_X, model, (3, 0), (4, 0), (5, 0),
                   sampling(7, 30, 7.0),
                   "LinFusion/sd21_768")
    x = upscale(g, x, "LinFusionHighResSampler",
                {"scale_by": 2.0, **sampling(7, 30, 7.0)},
                stage_links(model),
                "High-Res Sampler", 300)
    save_final(g, x, "LinFusion/sd21_1536")
    note(g, 12, (
        "SD2.1 (768 px, v-prediction) with LinFusion: a 768 x 768 image, then x2 to 1536 x 1536 in one re-denoised "
        "stage. A v-prediction fine-tune that ComfyUI does not recognise (grey images) needs a "
        "ModelSamplingDiscrete node (v_prediction) before Apply LinFusion.\n\n"
        + files_note("sd21", "v2-1_768-ema-pruned.safetensors")), note_y)
    return g, "sd21", [(768, 768), (1536, 1536)], "x2"


def wf_lora_cn(oi):
    g = G(oi)
    g.name = "SD1.5 LoRA and ControlNet with LinFusion"
    model, clip, note_y = head(g, SD15, "a futuristic glass house on a lake, golden hour, architectural photograph, "
                               "highly detailed", NEG, (512, 512),
                               lora={"lora_name": "lcm-lora-sdv1-5.safetensors", "strength_model": 1.0,
                                     "strength_clip": 1.0})
    x = base_image(g, BASE_X, model, (3, 0), (4, 0), (5, 0),
                   sampling(11, 8, 1.5, "lcm", "sgm_uniform"), "LinFusion/lora_cn_512")
    # The control image is the base image's own edges: the ControlNet keeps the upscale on its outlines.
    g.node(17, "ControlNetLoader", (x, TOP), (360, 60), None,
           {"control_net_name": "control_v11p_sd15_canny_fp16.safetensors"})
    g.node(15, "Canny", (x, TOP + 110), (360, 90), "Edges of the base image", {"low_threshold": 0.4,
                                                                              "high_threshold": 0.8},
           {"image": (7, 0)})
    g.node(18, "ControlNetApplyAdvanced", (x, TOP + 250), (360, 190), None,
           {"strength": 0.9, "start_percent": 0.0, "end_percent": 1.0},
           {"positive": (3, 0), "negative": (4, 0), "control_net": (17, 0), "image": (15, 0), "vae": (1, 2)})
    g.node(16, "PreviewImage", (x, TOP + 490), (360, 300), "Edges", {}, {"images": (15, 0)})
    g.group("ControlNet", (x - 20, GROUP_TOP, 400, TOP + 790 + PREVIEW // 2 - GROUP_TOP))
    x += 360 + 60
    x = upscale(g, x, "LinFusionHighResSampler",
                {"scale_by": 2.0, **sampling(11, 8, 1.5, "lcm", "sgm_uniform")},
                stage_links(model, (18, 0), (18, 1)),
                "High-Res Sampler", 300)
    save_final(g, x, "LinFusion/lora_cn_1024")
    note(g, 12, (
        "LinFusion with a LoRA and a ControlNet (SD1.5): a 512 px image, then x2 to 1024 px with a Canny ControlNet "
        "on the base image's own edges (no control image to add), so each stage keeps its outlines. The LoRA "
        "(LCM-LoRA: 8 steps, cfg 1.5) reaches LinFusion's layers too. Other LoRAs: euler, 25 steps, cfg 7.\n\n"
        + files_note("sd15", SD15, "lcm-lora-sdv1-5.safetensors", "control_v11p_sd15_canny_fp16.safetensors")),
        note_y)
    return g, "sd15", [(512, 512), (1024, 1024)], "LoRA + ControlNet, x2"


BUILDERS = [wf_sd15_16k, wf_sd15_2k, wf_lora_cn, wf_sd21, wf_sdxl_4k, wf_sdxl_sr]


def write_all(oi: dict, out: Path = OUT) -> list[str]:
    """Write every workflow and its template thumbnail (<name>.jpg) into `out`; returns the names."""
    import thumbnails

    out.mkdir(exist_ok=True)
    names = []
    for b in BUILDERS:
        g, fam, stages, subtitle = b(oi)
        wf = g.finish()
        (out / f"{g.name}.json").write_text(json.dumps(wf, indent=2, ensure_ascii=False) + "\n")
        title = g.name.removesuffix(" with LinFusion").removesuffix(" and LinFusion")
        thumbnails.save(out / f"{g.name}.jpg", title, FAMILY_LABEL[fam], stages, subtitle)
        names.append(g.name)
        print(g.name, len(wf["nodes"]), "nodes", len(wf["links"]), "links")
    return names


if __name__ == "__main__":
    url = sys.argv[1].rstrip("/")
    oi = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/object_info").read())
    write_all(oi)
