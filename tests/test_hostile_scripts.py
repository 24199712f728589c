"""Issue 25, items 1 and 6 (scripts): scripts/run_workflow.py keeps every file it writes inside
its output folder whatever a server's /history says, and refuses bad arguments and workflow
files with one line; scripts/band_parallel_stage.py checks its arguments before any process
group or model. All in-process: run_workflow's `main` against a small stand-in of ComfyUI's
HTTP API on 127.0.0.1 (the bug is in the client, so the stand-in only has to answer as
ComfyUI does), band_parallel_stage's `parse_args`."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import run_workflow as rw

# the scripts' own argument and client checks: the same on every ComfyUI (newest leg of the matrix only)
pytestmark = pytest.mark.pure

API_WORKFLOW = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}


def png(width: int = 2, height: int = 3) -> bytes:
    """A valid RGB PNG (what /view returns)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\0" + b"\x80" * 3 * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class FakeComfy:
    """ComfyUI's HTTP API as run_workflow uses it (server.py of ComfyUI 0.3.75: GET /object_info,
    POST /prompt -> {"prompt_id"}, GET /history/<id> -> {id: {"status", "outputs"}}, GET /view
    -> the file's bytes; /ws refused, so the client polls), with a /history whose image entries
    are whatever the test gives. Records the /view queries."""

    def __init__(self, images: list[dict]) -> None:
        self.images, self.views = images, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                u = urlsplit(self.path)
                if u.path == "/object_info":
                    self._send(200, b"{}")
                elif u.path == "/history/p1":
                    entry = {"status": {"status_str": "success", "completed": True, "messages": []},
                             "outputs": {"1": {"images": fake.images}}}
                    self._send(200, json.dumps({"p1": entry}).encode())
                elif u.path == "/view":
                    fake.views.append({k: v[0] for k, v in parse_qs(u.query, keep_blank_values=True).items()})
                    self._send(200, png(), "image/png")
                else:
                    self._send(404, b"{}")

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(200, b'{"prompt_id": "p1", "number": 0, "node_errors": {}}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def run_against(tmp_path: Path, images: list[dict], capsys, *extra: str) -> tuple[int, str, FakeComfy]:
    """run_workflow's main against a server answering `images`; output into tmp_path/box/out."""
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(API_WORKFLOW))
    with FakeComfy(images) as srv:
        code = rw.main([str(wf), "--server", srv.url, "-o", str(tmp_path / "box" / "out"), "-q", *extra])
    return code, capsys.readouterr().err, srv


GOOD = {"filename": "ok.png", "subfolder": "", "type": "output"}


# -- item 1: the runner stays in its output folder -----------------------------------------------------
@pytest.mark.parametrize(("entry", "why"), [
    ({"subfolder": "../../.."}, "a part of its path ('..') is empty, '.' or '..'"),
    ({"subfolder": "a/../../../.."}, "a part of its path ('..')"),
    ({"subfolder": "..\\..\\.."}, "a part of its path ('..')"),
    ({"subfolder": "/ABS"}, "its subfolder is an absolute path"),
    ({"filename": "../../../evil.png"}, "holds a path separator"),
    ({"filename": "/ABS/evil.png"}, "holds a path separator"),
    ({"filename": ".."}, "is empty, '.' or '..'"),
    ({"filename": ""}, "is empty, '.' or '..'"),
    ({"filename": "C:evil.png"}, "a drive"),
    ({"filename": "bad\nname.png"}, "control characters"),
    ({"filename": "x" * 300 + ".png"}, "longer than 255 bytes"),
    ({"filename": 5}, "its filename is a number, not a name"),
    ({"filename": None}, "its filename is null, not a name"),
    ({"subfolder": ["a"]}, "its subfolder is a list, not a name"),
    ({"type": "../../output"}, "its type is not output, temp or input"),
    ({"type": 1}, "its type is not output, temp or input"),
])
def test_outputs_that_would_leave_the_folder_are_refused(tmp_path, capsys, entry, why):
    """Before: a subfolder '../../..' or an absolute path made the runner write there (files
    created beyond -o). Now: that entry is refused with one line, nothing is written outside
    -o, the server's good entries are still saved, and the exit code is 1."""
    item = {**GOOD, "filename": "evil.png", **entry}
    if "ABS" in str(item["subfolder"]) + str(item["filename"]):
        item = {k: v.replace("/ABS", str(tmp_path / "abs")) if isinstance(v, str) else v for k, v in item.items()}
    # odd types are skipped as not 'output' files unless --previews asks for more: ask
    code, err, srv = run_against(tmp_path, [item, GOOD], capsys, "--previews")
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "refused an output the server named" in lines[0] and why in lines[0], err
    assert "Fix: use a --server you trust" in lines[0]
    assert files_under(tmp_path) == {"wf.json", "box/out/wf/ok.png"}  # nothing beyond -o, the good one saved
    assert (tmp_path / "box/out/wf/ok.png").read_bytes() == png()
    assert [v["filename"] for v in srv.views] == ["ok.png"]  # the refused one was not even downloaded


def test_symbolic_links_out_of_the_folder_are_not_followed(tmp_path, capsys):
    out = tmp_path / "box" / "out" / "wf"
    out.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)  # a folder link out of -o
    (out / "planted.png").symlink_to(outside / "planted.png")  # a file link, dangling
    code, err, _ = run_against(tmp_path, [{**GOOD, "subfolder": "sub"}, {**GOOD, "filename": "planted.png"},
                                          {**GOOD, "subfolder": "fine/deeper"}], capsys)
    assert code == 1
    assert "leads outside the output folder (a symbolic link)" in err
    assert "planted.png exists and is a symbolic link or not a file" in err
    assert not any(outside.iterdir())
    assert (out / "fine" / "deeper" / "ok.png").read_bytes() == png()


def test_ordinary_outputs_still_saved_in_subfolders(tmp_path, capsys):
    code, err, srv = run_against(tmp_path, [{**GOOD, "subfolder": "LinFusion/stages"}, {**GOOD, "subfolder": None},
                                            {**GOOD, "type": "temp"}], capsys)
    assert code == 0, err
    assert files_under(tmp_path / "box") == {"out/wf/LinFusion/stages/ok.png", "out/wf/ok.png"}  # temp: --previews
    assert srv.views[0] == {"filename": "ok.png", "subfolder": "LinFusion/stages", "type": "output"}


# -- item 6: run_workflow's arguments and workflow files -----------------------------------------------
def png_with_text(key: str, text: str) -> bytes:
    body = key.encode() + b"\0" + text.encode()
    return png()[:-12] + struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(
        ">I", zlib.crc32(b"tEXt" + body)) + png()[-12:]


@pytest.mark.parametrize(("content", "fragment"), [
    ("[1, 2]", "the JSON is a list, not a workflow"),
    ("null", "the JSON is null, not a workflow"),
    ('"hello"', "the JSON is a string, not a workflow"),
    ("42", "the JSON is a number, not a workflow"),
    ("1e999", "the JSON is a number, not a workflow"),
    ("[" * 100000, "not a JSON workflow"),
    (png_with_text("workflow", '{"nodes": [1,'), "the workflow embedded in this PNG is not valid JSON"),
    (png_with_text("prompt", "[]"), "the JSON is a list, not a workflow"),
])
def test_workflow_files_that_are_not_workflows(tmp_path, capsys, content, fragment):
    """Before: AttributeError / JSONDecodeError tracebacks. Exit 3 before any server starts."""
    wf = tmp_path / "wf.png"
    wf.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = rw.main([str(wf), "--server", "http://127.0.0.1:9", "-q"])  # port 9: nothing is contacted
    err = capsys.readouterr().err
    assert code == 3 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--scale", "nan"], "argument --scale: 'nan' gives nan; the factor must be a finite number above 0"),
    (["--scale", "inf"], "'inf' gives inf"),
    (["--scale", "1/0"], "'1/0' is not a number or a fraction A/B with B not 0"),
    (["--scale", "0"], "'0' gives 0.0; the factor must be a finite number above 0"),
    (["--scale", "-1"], "'-1' gives -1.0"),
    (["--scale", "x"], "'x' is not a number"),
    (["--timeout", "-1"], "argument --timeout: '-1': give the seconds per workflow as a number above 0"),
    (["--timeout", "nan"], "argument --timeout: 'nan'"),
])
def test_bad_numbers_refused_by_the_parser(tmp_path, capsys, args, fragment):
    """Before: --scale nan / 1/0 gave tracebacks, 0 and -1 silently made 16 px images."""
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(API_WORKFLOW))
    with pytest.raises(SystemExit) as exc:
        rw.main([str(wf), "--server", "http://127.0.0.1:9", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err, err


@pytest.mark.parametrize(("path", "fragment"), [
    ("/dev/zero", "not a regular file (a device, pipe or folder)"),
    ("/", "not a regular file"),
    ("/no/such/file.png", "No such file or directory: give an existing image file"),
])
def test_input_files_checked_before_anything(tmp_path, capsys, path, fragment):
    """Before: --input-file /dev/zero read without bound (MemoryError). Checked before any
    server starts (no --server: it would start one)."""
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(API_WORKFLOW))
    code = rw.main([str(wf), "--input-file", path, "--comfyui", str(tmp_path / "no-comfyui")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: --input-file {path}: {fragment}" in err and len(err.strip().splitlines()) == 1, err


def test_upload_reads_at_most_the_bound(tmp_path, monkeypatch):
    """A file that grows after the check (or a device that slipped through) is read with a bound."""
    monkeypatch.setattr(rw, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(rw.WorkflowError, match="larger than 0 MiB, the most this runner uploads"):
        rw.ComfyClient("http://127.0.0.1:9").upload(Path("/dev/zero"))


# -- item 6: band_parallel_stage.py's arguments ---------------------------------------------------------
@pytest.fixture
def bps(monkeypatch):
    """The script's module, under torchrun's environment for one process (unless a test removes it)."""
    import band_parallel_stage

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    return band_parallel_stage


def stage_refused(bps, capsys, args: list[str], fragment: str) -> str:
    with pytest.raises(SystemExit) as exc:
        bps.parse_args(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err, err
    assert "Traceback" not in err
    return err


RANDOM_CPU = ["--device", "cpu", "--channels", "32", "--px", "256"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--px", "0"], "--px 0: give the image side in pixels as a multiple of 64 from 64 on"),
    (["--px", "7"], "--px 7: give the image side"),
    (["--px", "-64"], "--px -64: give the image side"),
    (["--channels", "-32"], "--channels -32: give model_channels as a multiple of 32 from 32 on"),
    (["--channels", "7"], "--channels 7: give model_channels as a multiple of 32"),
    (["--timeout", "-1"], "--timeout -1.0: give the seconds a collective may take, from 1 to 86400"),
    (["--timeout", "nan"], "--timeout nan: give the seconds"),
    (["--cfg", "nan"], "--cfg nan: give a finite guidance scale"),
])
def test_stage_numbers_refused(bps, capsys, args, fragment):
    """Before: tracebacks inside torchrun's workers (ChildFailedError hid the cause)."""
    stage_refused(bps, capsys, [*RANDOM_CPU, *args], fragment)


def test_stage_without_torchrun_refused(bps, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k)
    stage_refused(bps, capsys, RANDOM_CPU, "random mode runs under torchrun: torchrun --standalone "
                                           "--nproc-per-node 2 scripts/band_parallel_stage.py")


def test_stage_cuda_without_cuda_refused(bps, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage_refused(bps, capsys, ["--px", "256"], "--device cuda, but torch sees no CUDA device: use --device cpu")


def write_latent_file(path: Path, tensor) -> Path:
    from safetensors.torch import save_file

    save_file({"latent": tensor}, str(path))
    return path


def fake_checkpoint(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(path))
    return path


@pytest.mark.parametrize(("case", "fragment"), [
    ("passwd", "--checkpoint /etc/passwd: not a .safetensors file"),
    ("missing", "no such file"),
    ("channels16", "has 16 channels; SD1.x, SD2.x and SDXL latents have 4"),
    ("nan", "holds NaN or infinite values"),
    ("huge", "holds values up to 1e+30"),
    ("small", "is 1x1 cells (8x8 px)"),
    ("not_safetensors", "cannot read it as .safetensors"),
    ("out_dir", "is a folder: give a file name"),
    ("out_unwritable", "cannot be written"),
])
def test_stage_real_mode_inputs_refused(bps, capsys, tmp_path, case, fragment):
    """Before: --checkpoint /etc/passwd gave IndexError; a 16-channel latent a traceback after
    loading the model; a NaN latent 'succeeded'; an --out that cannot be written failed after
    sampling. Now all before any process group or model."""
    import torch

    ckpt = fake_checkpoint(tmp_path / "m.safetensors")
    lat = write_latent_file(tmp_path / "in.safetensors", torch.randn(1, 4, 8, 8))
    out = tmp_path / "out.safetensors"
    args = {"checkpoint": str(ckpt), "latent": str(lat), "out": str(out)}
    if case == "passwd":
        args["checkpoint"] = "/etc/passwd"
    elif case == "missing":
        args["checkpoint"] = str(tmp_path / "nope.safetensors")
    elif case == "channels16":
        write_latent_file(lat, torch.randn(1, 16, 8, 8))
    elif case == "nan":
        write_latent_file(lat, torch.full((1, 4, 8, 8), math.nan))
    elif case == "huge":
        write_latent_file(lat, torch.full((1, 4, 8, 8), 1e30))
    elif case == "small":
        write_latent_file(lat, torch.randn(1, 4, 1, 1))
    elif case == "not_safetensors":
        lat.write_bytes(b"garbage")
    elif case == "out_dir":
        out.mkdir()
    elif case == "out_unwritable":
        if os.geteuid() == 0:
            args["out"] = "/proc/version/x.safetensors"  # root may write anywhere but into /proc
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            args["out"] = str(tmp_path / "ro" / "x.safetensors")
    argv = [x for k, v in args.items() for x in (f"--{k}", v)] + ["--device", "cpu"]
    stage_refused(bps, capsys, argv, fragment)


def test_stage_good_arguments_pass(bps, tmp_path):
    import torch

    a = bps.parse_args(RANDOM_CPU)
    assert (a.px, a.channels) == (256, 32)
    ckpt = fake_checkpoint(tmp_path / "m.safetensors")
    lat = write_latent_file(tmp_path / "in.safetensors", torch.randn(1, 4, 8, 8))
    a = bps.parse_args(["--checkpoint", str(ckpt), "--latent", str(lat), "--out", str(tmp_path / "new" / "o.st"),
                        "--device", "cpu"])
    assert a.checkpoint == ckpt and a.out == tmp_path / "new" / "o.st"


def test_stage_message_comes_through_torchrun(tmp_path):
    """The one torchrun start: before, a bad argument ended in tracebacks inside the workers and
    torchrun's ChildFailedError; now each worker prints the one-line usage error before any
    process group forms, and torchrun fails at once with it in the output."""
    import signal
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(__file__).resolve().parents[1] / "scripts" / "band_parallel_stage.py"
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), "--device", "cpu",
                             "--px", "7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            start_new_session=True)  # its own process group: the workers go with it on a timeout
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # before: the workers built models and never ended
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with --px 7 still ran after 120 s")
    assert proc.returncode != 0
    assert out.count("error: --px 7: give the image side in pixels as a multiple of 64") == 2, out[-3000:]
    assert 'band_parallel_stage.py", line' not in out  # no traceback through the script
