"""The example workflows (workflows/*.json) against a real ComfyUI server, and the headless
runner (scripts/run_workflow.py) that converts and runs them.

Static checks, per workflow: it parses as a UI-format graph; every node type exists in the
running server's /object_info; every widget value fits its input (type, range, choice: the
server's file lists hold the stand-ins placed under the workflows' file names); every link
joins compatible types; the prompt the runner converts passes ComfyUI's own validation
(execution.validate_prompt); a Note says what the workflow does and which files it needs.

Runs, per workflow: the runner converts it, scales its pixel sizes down with --scale and
cuts its steps with --set (both printed by the runner and listed in tests/workflow_cases.py's RUNS; the two
advanced samplers also get a constant strength schedule so that every stage is one step),
queues it on the server and downloads the images, which must have the promised sizes times
the scale. Stand-ins (tests/standins.py):
random full-size checkpoints in the original formats (SD1.5, SD2.1-768-v), a full-size SD1.5
ControlNet, a kohya LoRA, official-format LinFusion weights in the folders 'auto' uses, and a
64 x 48 PNG as the input image. All runs use cfg 1 (one UNet batch per step): the runs check
the wiring and the sizes, not the pictures.

SDXL (reduced by default): a full-size SDXL stand-in is 6.5 GB to write (43 s, plus 20 s for
random LinFusion-XL weights), and the server then holds a 9.9 GB fp32 UNet and 1.6 GB of text
encoders (15.8 GB peak RSS); the two SDXL runs took 80 s + 38 s on a quiet moment of this
project's 2-core machines and 145 s for a single tiny prompt on a busy one. That is too much
for CI's share of a shared 24 GB machine, so by default the two SDXL workflows run with the
SD1.5 stand-in placed under the name sd_xl_base_1.0.safetensors: every node of the graph
executes (the DemoFusion-style method is set explicitly in both, so that path runs, dilated
branch included) and the sizes are checked, but SDXL's own text encoders, conditioning and
LinFusion-XL weights are not exercised here (tests/test_apply.py and tests/test_highres.py
cover those on small SDXL-layout models). LINFUSION_TEST_SDXL=full runs them on the
real-layout SDXL stand-in instead (both pass).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import run_workflow as rw
import server_fixtures
import standins
from PIL import Image
from workflow_cases import NAMES, RUNS, WORKFLOWS, Run, expected_sizes, load

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path(os.environ.get("LINFUSION_TEST_OUTPUT", REPO / "test-output")) / "workflows"


LINFUSION_FOLDER = {"sd15": "LinFusion-1-5", "sd21": "LinFusion-2-1", "sdxl": "LinFusion-XL"}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wf(tmp_path_factory, lf, request):
    t0 = time.monotonic()
    srv = standins.WorkflowServer.shared(lambda: tmp_path_factory.mktemp("workflow-server"), lf, request.config)
    built = {k: v for k, v in srv.build_seconds.items() if v > 1}
    server_fixtures.note("Workflow stand-ins", (f"built {', '.join(f'{k} {v:.0f} s' for k, v in built.items())}"
                                                if built else "all from cache") + f"; SDXL mode: {srv.sdxl}")
    server_fixtures.note("Workflow server", f"ready in {srv.server.start_seconds:.1f} s at {srv.url} "
                                            f"(fixture {time.monotonic() - t0:.0f} s; log {srv.server.log_path})")
    yield srv
    srv.free()


@pytest.fixture(scope="module")
def object_info(wf) -> dict:
    return wf.client.object_info()


def real_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in rw.VIRTUAL_NODES]


# -- the folder --------------------------------------------------------------------------------
def test_the_six_workflows_and_one_templates_folder():
    assert set(NAMES) == set(RUNS), "every workflow needs a Run entry (and every entry a file)"
    # ComfyUI offers a pack's example_workflows/, example(s)/ and workflow(s)/ folders as templates;
    # with two of them the UI lists files it then cannot open.
    others = [d for d in ("example_workflows", "example", "examples", "workflow") if (REPO / d).exists()]
    assert not others, f"keep the templates in workflows/ only, found {others}"
    # beside each workflow its template-browser thumbnail, <name>.jpg, and nothing else
    assert sorted(p.name for p in WORKFLOWS.iterdir() if p.suffix != ".json") == sorted(f"{n}.jpg" for n in NAMES)
    for n in NAMES:
        with Image.open(WORKFLOWS / f"{n}.jpg") as im:
            assert im.format == "JPEG" and im.size == (512, 384)


def test_server_offers_them_as_templates(wf):
    index = wf.client.request("/api/workflow_templates")
    pack = next(k for k, v in index.items() if set(v) == set(NAMES))
    for name in NAMES:
        served = wf.client.request(f"/api/workflow_templates/{quote(pack)}/{quote(name)}.json")
        assert served == load(name)


# -- static checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parses_as_a_consistent_ui_graph(name):
    g = load(name)
    assert rw.is_ui_format(g) and not rw.is_api_format(g)
    assert g["version"] == 0.4
    nodes = {n["id"]: n for n in g["nodes"]}
    assert len(nodes) == len(g["nodes"]), "duplicate node ids"
    assert g["last_node_id"] >= max(nodes)
    assert g["last_link_id"] >= max(link[0] for link in g["links"])
    for lid, origin, oslot, target, tslot, typ in g["links"]:
        assert nodes[target]["inputs"][tslot]["link"] == lid
        assert lid in nodes[origin]["outputs"][oslot]["links"]
        assert nodes[origin]["outputs"][oslot]["type"] == typ
    linked = {(link[3], link[4]) for link in g["links"]}
    for n in g["nodes"]:
        for slot, i in enumerate(n.get("inputs", [])):
            assert (i["link"] is not None) == ((n["id"], slot) in linked), (n["id"], i)
        assert n.get("mode", 0) == 0, f"node {n['id']} is muted or bypassed"


@pytest.mark.parametrize("name", NAMES)
def test_note_says_what_and_which_files(name):
    g = load(name)
    notes = [n for n in g["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    models = rw.model_urls(g)
    assert models, "loaders carry properties.models (name, url, directory) for the UI's download prompt"
    for fname, (folder, url) in models.items():
        repo = "/".join(url.split("/")[2:5])  # huggingface.co/<owner>/<repo>: where to get it
        assert f"models/{folder}/{fname}" in text and repo in text, fname
    fam = RUNS[name].family
    assert LINFUSION_FOLDER[fam] in text and "huggingface.co/Yuanshi/" in text
    # what a UI user needs, short enough to read without scrolling; the command line is in the README
    assert len(text) <= 800 and "python " not in text
    lines = sum(max(1, -(-len(line) // 46)) for line in text.split("\n"))
    assert notes[0]["size"][1] >= 40 + 17 * lines
    for n in real_nodes(g):  # LinFusion in 'auto', as the issue asks
        if n["type"] == "ApplyLinFusion":
            assert n["widgets_values"][0] == "auto"
    # every file it loads from ComfyUI's input folder is named there too (issue 23: a fresh install
    # met "Invalid image file: example.png"); only the super-resolution workflow loads one
    inputs = [n["widgets_values"][0] for n in real_nodes(g) if n["type"] == "LoadImage"]
    assert all(f"input/{f}" in text for f in inputs), inputs
    assert bool(inputs) == (name == "SDXL super-resolution x2 with LinFusion")


@pytest.mark.parametrize("name", [n for n in NAMES if RUNS[n].family == "sdxl"])
def test_sdxl_base_image_conditioned_on_the_final_size(name, object_info):
    """The reference conditions its SDXL base generation on the final size too
    (pipeline_highres_sdxl.py: the added time ids come from the target size; issue 23): the base
    KSampler's positive is CLIPTextEncodeSDXL with original and target size = the high-res
    node's final size, and the same conditioning (its zeroed copy as the negative) feeds the
    upscale. The super-resolution workflow has no base generation: its node conditions every
    stage on the final size of whatever image arrives (size_conditioning 'final')."""
    p = rw.ui_to_api(load(name), object_info)
    by_type = {v["class_type"]: k for k, v in p.items()}
    if "KSampler" not in by_type:
        assert p[by_type["LinFusionSuperResolution"]]["inputs"]["size_conditioning"] == "final"
        return
    ks, up = p[by_type["KSampler"]]["inputs"], p[by_type["LinFusionHighResSamplerAdvanced"]]["inputs"]
    base = p[ks["latent_image"][0]]["inputs"]
    final = (base["width"] * up["scale_by"], base["height"] * up["scale_by"])
    pos = p[ks["positive"][0]]
    assert pos["class_type"] == "CLIPTextEncodeSDXL"
    c = pos["inputs"]
    assert (c["width"], c["height"]) == (c["target_width"], c["target_height"]) == final == (4096, 4096)
    assert (c["crop_w"], c["crop_h"]) == (0, 0) and c["text_g"] == c["text_l"]
    assert p[ks["negative"][0]]["class_type"] == "ConditioningZeroOut"
    assert p[ks["negative"][0]]["inputs"]["conditioning"] == ks["positive"]
    assert (up["positive"], up["negative"]) == (ks["positive"], ks["negative"])


@pytest.mark.parametrize("name", NAMES)
def test_node_types_exist_on_the_server(name, object_info):
    missing = sorted({n["type"] for n in real_nodes(load(name))} - set(object_info))
    assert not missing


def check_value(value, spec) -> str | None:
    """Why `value` does not fit input `spec`, or None."""
    kind, opts = rw.spec_type(spec), rw.spec_options(spec)
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an int"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    elif kind == "COMBO":
        choices = rw.combo_choices(spec)
        return None if value in choices else f"{value!r} not among {choices[:8]}{'...' if len(choices) > 8 else ''}"
    if kind in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{value} outside [{opts.get('min')}, {opts.get('max')}]"
        if kind == "INT" and opts.get("step", 1) > 1 and (value - opts.get("min", 0)) % opts["step"]:
            return f"{value} is off the step {opts['step']}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_fit_their_inputs(name, object_info):
    problems, checked = [], 0
    for n in real_nodes(load(name)):
        info = object_info[n["type"]]
        widgets = [(k, s) for k, s, _ in rw.input_specs(info) if rw.is_widget(s)]
        extras = sum(rw.extra_widget_count(k, s) for k, s in widgets)
        assert len(n["widgets_values"]) == len(widgets) + extras, f"node {n['id']} {n['type']}: widget count"
        values = rw.widget_values(n, info)
        assert set(values) == {k for k, _ in widgets}
        for k, spec in widgets:
            why = check_value(values[k], spec)
            checked += 1
            if why:
                problems.append(f"node {n['id']} {n['type']}.{k}: {why}")
        # the stored extras are what the UI stores: a seed's control, an upload button's kind
        i = 0
        for k, spec in widgets:
            i += 1
            for _ in range(rw.extra_widget_count(k, spec)):
                assert n["widgets_values"][i] in rw.CONTROL_VALUES | {"image"}, (n["id"], k)
                i += 1
    assert not problems
    assert checked >= 10


def types_compatible(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


@pytest.mark.parametrize("name", NAMES)
def test_links_join_compatible_types(name, object_info):
    g = load(name)
    nodes = {n["id"]: n for n in g["nodes"]}
    for lid, origin, oslot, target, tslot, typ in g["links"]:
        src, dst = nodes[origin], nodes[target]
        out_type = object_info[src["type"]]["output"][oslot]
        in_name = dst["inputs"][tslot]["name"]
        specs = {k: s for k, s, _ in rw.input_specs(object_info[dst["type"]])}
        assert in_name in specs, f"link {lid}: {dst['type']} has no input {in_name}"
        in_type = rw.spec_type(specs[in_name])
        assert types_compatible(out_type, in_type), \
            f"link {lid}: {src['type']} {out_type} -> {dst['type']}.{in_name} {in_type}"
        assert typ == out_type
    # and every required input that is not a widget is connected
    for n in real_nodes(g):
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for k, spec, required in rw.input_specs(object_info[n["type"]]):
            if required and not rw.is_widget(spec):
                assert k in linked, f"node {n['id']} {n['type']}: required input {k} unconnected"


@pytest.mark.parametrize("name", NAMES)
def test_converted_prompt_passes_comfyui_validation(name, object_info, wf, monkeypatch):
    """ComfyUI's own execution.validate_prompt, in this process (where the pack is loaded the
    way ComfyUI loads it), with the server's stand-in folders as the file lists."""
    import execution
    import folder_paths
    import nodes

    if "Canny" not in nodes.NODE_CLASS_MAPPINGS:  # conftest loads core nodes and the pack, not comfy_extras
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    prompt = rw.ui_to_api(load(name), object_info)
    assert {v["class_type"] for v in prompt.values()} == {n["type"] for n in real_nodes(load(name))}
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for folder in ("checkpoints", "loras", "controlnet", "linfusion"):
        paths, exts = folder_paths.folder_names_and_paths[folder]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(wf.models / folder)], exts))
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(wf.dirs["in"]))
    try:
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("workflow-test", prompt, None))
    finally:
        folder_paths.set_input_directory(old_input)
    assert valid, f"{error}\n{json.dumps(node_errors, indent=1)}"
    assert node_errors == {}
    saves = {nid for nid, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")}
    assert set(outputs) == saves


# -- the runner: conversion details --------------------------------------------------------------
def test_runner_conversion_of_primitives_reroutes_bypass_and_mute(object_info):
    """UI features the example files do not use, converted as the web UI converts them."""
    g = load("SD1.5 512 to 2K with LinFusion")
    nodes = {n["id"]: n for n in g["nodes"]}
    # A primitive node feeding KSampler's seed, through a reroute.
    ks = nodes[6]
    seed_slot = next(i for i, x in enumerate(ks["inputs"]) if x["name"] == "seed")
    g["nodes"] += [
        {"id": 100, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [100], "widget": {"name": "seed"}}],
         "widgets_values": [777, "fixed"]},
        {"id": 101, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 100}],
         "outputs": [{"name": "", "type": "INT", "links": [101]}]},
    ]
    g["links"] += [[100, 100, 0, 101, 0, "INT"], [101, 101, 0, 6, seed_slot, "INT"]]
    ks["inputs"][seed_slot]["link"] = 101
    # Bypass Apply LinFusion: KSampler then takes the checkpoint's MODEL through it.
    nodes[2]["mode"] = rw.MODE_BYPASS
    # Mute the 2K branch's decoder.
    nodes[10]["mode"] = rw.MODE_NEVER
    p = rw.ui_to_api(g, object_info)
    assert p["6"]["inputs"]["seed"] == 777
    assert p["6"]["inputs"]["model"] == ["1", 0]
    assert "2" not in p and "10" not in p and "100" not in p and "101" not in p and "12" not in p
    assert "images" not in p["11"]["inputs"]
    assert p["6"]["inputs"]["steps"] == 25 and p["6"]["inputs"]["sampler_name"] == "euler"
    # API format passes through unchanged
    assert rw.to_api(p, object_info) == p


def test_runner_scales_pixel_sizes_and_sets_inputs(object_info):
    p = rw.ui_to_api(load("16K image with SD1.5 and LinFusion"), object_info)
    changes = rw.scale_pixel_sizes(p, 1 / 32, object_info)
    assert (p["5"]["inputs"]["width"], p["5"]["inputs"]["height"]) == (32, 16)
    assert p["9"]["inputs"]["width"] == 0 and p["9"]["inputs"]["scale_by"] == 16.0  # 0 = auto, factors stay
    assert len(changes) == 2
    rw.apply_sets(p, ["LinFusionHighResSamplerAdvanced.steps=10", "cfg=1", "3.text=a galaxy"])
    assert p["9"]["inputs"]["steps"] == 10 and p["6"]["inputs"]["steps"] == 50
    assert p["6"]["inputs"]["cfg"] == 1 and p["9"]["inputs"]["cfg"] == 1
    assert p["3"]["inputs"]["text"] == "a galaxy"
    with pytest.raises(rw.WorkflowError, match="no node"):
        rw.apply_sets(p, ["KSampler.nonexistent=1"])


def test_runner_names_a_missing_model_and_its_folder(object_info, wf, tmp_path):
    g = load("SD1.5 LoRA and ControlNet with LinFusion")
    for n in g["nodes"]:
        if n["type"] == "ControlNetLoader":
            n["widgets_values"] = ["control_v11p_sd15_openpose_fp16.safetensors"]
            n["properties"]["models"] = [{"name": "control_v11p_sd15_openpose_fp16.safetensors",
                                          "url": "https://example.invalid/openpose.safetensors",
                                          "directory": "controlnet"}]
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"] = ["my-finetune.safetensors"]
    sr = load("SDXL super-resolution x2 with LinFusion")  # the one workflow that loads an input image
    image = next(n for n in sr["nodes"] if n["type"] == "LoadImage")
    image["widgets_values"] = ["photo.png", "image"]
    g["nodes"].append({**image, "id": 99})  # unlinked: the runner checks it all the same
    with pytest.raises(rw.MissingModelError) as e:
        rw.prepare(g, object_info, log=lambda _: None)
    text = str(e.value)
    assert "'my-finetune.safetensors'" in text and "ComfyUI/models/checkpoints/" in text
    assert "'control_v11p_sd15_openpose_fp16.safetensors'" in text and "ComfyUI/models/controlnet/" in text
    assert "https://example.invalid/openpose.safetensors" in text
    assert "'photo.png'" in text and "input folder" in text and "--input-file" in text
    assert {m.folder for m in e.value.missing} == {"checkpoints", "controlnet", "input"}
    # The command: exit code 2 and the same message, nothing queued.
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(g))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "run_workflow.py"), str(path), "--server", wf.url,
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "ComfyUI/models/checkpoints/" in r.stderr and "my-finetune.safetensors" in r.stderr
    assert not (tmp_path / "out").exists()


# -- runs --------------------------------------------------------------------------------------
def saved_by_node(history: dict, folder: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for nid, out in history["outputs"].items():
        for im in out.get("images", []):
            if im.get("type") == "output":
                with Image.open(folder / im.get("subfolder", "") / im["filename"]) as f:
                    sizes[nid] = f.size
    return sizes


def sd15_text_encoders(prompt: dict) -> None:
    """The reduced SDXL runs (module docstring) load the SD1.5 stand-in, whose CLIP has no 'g'
    encoder for CLIPTextEncodeSDXL: its prompts become plain CLIPTextEncode (text_g). The
    final-size conditioning is checked statically (test_sdxl_base_image_conditioned_on_the_final_size)."""
    for node in prompt.values():
        if node["class_type"] == "CLIPTextEncodeSDXL":
            node["class_type"] = "CLIPTextEncode"
            node["inputs"] = {"text": node["inputs"]["text_g"], "clip": node["inputs"]["clip"]}


def run_once(wf, name: str, object_info: dict) -> tuple[rw.RunResult, dict, str]:
    run = RUNS[name]
    lines: list[str] = []
    prompt = rw.prepare(load(name), object_info, run.scale, run.sets, log=lines.append)
    if run.reduced and wf.sdxl != "full":
        sd15_text_encoders(prompt)
    shutil.rmtree(OUTPUT / name, ignore_errors=True)
    since = len(wf.log_text())
    result = rw.run_prompt(wf.client, prompt, load(name), timeout=600, quiet=True)
    rw.save_outputs(wf.client, result, OUTPUT / name)
    return result, prompt, wf.log_text()[since:]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "SD2.1 768 to 1536 with LinFusion"])
def test_workflow_runs_headless_and_keeps_its_sizes(name, wf, object_info):
    run = RUNS[name]
    if run.reduced and wf.sdxl == "full":
        run = Run(**{**run.__dict__, "reduced": False})
    t0 = time.monotonic()
    result, prompt, log = run_once(wf, name, object_info)
    seconds = time.monotonic() - t0
    sizes = saved_by_node(result.history, OUTPUT / name)
    expected = expected_sizes(run)
    assert sizes == expected, f"{name} at scale {run.scale}: promised {run.promised}, expected {expected}, got {sizes}"
    # the files the runner downloaded are those images
    assert sorted(result.sizes.values()) == sorted(expected.values())
    # every output node ran or came from the cache, and the prompt succeeded
    status = result.history["status"]
    assert status["status_str"] == "success"
    cached = set(cached_nodes(status))
    saves = {nid for nid, v in prompt.items() if v["class_type"] == "SaveImage"}
    assert saves <= set(result.history["outputs"]) | cached
    # 'auto' found the LinFusion release of the model's family in the models folder
    fam = "sd15" if run.reduced else run.family
    if not any(prompt[n]["class_type"] == "ApplyLinFusion" for n in cached):
        assert re.search(rf"LinFusion: \d+ self-attention layers of \S+ replaced with \S*/{LINFUSION_FOLDER[fam]}\b",
                         log), log[-2000:]
    if name == "SD1.5 LoRA and ControlNet with LinFusion":
        assert "lora key not loaded" not in log  # every LoRA key found its layer, LinFusion's included
    tag = " (SDXL graph on the SD1.5 stand-in)" if run.reduced else ""
    server_fixtures.note(f"Workflow {name}", f"{seconds:.1f} s at scale {run.scale:g}{tag}: {run.stage_steps}; "
                                             f"sizes {sorted(sizes.values())}")


def cached_nodes(status: dict) -> list[str]:
    for kind, data in status.get("messages", []):
        if kind == "execution_cached":
            return list(data.get("nodes", []))
    return []


def test_sd21_workflow_through_the_command_line(wf, tmp_path):
    """The runner as a user runs it (subprocess, --server), on the SD2.1 v-prediction stand-in:
    progress lines, the scaled sizes on stdout, the files on disk, and ComfyUI's own detection of
    the stand-in as a v-prediction model with LinFusion-2-1 weights picked by 'auto'."""
    name = "SD2.1 768 to 1536 with LinFusion"
    run = RUNS[name]
    since = len(wf.log_text())
    out = OUTPUT / "cli"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    cmd = [sys.executable, str(REPO / "scripts" / "run_workflow.py"), str(WORKFLOWS / f"{name}.json"),
           "--server", wf.url, "-o", str(out), "--scale", "1/16", *[f"--set={s}" for s in run.sets]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    log = wf.log_text()[since:]
    assert "model_type V_PREDICTION" in log
    assert re.search(r"LinFusion: 16 self-attention layers of SD2\.x replaced with .*/LinFusion-2-1\b", log), \
        log[-2000:]
    reported = dict(re.findall(r"^(.+\.png)  (\d+x\d+)$", r.stdout, re.M))
    expected = expected_sizes(run)
    assert sorted(reported.values()) == sorted(f"{w}x{h}" for w, h in expected.values())
    for path, size in reported.items():
        with Image.open(path) as im:
            assert "x".join(map(str, im.size)) == size
            assert Path(path).is_relative_to(out / name)
    assert "scaled node 5 (EmptyLatentImage) width: 768 -> 48" in r.stderr
    assert re.search(r"\[\s*[\d.]+ s\] node 9 .*\[#+\s*\] 1/1", r.stderr), r.stderr  # progress of the high-res stage
    assert "finished in" in r.stderr
    server_fixtures.note(f"Workflow {name}", f"{seconds:.1f} s through the command line at scale 1/16: "
                                             f"{run.stage_steps}; sizes {sorted(reported.values())}")
