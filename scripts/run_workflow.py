#!/usr/bin/env python3
"""Run ComfyUI workflow files headlessly and save their images.

    python scripts/run_workflow.py workflows/sd15_512_to_2k.json              # starts a local ComfyUI
    python scripts/run_workflow.py my.json --server http://127.0.0.1:8188     # a running one
    python scripts/run_workflow.py workflows/*.json --scale 0.125 --set steps=4 --output out/

A workflow is either what the web UI saves (UI format: "nodes" and "links") or an API
prompt (what "Export (API)" saves). UI files are converted to an API prompt with the
server's own node definitions (GET /object_info), the way the web UI's "Queue" does: widget
values are matched to inputs in the node's input order, the extra "control after
generate" values (seeds) and upload buttons are skipped, inputs turned into sockets take
their link, Note / Reroute / Primitive nodes are dropped (a primitive's value goes to the
inputs it feeds), muted nodes are left out and bypassed nodes are passed through.

Before queueing, every model file a loader names is checked against the server's lists:
a missing one stops the run with its name, the models folder it belongs in, and the
download address when the workflow carries one. Progress comes over the server's
websocket (node, step, elapsed time); outputs are downloaded through GET /view into
--output, so the server may be on another machine.

Without --server a ComfyUI is started on a free port of 127.0.0.1 from --comfyui,
$COMFYUI_PATH, or the copy scripts/dev_setup.sh made, with this pack loaded, and stopped
at the end; on a machine without CUDA it runs with --cpu. --scale multiplies every pixel
size a workflow sets (width/height inputs: empty latents, resizes, high-res targets;
rounded to multiples of 8) so that CPU runs stay small; factors such as scale_by stay.

Only the standard library is needed (Python 3.9+) to drive a server; starting one needs
ComfyUI's own environment.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import socket
import ssl
import stat
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_process import ComfyUIProcess, LaunchError  # noqa: E402

# Nodes that exist only in the web UI: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_NEVER, MODE_BYPASS = 2, 4  # LiteGraph node modes: muted, bypassed
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# Inputs in pixels that --scale changes.
PIXEL_SIZE_INPUTS = {"width", "height", "target_width", "target_height", "crop_w", "crop_h"}

# Which models folder a file-choice input reads. The workflow's own `properties.models`
# entries (what ComfyUI's templates carry) take precedence; then (node, input); then the
# input name alone.
MODEL_FOLDER_BY_NODE_INPUT = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("DiffControlNetLoader", "control_net_name"): "controlnet",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("StyleModelLoader", "style_model_name"): "style_models",
    ("GLIGENLoader", "gligen_name"): "gligen",
    ("HypernetworkLoader", "hypernetwork_name"): "hypernetworks",
    ("ApplyLinFusion", "weights"): "linfusion",
}
MODEL_FOLDER_BY_INPUT = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae", "control_net_name": "controlnet",
    "unet_name": "diffusion_models", "clip_name": "text_encoders", "upscale_model": "upscale_models",
}
INPUT_FILE_NODES = {("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadImageOutput", "image")}


class WorkflowError(Exception):
    """The workflow cannot be converted or run; the message says why and what to do."""


class MissingModelError(WorkflowError):
    """A file a workflow names is not on the server. `.missing`: list of MissingFile."""

    def __init__(self, missing: list[MissingFile]) -> None:
        self.missing = missing
        super().__init__("\n".join(m.message() for m in missing))


@dataclass
class MissingFile:
    node_id: str
    node_type: str
    input_name: str
    filename: str
    folder: str | None  # models folder name ("checkpoints"), "input" for input images, None if unknown
    url: str | None = None

    def message(self) -> str:
        where = f"node {self.node_id} ({self.node_type}), input '{self.input_name}'"
        if self.folder == "input":
            return (f"Missing input file '{self.filename}' ({where}): copy it into ComfyUI's input folder, or pass "
                    f"--input-file PATH to upload it, or pick another file with --set {self.node_id}.image=NAME.")
        if self.folder is None:
            return f"Missing file '{self.filename}' ({where}): the server does not offer it."
        get = f"download it from {self.url} " if self.url else "download it "
        return (f"Missing model '{self.filename}' ({where}): {get}into ComfyUI/models/{self.folder}/ "
                f"(or a '{self.folder}:' folder of your extra_model_paths.yaml), then run again.")


# -- reading workflows -------------------------------------------------------------------------
def load_workflow(path: str | Path) -> dict:
    """A workflow file as a dict (UI or API format); PNG files with an embedded workflow work too."""
    path = Path(path)
    data = path.read_bytes()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks = _png_text_chunks(data)
        text = chunks.get("workflow") or chunks.get("prompt")
        if text is None:
            raise WorkflowError(f"{path}: this PNG carries no ComfyUI workflow")
        try:
            workflow = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise WorkflowError(f"{path}: the workflow embedded in this PNG is not valid JSON ({str(e)[:200]}): "
                                "open the image in ComfyUI and save the workflow as a .json file") from None
    else:
        try:
            workflow = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise WorkflowError(f"{path}: not a JSON workflow ({str(e)[:200]})") from None
    if not isinstance(workflow, dict):
        raise WorkflowError(f"{path}: the JSON is {_json_kind(workflow)}, not a workflow: give a file saved by "
                            "ComfyUI (UI format: an object with 'nodes' and 'links'; API format: node id -> "
                            "class_type and inputs)")
    return workflow


def _json_kind(value) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _png_text_chunks(data: bytes) -> dict[str, str]:
    out, pos = {}, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            k, v = body.split(b"\0", 1)
            out[k.decode("latin-1")] = v.decode("utf-8", errors="replace")
        pos += 12 + length
    return out


def is_api_format(workflow: dict) -> bool:
    return "nodes" not in workflow and bool(workflow) and all(
        isinstance(v, dict) and "class_type" in v for v in workflow.values())


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list)


# -- node definitions --------------------------------------------------------------------------
def input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of a node's inputs in the order the UI lays out its widgets."""
    groups = info.get("input", {})
    order = info.get("input_order") or {k: list(groups.get(k, {})) for k in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        defs = groups.get(group, {}) or {}
        for name in order.get(group, []):
            if name in defs:
                out.append((name, defs[name], group == "required"))
    return out


def spec_type(spec) -> str:
    """The input's type name; 'COMBO' for a list of choices (old and new spellings)."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(t, list) else str(t)


def spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec) -> list | None:
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return spec_options(spec).get("options")
    return None


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def extra_widget_count(name: str, spec) -> int:
    """Values the UI stores after this widget's own: 'control after generate' (+ its filter for
    choices) and an upload button. Mirrors the frontend's widget constructors."""
    opts, kind = spec_options(spec), spec_type(spec)
    if kind == "INT":
        control = opts.get("control_after_generate")
        return 1 if (control if control is not None else name in ("seed", "noise_seed")) else 0
    if kind == "COMBO":
        return (2 if opts.get("control_after_generate") else 0) + (1 if any(opts.get(f) for f in UPLOAD_FLAGS) else 0)
    return 0


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """Input name -> value of a UI node's widgets."""
    values = node.get("widgets_values")
    widgets = [(name, spec) for name, spec, _ in input_specs(info) if is_widget(spec)]
    if values is None:
        return {}
    if isinstance(values, dict):  # some packs save widgets by name
        return {n: values[n] for n, _ in widgets if n in values}
    extras = [extra_widget_count(n, s) for n, s in widgets]
    full = len(widgets) + sum(extras)
    out, i = {}, 0
    for (name, _spec), extra in zip(widgets, extras):
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if len(values) >= full:
            i += extra
        elif extra and len(values) != len(widgets):  # an older layout: skip only what looks like an extra
            while extra and i < len(values) and (values[i] in CONTROL_VALUES or values[i] in ("image", "")):
                i += 1
                extra -= 1
    return out


# -- UI -> API ---------------------------------------------------------------------------------
@dataclass
class _Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: str


def ui_links(workflow: dict) -> dict[int, _Link]:
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            out[link["id"]] = _Link(str(link["origin_id"]), link["origin_slot"], str(link["target_id"]),
                                    link["target_slot"], link.get("type", "*"))
        else:
            lid, o, os_, t, ts, typ = link[:6]
            out[lid] = _Link(str(o), os_, str(t), ts, typ)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the web UI would queue for a UI-format workflow."""
    subgraphs = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs", [])}
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = ui_links(workflow)
    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        if kind in subgraphs:
            raise WorkflowError(f"node {nid} is a subgraph: open the workflow in ComfyUI and use "
                                "'Export (API)', or unpack the subgraph, to run it here")
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {nid} has type '{kind}', which this ComfyUI does not have: install the custom "
                                "node pack that provides it (ComfyUI's log lists packs that failed to import)")
        widgets = widget_values(node, info)
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) or [] if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        for name, spec, _required in input_specs(info):
            if name in linked:
                source = _resolve(linked[name], links, nodes)
                if source is not _NOTHING:
                    inputs[name] = source
            elif name in widgets and is_widget(spec):
                inputs[name] = widgets[name]
        prompt[nid] = {"class_type": kind, "inputs": inputs,
                       "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


_NOTHING = object()


def _resolve(link_id, links: dict[int, _Link], nodes: dict[str, dict], depth: int = 0):
    """What a link delivers in API terms: [node id, slot], a primitive's value, or _NOTHING."""
    if depth > 100:
        raise WorkflowError("a cycle of reroutes or bypassed nodes")
    link = links.get(link_id)
    src = nodes.get(link.origin) if link else None
    if src is None:
        return _NOTHING
    kind, mode = src.get("type"), src.get("mode", 0)
    if kind == "Reroute":
        ins = src.get("inputs") or []
        return _resolve(ins[0].get("link"), links, nodes, depth + 1) if ins else _NOTHING
    if kind == "PrimitiveNode":
        vals = src.get("widgets_values") or []
        return vals[0] if vals else _NOTHING
    if mode == MODE_NEVER:
        return _NOTHING
    if mode == MODE_BYPASS:  # the UI passes an input of the output's type through
        outs = src.get("outputs") or []
        want = outs[link.origin_slot].get("type") if link.origin_slot < len(outs) else None
        ins = src.get("inputs") or []
        same = ins[link.origin_slot] if link.origin_slot < len(ins) else None
        pick = same if same is not None and same.get("type") == want else next(
            (i for i in ins if i.get("type") == want), None)
        if pick is None or pick.get("link") is None:
            return _NOTHING
        return _resolve(pick["link"], links, nodes, depth + 1)
    return [str(src["id"]), link.origin_slot]


def to_api(workflow: dict, object_info: dict) -> dict:
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if is_ui_format(workflow):
        return ui_to_api(workflow, object_info)
    raise WorkflowError("neither a UI workflow (nodes/links) nor an API prompt (node id -> class_type/inputs)")


# -- changing a prompt -------------------------------------------------------------------------
def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_sets(prompt: dict, sets: list[str]) -> list[str]:
    """--set [NODE.]INPUT=VALUE: NODE is a node id, title or class type; without it, every node
    with that input. VALUE is JSON (numbers, true/false) or plain text. Returns what changed."""
    changes = []
    for item in sets:
        if "=" not in item:
            raise WorkflowError(f"--set {item!r}: use [NODE.]INPUT=VALUE")
        key, raw = item.split("=", 1)
        node_sel, _, name = key.rpartition(".")
        value = parse_value(raw)
        hits = [nid for nid, n in prompt.items()
                if name in n["inputs"] and not isinstance(n["inputs"][name], list)
                and (not node_sel or node_sel in (nid, n["class_type"], n.get("_meta", {}).get("title")))]
        if not hits:
            raise WorkflowError(f"--set {item!r}: no node {'matching ' + repr(node_sel) + ' ' if node_sel else ''}"
                                f"has a widget input '{name}'")
        for nid in hits:
            old = prompt[nid]["inputs"][name]
            prompt[nid]["inputs"][name] = value
            changes.append(f"node {nid} ({prompt[nid]['class_type']}) {name}: {old!r} -> {value!r}")
    return changes


def scale_pixel_sizes(prompt: dict, factor: float, object_info: dict | None = None) -> list[str]:
    """Multiply every pixel size a prompt sets by `factor`, rounded to a multiple of 8 and kept
    within the input's range. 0 (= automatic) and linked values stay. Returns what changed."""
    changes = []
    for nid, node in prompt.items():
        specs = {}
        if object_info and node["class_type"] in object_info:
            specs = {n: s for n, s, _ in input_specs(object_info[node["class_type"]])}
        for name in PIXEL_SIZE_INPUTS & set(node["inputs"]):
            v = node["inputs"][name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                continue
            opts = spec_options(specs.get(name, ["INT", {}]))
            lo, hi = opts.get("min", 0), opts.get("max", 1 << 20)
            new = int(min(max(max(8, round(v * factor / 8) * 8), lo), hi))
            if new != v:
                node["inputs"][name] = new
                changes.append(f"node {nid} ({node['class_type']}) {name}: {v} -> {new}")
    return changes


# -- checking files ----------------------------------------------------------------------------
def model_urls(workflow: dict) -> dict[str, tuple[str | None, str | None]]:
    """filename -> (folder, url) from the workflow's own model list (node `properties.models`
    entries and a top-level `models` list, as ComfyUI's templates carry)."""
    out = {}
    entries = list(workflow.get("models", []) or []) if isinstance(workflow.get("models"), list) else []
    for node in workflow.get("nodes", []) or []:
        entries += (node.get("properties") or {}).get("models", []) or []
    for m in entries:
        if isinstance(m, dict) and m.get("name"):
            out[m["name"]] = (m.get("directory"), m.get("url"))
    return out


def missing_files(prompt: dict, object_info: dict, workflow: dict | None = None) -> list[MissingFile]:
    """Choices a prompt makes that the server does not offer, for inputs that name files."""
    known = model_urls(workflow or {})
    out = []
    for nid, node in prompt.items():
        kind = node["class_type"]
        info = object_info.get(kind)
        if info is None:
            continue
        for name, spec, _ in input_specs(info):
            value = node["inputs"].get(name)
            choices = combo_choices(spec)
            if not isinstance(value, str) or choices is None or value in choices:
                continue
            folder, url = known.get(value, (None, None))
            if (kind, name) in INPUT_FILE_NODES or any(spec_options(spec).get(f) for f in UPLOAD_FLAGS):
                folder = "input"
            folder = folder or MODEL_FOLDER_BY_NODE_INPUT.get((kind, name)) or MODEL_FOLDER_BY_INPUT.get(name)
            if folder is None and not _looks_like_file(value):
                continue  # an ordinary choice: ComfyUI's validation reports it
            out.append(MissingFile(nid, kind, name, value, folder, url))
    return out


def _looks_like_file(value: str) -> bool:
    return Path(value).suffix.lower() in {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".png",
                                          ".jpg", ".jpeg", ".webp"}


# -- a minimal websocket client (stdlib only) ---------------------------------------------------
class WebSocket:
    """Reads ComfyUI's /ws messages: text frames as JSON, binary frames (previews) skipped."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + ("?" + u.query if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise OSError(f"websocket handshake refused: {status.decode(errors='replace')}")
        self.sock = sock
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        n = len(payload)
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self, timeout: float) -> dict | None:
        """The next JSON message, or None when nothing arrives within `timeout` seconds."""
        self.sock.settimeout(timeout)
        data, kind = b"", None
        try:
            while True:
                b0, b1 = self._read(2)
                opcode, fin = b0 & 0x0F, b0 & 0x80
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x8:
                    raise ConnectionError("websocket closed by the server")
                if opcode == 0x9:
                    self._send(0xA, payload)
                    continue
                if opcode in (0x1, 0x2):
                    kind, data = opcode, payload
                elif opcode == 0x0:
                    data += payload
                if fin and kind is not None:
                    if kind == 0x1:
                        return json.loads(data.decode())
                    data, kind = b"", None  # a preview image
        except TimeoutError:
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(0x8)
        with contextlib.suppress(OSError):
            self.sock.close()


# -- talking to a server -----------------------------------------------------------------------
class ComfyClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        self._object_info: dict | None = None

    def request(self, path: str, data: Any = None, raw: bool = False, timeout: float | None = None,
                headers: dict | None = None):
        body = data if isinstance(data, bytes) or data is None else json.dumps(data).encode()
        hdrs = dict(headers or {})
        if body is not None and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, headers=hdrs)
        with self._http.open(req, timeout=timeout or self.timeout) as r:
            content = r.read()
        return content if raw else json.loads(content.decode() or "null")

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.request("/object_info")
        return self._object_info

    def queue(self, prompt: dict, workflow: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None and is_ui_format(workflow):  # saved into the PNGs, as the UI does
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        try:
            return self.request("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                payload = json.loads(text)
            except ValueError:
                raise WorkflowError(f"POST /prompt: HTTP {e.code}: {text[:2000]}") from None
            raise WorkflowError(describe_rejection(payload, prompt)) from None

    def upload(self, path: Path) -> str:
        boundary = uuid.uuid4().hex
        with open(path, "rb") as f:  # bounded: a device or a file grown since the check cannot exhaust memory
            data = f.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise WorkflowError(f"--input-file {path}: larger than {MAX_UPLOAD_BYTES >> 20} MiB, the most this runner "
                                "uploads: copy it into ComfyUI's input folder instead")
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}--\r\n").encode()
        out = self.request("/upload/image", body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return "/".join(p for p in (out.get("subfolder"), out["name"]) if p)

    def history(self, prompt_id: str) -> dict | None:
        return self.request(f"/history/{prompt_id}").get(prompt_id)

    def download(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        return self.request(f"/view?{query}", raw=True)

    def interrupt(self) -> None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.request("/interrupt", {})

    def websocket(self) -> WebSocket | None:
        u = urllib.parse.urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        try:
            return WebSocket(f"{scheme}://{u.netloc}{u.path}/ws?clientId={self.client_id}")
        except OSError:
            return None


def describe_rejection(payload: dict, prompt: dict) -> str:
    """ComfyUI's HTTP 400 answer as readable lines: which node, which input, what is wrong."""
    err = payload.get("error") or {}
    lines = [f"ComfyUI rejected the prompt: {err.get('message', '')} {err.get('details', '')}".rstrip()]
    for nid, ne in (payload.get("node_errors") or {}).items():
        kind = ne.get("class_type") or prompt.get(nid, {}).get("class_type", "?")
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({kind}): {e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(lines)


# -- running with progress ---------------------------------------------------------------------
@dataclass
class RunResult:
    prompt_id: str
    history: dict
    seconds: float
    saved: list[Path] = field(default_factory=list)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # outputs not saved: they would leave the output folder


class Progress:
    """One status line: rewritten in place on a terminal, a line per change (throttled) otherwise."""

    def __init__(self, prompt: dict, stream=sys.stderr, quiet: bool = False) -> None:
        self.prompt, self.stream, self.quiet = prompt, stream, quiet
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self.node: str | None = None
        self.last_print = 0.0
        self.last_text = ""

    def _label(self, nid: str | None) -> str:
        if nid is None:
            return ""
        n = self.prompt.get(str(nid), {})
        title = n.get("_meta", {}).get("title") or n.get("class_type", "?")
        return f"node {nid} {title}"

    def show(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
            self.stream.flush()
        elif text != self.last_text and (force or now - self.last_print >= 2.0):
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_print = now
            self.last_text = text

    def done(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.show(text, force=True)
        if self.tty:
            self.stream.write("\n")

    def event(self, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "execution_start":
            self.show("started", force=True)
        elif kind == "execution_cached" and data.get("nodes"):
            self.show(f"{len(data['nodes'])} node(s) cached", force=True)
        elif kind == "executing" and data.get("node") is not None:
            self.node = str(data["node"])
            self.show(self._label(self.node), force=True)
        elif kind == "progress":
            value, total = data.get("value", 0), max(1, data.get("max", 1))
            bar = "#" * int(20 * value / total)
            self.show(f"{self._label(data.get('node') or self.node)} [{bar:<20}] {value}/{total}", force=value == total)


def run_prompt(client: ComfyClient, prompt: dict, workflow: dict | None = None, timeout: float | None = None,
               quiet: bool = False) -> RunResult:
    """Queue a prompt, show its progress, wait for it; raise WorkflowError with ComfyUI's message if it fails."""
    progress = Progress(prompt, quiet=quiet)
    ws = client.websocket()  # before queueing, so that no event is missed
    t0 = time.monotonic()
    try:
        prompt_id = client.queue(prompt, workflow)
        progress.show(f"queued as {prompt_id}" + ("" if ws else " (no websocket: polling)"), force=True)
        while True:
            if timeout is not None and time.monotonic() - t0 > timeout:
                client.interrupt()
                raise WorkflowError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted)")
            if ws is not None:
                try:
                    msg = ws.receive(timeout=1.0)
                except (OSError, ConnectionError, ValueError):
                    ws = None
                    msg = None
                if msg is not None:
                    data = msg.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    progress.event(msg)
                    if msg.get("type") not in ("execution_success", "execution_error", "execution_interrupted") and \
                            not (msg.get("type") == "executing" and data.get("node") is None
                                 and data.get("prompt_id") == prompt_id):
                        continue
            else:
                time.sleep(0.5)
            entry = client.history(prompt_id)
            if entry is None or entry.get("status", {}).get("completed") is None and \
                    entry.get("status", {}).get("status_str") is None:
                continue
            status = entry.get("status", {})
            if status.get("status_str") == "success" or (status.get("completed") and not status.get("status_str")):
                seconds = time.monotonic() - t0
                progress.done(f"finished in {seconds:.1f} s")
                return RunResult(prompt_id, entry, seconds)
            details = next((m[1] for m in status.get("messages", []) if m[0] == "execution_error"), {})
            if details:
                raise WorkflowError(f"node {details.get('node_id')} ({details.get('node_type')}) failed: "
                                    f"{details.get('exception_type')}: {details.get('exception_message')}")
            raise WorkflowError(f"prompt {prompt_id} did not complete: {status}")
    finally:
        if ws is not None:
            ws.close()


def output_items(history: dict, include_temp: bool = False) -> list[dict]:
    """File entries ({filename, subfolder, type}) the prompt's nodes reported, in node order."""
    items = []
    outputs = history.get("outputs") if isinstance(history, dict) else None
    for node_out in (outputs.values() if isinstance(outputs, dict) else ()):
        if not isinstance(node_out, dict):
            continue
        for values in node_out.values():
            if not isinstance(values, list):
                continue
            for item in values:
                if isinstance(item, dict) and "filename" in item and (
                        item.get("type", "output") == "output" or include_temp):
                    items.append(item)
    return items


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG from its header; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


class UnsafeOutputError(WorkflowError):
    """The server named an output file that would be written outside the output folder."""


def _name_problem(part) -> str | None:
    """Why `part` cannot be one file or folder name inside the output folder (None: it can)."""
    if not isinstance(part, str):
        return f"is {_json_kind(part)}, not a name"
    if part in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if "/" in part or "\\" in part or (len(part) > 1 and part[1] == ":"):
        return "holds a path separator or a drive"
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        return "holds control characters"
    if len(part.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than 255 bytes"
    return None


def output_target(root: Path, folder: Path, item: dict) -> Path:
    """Where an output entry of the server's history goes: `folder`/subfolder/filename, only if
    that stays inside `root` (the -o folder) whatever the server says. Refused (UnsafeOutputError):
    a name or subfolder part that is not a plain name (absolute, '..', separators, control
    characters, not a string), a type other than output/temp/input, and a path that leaves
    `root` through a symbolic link. Creates the subfolders it checks."""
    shown = {k: (v if not isinstance(v, str) or len(v) <= 80 else v[:77] + "...")
             for k, v in item.items() if k in ("filename", "subfolder", "type")}

    def refuse(why: str) -> UnsafeOutputError:
        return UnsafeOutputError(f"refused an output the server named ({shown}): {why}; nothing was written "
                                 f"outside {root}. Fix: use a --server you trust")

    kind = item.get("type", "output")
    if kind not in ("output", "temp", "input"):
        raise refuse("its type is not output, temp or input")
    sub = item.get("subfolder") or ""
    if not isinstance(sub, str):
        raise refuse(f"its subfolder {_name_problem(sub)}")
    parts = [p for p in sub.replace("\\", "/").split("/") if p not in ("", ".")] if not sub.startswith(("/", "\\")) \
        else None
    if parts is None:
        raise refuse("its subfolder is an absolute path")
    for part in [*parts, item.get("filename")]:
        why = _name_problem(part)
        if why:
            raise refuse(f"a part of its path ({part!r}) {why}" if isinstance(part, str) else f"its filename {why}")
    top = root.resolve()
    target = folder.joinpath(*parts, item["filename"])
    # create the folders one at a time, each checked to resolve inside the output folder (a
    # symbolic link there, planted or not, may point anywhere)
    here = folder
    for part in [None, *parts]:
        here = here if part is None else here / part
        try:
            here.mkdir(parents=part is None, exist_ok=True)
        except OSError as e:
            raise refuse(f"cannot make the folder {here} ({e.strerror or e})") from None
        if not here.resolve().is_relative_to(top):
            raise refuse(f"{here} leads outside the output folder (a symbolic link)")
    if target.is_symlink() or target.exists() and not target.is_file():
        raise refuse(f"{target} exists and is a symbolic link or not a file")
    return target


def _write_new(target: Path, data: bytes) -> None:
    """Write without following a symbolic link put at `target` meanwhile."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def save_outputs(client: ComfyClient, result: RunResult, folder: Path, include_temp: bool = False,
                 root: Path | None = None) -> None:
    """Download the prompt's output files into `folder` (inside `root`, the -o folder). An entry
    that would leave `root` is not downloaded; its message goes to `result.refused`."""
    root = folder if root is None else root
    folder.mkdir(parents=True, exist_ok=True)
    for item in output_items(result.history, include_temp):
        try:
            target = output_target(root, folder, item)
        except UnsafeOutputError as e:
            result.refused.append(str(e))
            continue
        data = client.download(item)
        _write_new(target, data)
        result.saved.append(target)
        size = image_size(data)
        if size:
            result.sizes[target] = size


# -- the command -------------------------------------------------------------------------------
def prepare(workflow: dict, object_info: dict, scale: float | None = None, sets: list[str] | None = None,
            log=print) -> dict:
    """Convert, apply --set and --scale, check files. Returns the API prompt."""
    prompt = to_api(workflow, object_info)
    for line in apply_sets(prompt, sets or []):
        log(f"  set {line}")
    if scale is not None and scale != 1:
        for line in scale_pixel_sizes(prompt, scale, object_info):
            log(f"  scaled {line}")
    missing = missing_files(prompt, object_info, workflow)
    if missing:
        raise MissingModelError(missing)
    return prompt


MAX_UPLOAD_BYTES = 1 << 30  # --input-file: read at most this much (ComfyUI's own default limit is 100 MB)


def _parse_scale(text: str) -> float:
    """--scale F or A/B: a finite factor above 0 (argparse prints the message and exits 2)."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction A/B with B not 0 (e.g. 0.25 or "
                                         "1/8)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} gives {value}; the factor must be a finite number above 0 "
                                         "(e.g. 0.25 or 1/8; 1 keeps the sizes)")
    return value


def _parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give the seconds per workflow as a number above 0")
    return value


def check_input_files(paths: list[Path]) -> str | None:
    """Why an --input-file cannot be uploaded (checked before any server starts), or None."""
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:
            return f"--input-file {p}: {e.strerror or e}: give an existing image file"
        if not stat.S_ISREG(st.st_mode):
            return f"--input-file {p}: not a regular file (a device, pipe or folder): give an image file"
        if st.st_size > MAX_UPLOAD_BYTES:
            return (f"--input-file {p}: {st.st_size / 2**20:.0f} MiB, above the {MAX_UPLOAD_BYTES >> 20} MiB this "
                    "runner uploads: copy it into ComfyUI's input folder instead")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit codes: 0 done, 1 a run failed, 2 a model or input file is missing, "
                                        "3 the workflow cannot be converted or ComfyUI rejected it.")
    ap.add_argument("workflows", nargs="+", type=Path, help="workflow files (UI or API JSON, or a ComfyUI PNG)")
    ap.add_argument("--server", help="URL of a running ComfyUI (default: start one)")
    ap.add_argument("--comfyui", type=Path, help="ComfyUI folder to start (default: $COMFYUI_PATH or the dev copy)")
    ap.add_argument("--python", help="interpreter for the started ComfyUI (default: .dev/venv's, else this one)")
    ap.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
                    help="passed to the started ComfyUI (repeatable): where your models are")
    ap.add_argument("--comfyui-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the started ComfyUI's main.py (repeatable), e.g. --comfyui-arg=--lowvram")
    ap.add_argument("--output", "-o", type=Path, default=Path("workflow-outputs"),
                    help="folder for the outputs (one subfolder per workflow; default: %(default)s)")
    ap.add_argument("--scale", type=_parse_scale, metavar="F",
                    help="multiply every pixel size the workflow sets by F (e.g. 0.25 or 1/8) for quick CPU runs")
    ap.add_argument("--set", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                    help="change an input before running (NODE: id, title or class; default: every node with it)")
    ap.add_argument("--input-file", action="append", default=[], type=Path, metavar="PATH",
                    help="upload a file into the server's input folder first (e.g. the image a LoadImage names)")
    ap.add_argument("--api-out", type=Path, metavar="FILE",
                    help="write the converted API prompt here (with one workflow) and exit without running")
    ap.add_argument("--timeout", type=_parse_timeout, help="seconds per workflow before it is interrupted")
    ap.add_argument("--previews", action="store_true", help="also save preview (temp) images")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    problem = check_input_files(a.input_file)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    workflows = []
    for path in a.workflows:
        try:
            workflows.append((path, load_workflow(path)))
        except (OSError, WorkflowError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    server = None
    code = 0
    try:
        if a.server:
            client = ComfyClient(a.server)
        else:
            log("starting ComfyUI ...")
            server = ComfyUIProcess(a.comfyui, a.python, extra_model_paths=a.extra_model_paths_config,
                                    args=a.comfyui_arg).start()
            log(f"ComfyUI ready at {server.url} in {server.start_seconds:.1f} s")
            client = ComfyClient(server.url)
        object_info = client.object_info()
        for f in a.input_file:
            log(f"uploaded {f} as {client.upload(f)}")
        for path, wf in workflows:
            log(f"{path}:")
            try:
                prompt = prepare(wf, object_info, a.scale, a.set, log)
            except MissingModelError as e:
                print(f"error: {path}:\n{e}", file=sys.stderr)
                code = max(code, 2)
                continue
            except WorkflowError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                code = max(code, 3)
                continue
            if a.api_out:
                a.api_out.write_text(json.dumps(prompt, indent=2))
                log(f"  API prompt written to {a.api_out}")
                continue
            try:
                result = run_prompt(client, prompt, wf, a.timeout, quiet=a.quiet)
            except WorkflowError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                code = max(code, 3 if "rejected" in str(e) else 1)
                continue
            save_outputs(client, result, a.output / path.stem, a.previews, root=a.output)
            for msg in result.refused:
                print(f"error: {path}: {msg}", file=sys.stderr)
                code = max(code, 1)
            for p in result.saved:
                size = result.sizes.get(p)
                print(f"{p}" + (f"  {size[0]}x{size[1]}" if size else ""))
            if not result.saved:
                log("  (no output files)")
        return code
    except (OSError, urllib.error.URLError, WorkflowError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        if server is not None:
            print(server.log_tail(), file=sys.stderr)
        code = 1
        return code
    except KeyboardInterrupt:
        code = 130
        return code
    finally:
        if server is not None:
            server.close(keep_log=code == 1)
            if code == 1:
                print(f"ComfyUI's log: {server.log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
