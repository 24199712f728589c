"""A real ComfyUI server in a subprocess, with this pack loaded the way a user's install loads it.

The process is started by scripts/comfy_process.py (the launcher the workflow runner uses
too). Everything the server writes lives in one temporary folder: output/input/temp/user
directories, its database, the model folders (checkpoints, linfusion, loras, ...) and a
`custom_nodes` folder holding only a symlink `ComfyUI-LinFusion -> <this repository>`.
The model folders and `custom_nodes` reach ComfyUI through extra model paths yamls, as
they would in a real install. The server listens on 127.0.0.1 only, and the client below
talks to it without any proxy, so all traffic stays on the loopback interface.

Usable without pytest:

    with ComfyServer(Path("/tmp/x")) as srv:
        pid = srv.post_prompt(graph)
        history = srv.wait(pid, timeout=120)
        print(srv.output_images(history))
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfy_env import REPO, comfyui_path  # noqa: F401  (re-exported for the tests)
from comfy_process import (  # noqa: F401  (PACK_NAME re-exported)
    PACK_NAME,
    ComfyUIProcess,
    LaunchError,
    offline_flag,
)

# Model folders made in the temp folder and registered through the yaml (first in ComfyUI's list).
MODEL_FOLDERS = ("checkpoints", "linfusion", "loras", "vae", "clip", "embeddings", "upscale_models", "controlnet")


class ServerError(LaunchError):
    """The server could not start, refused a prompt, or a prompt failed. Carries the log tail."""


class PromptRejected(ServerError):
    """HTTP 400 from POST /prompt: the graph failed validation (see `.error` and `.node_errors`)."""

    def __init__(self, message: str, error: dict, node_errors: dict) -> None:
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class PromptFailed(ServerError):
    """A prompt was accepted but its execution failed: `.details` is ComfyUI's execution_error."""

    def __init__(self, message: str, details: dict, history: dict) -> None:
        super().__init__(message)
        self.details = details
        self.history = history

    @property
    def exception_message(self) -> str:
        return self.details.get("exception_message", "")

    @property
    def node_type(self) -> str:
        return self.details.get("node_type", "")


class ComfyServer(ComfyUIProcess):
    """The tests' server: CPU mode, offline, every folder it writes inside `root`. link_pack=False:
    no link to this checkout, only what `comfyui`'s own custom_nodes holds (an installed copy)."""

    def __init__(self, root: Path, python: str | None = None, comfyui: Path | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 60.0, link_pack: bool = True) -> None:
        self.root = Path(root)
        self.client_id = uuid.uuid4().hex
        self.dirs = {name: self.root / name for name in ("out", "in", "tmp", "user", "custom_nodes", "hf")}
        self.model_dirs = {name: self.root / "models" / name for name in MODEL_FOLDERS}
        self.yaml_path = self.root / "extra_model_paths.yaml"
        super().__init__(
            comfyui, python or sys.executable, workdir=self.root, extra_model_paths=[self.yaml_path], cpu=True,
            start_timeout=start_timeout, link_pack=link_pack,
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(self.dirs["hf"]), **(env or {})},
            args=[offline_flag(comfyui or comfyui_path()),
                  "--output-directory", str(self.dirs["out"]), "--input-directory", str(self.dirs["in"]),
                  "--temp-directory", str(self.dirs["tmp"]), "--user-directory", str(self.dirs["user"]),
                  "--database-url", f"sqlite:///{self.dirs['user'] / 'comfyui.db'}"])

    def start(self) -> ComfyServer:
        for d in [*self.dirs.values(), *self.model_dirs.values()]:
            d.mkdir(parents=True, exist_ok=True)
        # JSON strings are YAML strings: paths with spaces or colons stay intact.
        lines = ["linfusion_tests:", "  is_default: true"]
        lines += [f"  {name}: {json.dumps(str(path))}" for name, path in self.model_dirs.items()]
        self.yaml_path.write_text("\n".join(lines) + "\n")
        try:
            super().start()
        except LaunchError as e:
            raise ServerError(str(e)) from None
        return self

    # -- HTTP ----------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with self._http.open(req, timeout=timeout) as r:
            return json.loads(r.read().decode() or "null")

    def get_json(self, path: str, timeout: float = 30):
        return self._request(path, timeout=timeout)

    def object_info(self, node: str | None = None) -> dict:
        if node is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{node}")[node]

    def post_prompt(self, graph: dict) -> str:
        """Queue an API-format graph; returns its prompt_id. HTTP 400 -> PromptRejected."""
        try:
            out = self._request("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {}
            if e.code == 400:
                raise PromptRejected(
                    f"ComfyUI rejected the prompt (HTTP 400): {json.dumps(payload.get('error'))}\n"
                    f"node_errors: {json.dumps(payload.get('node_errors'), indent=1)}",
                    payload.get("error") or {}, payload.get("node_errors") or {}) from None
            raise ServerError(f"POST /prompt: HTTP {e.code}: {text[:2000]}\n{self.log_tail()}") from None
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """The history entry of a finished prompt. Execution error -> PromptFailed; timeout or a
        dead server -> ServerError. Both carry the server log tail."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                entry = self.history(prompt_id)
            except TimeoutError:  # a server starved of CPU (a loaded machine) answers late: poll again
                entry = None
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "success" and status.get("completed"):
                    return entry
                details = next((m[1] for m in status.get("messages", []) if m[0] == "execution_error"), {})
                tb = "".join(details.get("traceback", []))
                raise PromptFailed(
                    f"prompt {prompt_id} failed in node {details.get('node_id')} ({details.get('node_type')}): "
                    f"{details.get('exception_type')}: {details.get('exception_message')}\n{tb}\n{self.log_tail()}",
                    details, entry)
            if not self.alive:
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}.\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.2)

    def run(self, graph: dict, timeout: float = 120) -> dict:
        return self.wait(self.post_prompt(graph), timeout)

    def output_images(self, history: dict) -> list[Path]:
        """Paths of the images the prompt's output nodes saved (SaveImage: type 'output')."""
        # ComfyUI puts its temp folder at <--temp-directory>/temp.
        base = {"output": self.dirs["out"], "temp": self.dirs["tmp"] / "temp", "input": self.dirs["in"]}
        paths = []
        for node_out in history.get("outputs", {}).values():
            for img in node_out.get("images", []):
                paths.append(base[img.get("type", "output")] / img.get("subfolder", "") / img["filename"])
        return paths

    @staticmethod
    def cached_nodes(history: dict) -> list[str]:
        """Node ids ComfyUI took from its cache instead of executing (execution_cached message)."""
        for kind, data in history.get("status", {}).get("messages", []):
            if kind == "execution_cached":
                return list(data.get("nodes", []))
        return []
