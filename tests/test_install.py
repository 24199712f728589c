"""Installing the pack the way users do, into a clean copy of ComfyUI, offline: then a real
ComfyUI server starts, lists the pack's five nodes, keeps its own torch, and runs Apply
LinFusion under the folder name the installer chose.

The installers, from the package registries (pinned below, cached under $LINFUSION_DEV):
* ComfyUI-Manager's command line, `cm-cli install <git URL>` (comfyui-manager on PyPI): it
  clones into custom_nodes/<the URL's last part> and pip-installs requirements.txt line by line,
  skipping torch (Manager 4.3, legacy/manager_core.py `gitclone_install`, `execute_install_script`).
* The Comfy Registry's package: `comfy node pack` (comfy-cli) makes the zip `comfy node publish`
  uploads; the Manager's own registry install (`UnifiedManager._cnr_install`, what `cm-cli install
  comfyui-linfusion`, `comfy node install` and the Manager's UI run once api.comfy.org has
  answered with the download URL) fetches it, unpacks it into custom_nodes/<node id> (lowercase
  `comfyui-linfusion`) and installs requirements.txt. Only the registry's answer is skipped: the
  test hands the Manager the URL of the zip on a loopback HTTP server.
* By hand, as README says: `git clone <URL> ComfyUI-LinFusion` and `pip install -r requirements.txt`.
`comfy node validate` (the checks `comfy node publish` runs before uploading) must pass too.

The source is this checkout's working tree (tracked and untracked files git does not ignore),
committed to a temporary git repository reached through a file://localhost URL (cm-cli accepts
only URLs with a host). ComfyUI's environment is a new virtual environment per install on top of
the dev venv (a .pth file adds the tools' and the dev venv's site-packages after its own): pip
installs into it and never into the dev venv (pip does not uninstall outside its environment), so
"torch unchanged" is checked on the ComfyUI that runs, and the dev venv is checked untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import checkpoints
import helpers
import parallel_checkpoint
import pytest
import server_fixtures
import tomllib
import torch
from comfy_server import ComfyServer, comfyui_path
from PIL import Image
from server_fixtures import CKPT, sd15_graph

REPO = Path(__file__).resolve().parents[1]
TOOLS = ["comfyui-manager==4.3", "comfy-cli==1.23.0"]
NODE_ID = "comfyui-linfusion"  # pyproject's project.name: the registry's node id and folder name
DEV_SITE = Path(sysconfig.get_paths()["purelib"])  # the dev venv's site-packages (this interpreter's)
# ComfyUI's top-level folders a clean copy leaves out (a user's checkout keeps its history,
# outputs and settings there); of models/ only ComfyUI's own configs are copied, of custom_nodes/
# no pack.
NOT_COPIED = {".git", "output", "input", "temp", "user"}
LOG_LIMIT = 6000


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> str:
    """Run a command; its output, or a failure that shows the command and its output's tail. On
    timeout its whole process group goes (an installer's pip children too)."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        status = f"exit {p.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        status = "timed out"
    if p.returncode != 0:
        pytest.fail(f"{status} after {time.monotonic() - t0:.0f} s: {' '.join(map(str, cmd))}\n{out[-LOG_LIMIT:]}",
                    pytrace=False)
    return out


def site_packages(python: Path) -> Path:
    return Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())


def venv_on_top(path: Path, *sites: Path) -> Path:
    """A virtual environment without its own pip whose python also sees `sites` (after its own
    site-packages, in order); its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    (site_packages(python) / "_linfusion_layers.pth").write_text("".join(f"{s}\n" for s in sites))
    return python


@pytest.fixture(scope="session")
def install_tools() -> Path:
    """The python of a virtual environment with cm-cli and comfy-cli (and the dependencies the
    dev venv lacks) on top of the dev venv, built once from the package registries and cached
    under $LINFUSION_DEV: a failed install fails the tests, never skips them."""
    key = hashlib.sha256(" ".join([*TOOLS, str(DEV_SITE)]).encode()).hexdigest()[:10]
    home = checkpoints.cache_dir() / f"install-tools-{key}"
    python = home / "bin" / "python"
    with checkpoints._locked("install-tools"):
        if not (home / "ready").is_file():
            t0 = time.monotonic()
            shutil.rmtree(home, ignore_errors=True)
            venv_on_top(home, DEV_SITE)
            run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                 "-c", REPO / "scripts" / "constraints.txt", *TOOLS], timeout=900)
            (home / "ready").touch()
            server_fixtures.note("install tools", f"{' '.join(TOOLS)} installed in {time.monotonic() - t0:.0f} s")
    return python


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _clean_copy(src: Path):
    """copytree's ignore: ComfyUI as shipped (NOT_COPIED, models, other packs, caches left out)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        out = {n for n in names if n == "__pycache__"}
        if here == src:
            out |= NOT_COPIED & set(names)
        elif here == src / "models":
            out |= {n for n in names if n != "configs"}
        elif here == src / "custom_nodes":
            out |= {n for n in names if (here / n).is_dir()}
        return out
    return ignore


class CleanComfyUI:
    """A copy of the ComfyUI under test as shipped (no models, outputs, user data or other packs)
    and a new environment for it on top of the tools and the dev venv, in `root`."""

    def __init__(self, root: Path, tools_python: Path) -> None:
        self.root = root
        source = comfyui_path()
        self.source_nodes = listing(source / "custom_nodes")
        self.dev_site = listing(DEV_SITE)
        self.path = root / "ComfyUI"
        shutil.copytree(source, self.path, symlinks=True, ignore=_clean_copy(source))
        self.custom_nodes = self.path / "custom_nodes"
        self.custom_nodes.mkdir(exist_ok=True)
        self.python = venv_on_top(root / "env", site_packages(tools_python), DEV_SITE)
        self.site = site_packages(self.python)
        self.install_seconds = 0.0
        # cm-cli finds ComfyUI through COMFYUI_PATH; loopback URLs never go through a proxy.
        self.env = {"COMFYUI_PATH": str(self.path), "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                    "GIT_TERMINAL_PROMPT": "0", "PIP_NO_INPUT": "1",
                    "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}

    def run(self, *cmd, cwd: Path | None = None) -> str:
        t0 = time.monotonic()
        try:
            return run(list(cmd), cwd=cwd, env=self.env)
        finally:
            self.install_seconds += time.monotonic() - t0

    def check(self, how: str, folder: str, prompt: tuple[Path, Path] | None = None) -> None:
        """The pack in custom_nodes/`folder` works: ComfyUI starts with its own torch and lists the
        five nodes from that folder; with `prompt` (an SD1.5 checkpoint, LinFusion weights for it)
        Apply LinFusion runs in a 64 px prompt. The dev venv and the ComfyUI copied from are as
        they were."""
        assert (self.custom_nodes / folder / "__init__.py").is_file(), listing(self.custom_nodes)
        assert [p.name for p in self.site.glob("torch*")] == [], "the install put a torch into ComfyUI's environment"
        assert listing(DEV_SITE) == self.dev_site, "the install changed the dev venv"
        assert listing(comfyui_path() / "custom_nodes") == self.source_nodes
        with ComfyServer(self.root / "server", python=str(self.python), comfyui=self.path, link_pack=False) as srv:
            assert srv.get_json("/system_stats")["system"]["pytorch_version"] == torch.__version__
            info = srv.object_info()
            ours = sorted(name for name, node in info.items() if node["python_module"] == f"custom_nodes.{folder}")
            assert ours == sorted(helpers.PACK_NODES), srv.log_tail()
            fact = f"install {self.install_seconds:.1f} s, server ready in {srv.start_seconds:.1f} s"
            if prompt is not None:
                checkpoint, weights_folder = prompt
                weights = "LinFusion-1-5-random"
                server_fixtures.place_sd15(server_fixtures.ModelDirs(srv.model_dirs), checkpoint, None, CKPT, weights,
                                           weights=weights_folder)
                graph = sd15_graph(weights, f"install-{folder}")
                graph["latent"]["inputs"].update(width=64, height=64)
                t0 = time.monotonic()
                history = srv.run(graph, timeout=300)
                fact += f", 64 px SD1.5 prompt through Apply LinFusion in {time.monotonic() - t0:.1f} s"
                assert "linfusion" not in srv.cached_nodes(history)
                [image] = srv.output_images(history)
                with Image.open(image) as im:
                    assert im.size == (64, 64)
        server_fixtures.note(f"install by {how}", f"custom_nodes/{folder}: {fact}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """This working tree (what git would commit: tracked and untracked, not ignored) committed to
    a new git repository named like the project's."""
    files = run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    repo = tmp_path_factory.mktemp("source") / "ComfyUI-LinFusion"
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted from the working tree stays out
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    git = ["git", "-C", repo, "-c", "user.name=test", "-c", "user.email=test@localhost",
           "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]
    run([*git, "init", "-q", "-b", "main"])
    run([*git, "add", "-A"])
    run([*git, "commit", "-q", "-m", "the working tree under test"])
    return repo


def file_url(path: Path) -> str:
    """A file URL with a host: cm-cli refuses URLs without one (`is_valid_url`), git takes both."""
    return f"file://localhost{path}"


@pytest.fixture(scope="module")
def comfy_cli(install_tools, tmp_path_factory):
    """Run comfy-cli in a folder, offline, without telemetry or prompts; its output."""
    home = tmp_path_factory.mktemp("comfy-cli-home")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "DO_NOT_TRACK": "1"}

    def comfy(*args, cwd: Path) -> str:
        return run([install_tools, "-m", "comfy_cli", "--skip-prompt", *args], cwd=cwd, env=env)
    return comfy


@pytest.fixture(scope="module")
def registry_zip(source, comfy_cli, tmp_path_factory) -> Path:
    """The zip `comfy node publish` would upload (`comfy node pack`: the committed files)."""
    comfy_cli("node", "pack", cwd=source)
    folder = tmp_path_factory.mktemp("registry")
    return Path(shutil.move(source / "node.zip", folder / "node.zip"))


@contextlib.contextmanager
def serve(folder: Path):
    """The files of `folder` over HTTP on 127.0.0.1: the base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# The Manager's registry install after api.comfy.org's answer (a NodeVersion with the zip's URL),
# set up the way cm-cli sets it up (importing cm_cli's module does that).
MANAGER_REGISTRY_INSTALL = """
import sys
from cm_cli.__main__ import unified_manager
from comfyui_manager.common.cnr_utils import NodeVersion
node_id, version, url = sys.argv[1:]
info = NodeVersion(changelog="", dependencies=[], deprecated=False, id=node_id, version=version, download_url=url)
result = unified_manager._cnr_install(node_id, info, instant_execution=True)
print("RESULT", result.result, result.msg)
sys.exit(0 if result.result else 1)
"""


def test_comfy_node_validate_passes(source, comfy_cli):
    """`comfy node validate`: the pyproject checks and the security scan `comfy node publish` runs."""
    out = comfy_cli("node", "validate", cwd=source)
    assert "All validation checks passed" in out and "Warning" not in out and "Security warnings" not in out, out


def test_comfyui_manager_git_url_install(install_tools, source, tmp_path):
    """`cm-cli install <git URL>`: the folder is the URL's last part, torch is never pip-installed."""
    inst = CleanComfyUI(tmp_path, install_tools)
    out = inst.run(inst.python, "-m", "cm_cli", "install", file_url(source), "--exit-on-fail")
    assert "[INSTALLED]" in out and "Install: pip packages" in out and "install script failed" not in out, out
    assert [p.name for p in inst.custom_nodes.iterdir() if p.is_dir()] == [source.name]
    inst.check("cm-cli", source.name)


def test_registry_package_install(install_tools, registry_zip, tmp_path, lf):
    """The registry's zip through the Manager's registry install: custom_nodes/comfyui-linfusion."""
    inst = CleanComfyUI(tmp_path, install_tools)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with serve(registry_zip.parent) as url:
        out = inst.run(inst.python, "-c", MANAGER_REGISTRY_INSTALL, NODE_ID, version, f"{url}/{registry_zip.name}")
    assert "RESULT True" in out and "Install: pip packages" in out and "install script failed" not in out, out
    assert [p.name for p in inst.custom_nodes.iterdir() if p.is_dir()] == [NODE_ID]
    assert (inst.custom_nodes / NODE_ID / ".tracking").is_file()  # how the Manager tells a registry install
    # ComfyUI detects the small checkpoint as SD1.5 (640 MB to load instead of 2.1 GB)
    prompt = (parallel_checkpoint.small_sd15_checkpoint(), parallel_checkpoint.small_linfusion_weights(lf))
    inst.check("the registry's zip", NODE_ID, prompt=prompt)


def test_git_clone_and_pip_install(install_tools, source, tmp_path):
    """README's "by hand": git clone into custom_nodes, pip install -r requirements.txt."""
    inst = CleanComfyUI(tmp_path, install_tools)
    inst.run("git", "clone", "-q", file_url(source), "ComfyUI-LinFusion", cwd=inst.custom_nodes)
    inst.run(inst.python, "-m", "pip", "install", "--disable-pip-version-check", "-r",
             inst.custom_nodes / "ComfyUI-LinFusion" / "requirements.txt")
    inst.check("git clone", "ComfyUI-LinFusion")
