"""Smoke tests proving the harness: a real ComfyUI server loads the pack cleanly and runs
prompts; the random SD1.5 checkpoint is what ComfyUI takes for SD1.5; in-process sampling
of a small model is deterministic."""

from __future__ import annotations

import math
import re
from pathlib import Path

import checkpoints
import helpers
import numpy as np
import pytest
import torch
from comfy_server import PACK_NAME, REPO, ComfyServer, PromptRejected, ServerError
from PIL import Image

# What the pack's own files look like in a traceback or a warning (ComfyUI itself lives in
# <repo>/.dev, so the bare repository path would also match ComfyUI's own files).
PACK_MARKERS = (PACK_NAME, str(REPO / "nodes"), str(REPO / "linfusion"), str(REPO / "__init__.py"))


def _traceback_blocks(log: str) -> list[str]:
    """Each 'Traceback ...' block of the log, up to the first blank line after it."""
    return [m.group(0) for m in re.finditer(r"Traceback \(most recent call last\):.*?(?:\n\s*\n|\Z)", log, re.S)]


def test_pack_imports_without_errors(comfy_server):
    log = comfy_server.log_text()
    pack_dir = comfy_server.dirs["custom_nodes"] / PACK_NAME
    # ComfyUI lists every custom node folder it tried, with " (IMPORT FAILED)" after a failed one.
    lines = re.findall(r"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?: (.+)$", log, re.M)
    ours = [(secs, failed) for secs, failed, path in lines if path.strip() == str(pack_dir)]
    assert len(ours) == 1 and ours[0][1] == "", f"pack import line missing, repeated or failed: {lines}"
    assert float(ours[0][0]) < 10.0, f"the pack took {ours[0][0]} s to import"
    blocks = _traceback_blocks(log)
    bad_blocks = [b for b in blocks if any(m in b for m in PACK_MARKERS)]
    assert bad_blocks == [], "tracebacks from the pack in the server log:\n" + "\n".join(bad_blocks)
    bad_lines = [ln for ln in log.splitlines()
                 if ("Cannot import" in ln or "IMPORT FAILED" in ln or "Error" in ln)
                 and any(m in ln for m in PACK_MARKERS)]
    assert bad_lines == []


def test_apply_linfusion_in_object_info(comfy_server):
    info = comfy_server.object_info()
    assert "ApplyLinFusion" in info
    node = info["ApplyLinFusion"]
    assert node["python_module"] == f"custom_nodes.{PACK_NAME}"
    assert node["display_name"] == "LinFusion Apply"  # nodes/schema.py DISPLAY_NAMES: first in a "linfusion" search
    assert node["category"] == "LinFusion"
    assert node["input_order"]["required"] == ["model", "weights", "softmax_max_tokens"]
    req = node["input"]["required"]
    assert [req[k][0] for k in ("model", "weights", "softmax_max_tokens")] == ["MODEL", "COMBO", "INT"]
    for name, (_, opts) in req.items():
        assert len(opts.get("tooltip", "")) > 20, f"input {name} has no real tooltip: {opts}"
    weights = req["weights"][1]
    assert weights["options"][0] == "auto" and weights["default"] == "auto"
    tokens = req["softmax_max_tokens"][1]
    assert (tokens["default"], tokens["min"]) == (0, 0)
    assert node["output"] == ["MODEL"] and len(node["output_tooltips"][0]) > 20
    assert len(node["description"]) > 50


def _listening_addresses(pid: int) -> list[str]:
    """IPv4/IPv6 addresses of the TCP sockets process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr, port = local.split(":")
                out.append(f"{table}:{addr}:{int(port, 16)}")
    return out


def test_server_started_on_loopback(comfy_server):
    assert comfy_server.start_seconds is not None and 0 < comfy_server.start_seconds < comfy_server.start_timeout
    print(f"ComfyUI server ready in {comfy_server.start_seconds:.1f} s")
    stats = comfy_server.get_json("/system_stats")
    argv = stats["system"]["argv"]
    assert "--cpu" in argv and argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    if not Path("/proc/self/net/tcp").exists():
        pytest.skip("no /proc: cannot list the server's sockets")
    listening = _listening_addresses(comfy_server.proc.pid)
    # 0100007F is 127.0.0.1 in /proc's little-endian hex.
    assert listening == [f"tcp:0100007F:{comfy_server.port}"], listening


def test_builtin_prompt_returns_its_image(comfy_server):
    color = 0x336699
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 2, "color": color}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 48, "height": 40, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "harness/empty"}},
    }
    history = comfy_server.run(graph, timeout=60)
    paths = comfy_server.output_images(history)
    assert len(paths) == 2
    for p in paths:
        assert p.is_file() and p.parent == comfy_server.dirs["out"] / "harness"
        with Image.open(p) as im:
            assert im.size == (48, 40) and im.mode == "RGB"
            px = np.asarray(im)
        assert (px == np.array([0x33, 0x66, 0x99], dtype=np.uint8)).all()


def test_invalid_builtin_prompt_is_rejected(comfy_server):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "no-such-method",
                                                     "width": 4, "height": 4, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "harness/rejected"}},
    }
    with pytest.raises(PromptRejected) as exc:
        comfy_server.post_prompt(graph)
    errors = exc.value.node_errors["2"]["errors"]
    assert [e["type"] for e in errors] == ["value_not_in_list"]
    assert "no-such-method" in errors[0]["details"]
    assert list(comfy_server.dirs["out"].rglob("rejected*")) == []


def test_launcher_failures_are_clear(tmp_path, capsys):
    """The one launcher (scripts/comfy_process.py) behind the tests' server and the workflow
    runner: a wrong ComfyUI folder names the fix; a server that dies while starting reports
    its exit code and log, and leaves no process behind."""
    import run_workflow
    from comfy_process import ComfyUIProcess, LaunchError

    with pytest.raises(LaunchError, match=r"no ComfyUI at .*COMFYUI_PATH"):
        ComfyUIProcess(comfyui=tmp_path)
    wf = tmp_path / "w.json"
    wf.write_text('{"1": {"class_type": "EmptyImage", "inputs": {}}}')
    assert run_workflow.main([str(wf), "--comfyui", str(tmp_path), "-q"]) == 1
    assert "no ComfyUI at" in capsys.readouterr().err

    srv = ComfyServer(tmp_path / "srv", python="false")  # exits at once with status 1
    with pytest.raises(ServerError, match="exited with code 1 while starting"):
        srv.start()
    assert srv.proc is None and not srv.alive


def test_random_sd15_checkpoint_is_sd15(sd15_checkpoint):
    import comfy.supported_models
    from safetensors import safe_open

    layout = checkpoints.file_layout(sd15_checkpoint)
    assert layout == checkpoints.sd15_layout()
    assert type(checkpoints.detected_model_config(layout)) is comfy.supported_models.SD15
    counts = {part: sum(math.prod(s) for k, s in layout.items() if k.startswith(prefix))
              for part, prefix in checkpoints.SD15_PREFIXES.items()}
    # SD1.5's published sizes: UNet 859.5 M, CLIP-L text model 123.1 M, VAE 83.7 M parameters.
    assert counts == {"unet": 859_520_964, "clip": 123_060_480, "vae": 83_653_863}
    with safe_open(str(sd15_checkpoint), framework="pt") as f:
        assert f.metadata()["generator_version"] == str(checkpoints.GENERATOR_VERSION)
        w = f.get_tensor("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
        gain = f.get_tensor("model.diffusion_model.input_blocks.4.1.norm.weight")
        bias = f.get_tensor("first_stage_model.decoder.conv_out.bias")
    assert w.dtype == torch.float16 and w.shape == (640, 640)
    assert abs(w.float().std().item() * math.sqrt(640) - 1.0) < 0.02
    assert torch.equal(gain, torch.ones_like(gain)) and torch.equal(bias, torch.zeros_like(bias))


def test_small_model_samples_deterministically():
    model = helpers.small_model("sd15")
    a = helpers.sample(model, "sd15", steps=4, seed=7)
    b = helpers.sample(model, "sd15", steps=4, seed=7)
    c = helpers.sample(model, "sd15", steps=4, seed=8)
    assert a.shape == (1, 4, 16, 16) and torch.isfinite(a).all()
    assert a.abs().mean() > 0.01
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01 * a.abs().mean()
