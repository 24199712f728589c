"""Start and stop a local ComfyUI process with this pack loaded: the one launcher behind the
workflow runner (scripts/run_workflow.py) and the tests' server (tests/comfy_server.py).

    with ComfyUIProcess(args=["--output-directory", "/tmp/out"]) as srv:
        print(srv.url)          # http://127.0.0.1:<free port>

The server listens on 127.0.0.1 only, on a free port. The pack is added through an extra
model paths file (a `custom_nodes` folder in the work folder holding a link to this
repository) unless the ComfyUI's own custom_nodes already has it. Its output goes to
`log_path`. On Linux the server gets SIGTERM if the process that started it dies without
closing it. Standard library only: the runner must work with a bare Python.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from comfy_env import REPO, comfyui_path

PACK_NAME = "ComfyUI-LinFusion"


class LaunchError(RuntimeError):
    """ComfyUI could not be found or started; the message carries its log tail."""


def offline_flag(comfyui: Path) -> str:
    """The flag that keeps this ComfyUI off the network: `--offline` where it has one (newer
    releases; `--disable-api-nodes` is deprecated there), else `--disable-api-nodes` (0.3.x)."""
    try:
        text = (Path(comfyui) / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        text = ""
    return "--offline" if '"--offline"' in text else "--disable-api-nodes"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_python() -> str:
    """The dev venv's interpreter when it exists (it has ComfyUI's requirements), else this one."""
    venv = Path(os.environ.get("LINFUSION_DEV", REPO / ".dev")) / "venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the server when its parent dies without closing it (e.g. SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ComfyUIProcess:
    """A ComfyUI process on 127.0.0.1 for the lifetime of a `with` block (or start()/close()).

    comfyui: the ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is installed
    in, or the dev setup's copy). python: its interpreter (default: the dev venv's, else this
    one). workdir: where the log and the pack's link go (default: a temporary folder, removed
    on close). extra_model_paths: yaml files passed on, in order. args: more arguments for
    main.py as they are. cpu: add --cpu (None: when the interpreter sees no CUDA). link_pack:
    False loads only what the ComfyUI's custom_nodes holds (e.g. a copy a test installed there).
    """

    def __init__(self, comfyui: Path | None = None, python: str | None = None, workdir: Path | None = None,
                 extra_model_paths: list[Path] | None = None, args: list[str] | None = None,
                 cpu: bool | None = None, start_timeout: float = 180.0, env: dict[str, str] | None = None,
                 link_pack: bool = True) -> None:
        if comfyui is None:
            try:
                comfyui = comfyui_path()
            except RuntimeError as e:
                raise LaunchError(f"{e}; or pass --comfyui PATH / give --server URL") from None
        self.comfyui = Path(comfyui)
        if not (self.comfyui / "main.py").is_file():
            raise LaunchError(f"no ComfyUI at {self.comfyui} (no main.py there): pass --comfyui PATH, "
                              "set COMFYUI_PATH, run scripts/dev_setup.sh, or give --server URL")
        self.python = python or default_python()
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="linfusion-comfyui-")
        self.workdir = Path(workdir or self._tmp)
        self.extra_model_paths = [Path(p) for p in extra_model_paths or []]
        self.args = list(args or [])
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.link_pack = link_pack
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "comfyui.log"
        self.start_seconds: float | None = None
        # Loopback only: never let an http_proxy from the environment see these requests.
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def custom_nodes(self) -> Path:
        """The custom_nodes folder ComfyUI loads this pack from."""
        return self.workdir / "custom_nodes" if self._links_pack() else self.comfyui / "custom_nodes"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _links_pack(self) -> bool:
        """Whether this checkout reaches ComfyUI through a link in the work folder: unless asked
        not to, or ComfyUI's own custom_nodes already holds it."""
        folder = self.comfyui / "custom_nodes"
        installed = folder.is_dir() and any(p.resolve() == REPO for p in folder.iterdir() if p.is_dir())
        return self.link_pack and not installed

    def command(self) -> list[str]:
        cmd = [self.python, str(self.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch"]
        cpu = self.cpu
        if cpu is None:
            probe = subprocess.run([self.python, "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() "
                                    "else 1)"], capture_output=True)
            cpu = probe.returncode != 0
        if cpu:
            cmd.append("--cpu")
        yamls = list(self.extra_model_paths)
        if self._links_pack():
            nodes_dir = self.workdir / "custom_nodes"
            nodes_dir.mkdir(parents=True, exist_ok=True)
            link = nodes_dir / PACK_NAME
            if not link.is_symlink():
                link.symlink_to(REPO, target_is_directory=True)
            pack_yaml = self.workdir / "linfusion_pack.yaml"
            # JSON strings are YAML strings: paths with spaces or colons stay intact.
            pack_yaml.write_text(f"linfusion_pack:\n  custom_nodes: {json.dumps(str(nodes_dir))}\n")
            yamls.insert(0, pack_yaml)
        for y in yamls:
            cmd += ["--extra-model-paths-config", str(y)]
        return cmd + self.args

    def _answers(self) -> bool:
        try:
            with self._http.open(self.url + "/system_stats", timeout=2) as r:
                json.loads(r.read().decode())
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def start(self) -> ComfyUIProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", **self.env}
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=str(self.workdir), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.close)
        while not self._answers():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise LaunchError(f"ComfyUI exited with code {code} while starting.\n{self.log_tail()}")
            if time.monotonic() - t0 > self.start_timeout:
                self.close(keep_log=True)
                raise LaunchError(f"ComfyUI did not answer /system_stats within {self.start_timeout:.0f} s.\n"
                                  f"{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.monotonic() - t0
        return self

    def close(self, keep_log: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s). Safe to call twice. A temporary
        work folder goes too, unless `keep_log` (then the log stays at `log_path`)."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)
        if self._tmp and not keep_log:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> ComfyUIProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- log ---------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 60, since: int = 0) -> str:
        """The last `lines` lines of the log from byte offset `since`, with a header naming it."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"(no server log at {self.log_path})"
        tail = text.splitlines()[-lines:]
        return f"--- ComfyUI log ({self.log_path}), last {len(tail)} lines ---\n" + "\n".join(tail)
