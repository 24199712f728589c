"""A stand-in for the Hugging Face hub on 127.0.0.1, for testing the real download code offline.

Answers like the hub (what huggingface_hub's `get_hf_file_metadata` reads, file_download.py,
and `hf_hub_download` follows): `HEAD|GET /<repo_id>/resolve/<revision>/<filename>` of a
regular file gives 200 with `X-Repo-Commit`, `ETag` (git's blob SHA-1) and `Content-Length`;
of an LFS file (`*.safetensors`, as the hub's .gitattributes has it) a 302 to a CDN on another
origin (a second server, like cas-bridge.xethub.hf.co) with `X-Repo-Commit`, `ETag` and
`X-Linked-Etag` (SHA-256), `X-Linked-Size`; a missing file 404 with `X-Error-Code:
EntryNotFound`. The bytes are served with failure modes a real network (or a wrong mirror) has;
every request is logged with its headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    server: str  # "hub" or "cdn"
    path: str
    headers: dict[str, str]  # names in lower case


class HubStandIn:
    """`files`: {"Yuanshi/LinFusion-1-5/config.json": b"..."}.

    Per file name (or "*"), optional:
    - `mode`, how the bytes are sent: "ok"; "cut" (announces the full length, closes after half);
      "stall" (headers, then no byte); "silent" (no answer at all, not even a status line);
      "slow" (1 KiB every 50 ms); "trickle" (1 byte every 0.3 s, for at most 8 s, then closes);
      "more" (no Content-Length: the file, then junk without end until the client goes).
    - `meta`: headers of the HEAD answer to replace (value None: leave the header out), e.g.
      {"X-Linked-Etag": '"00..."'} for a wrong hash, {"X-Linked-Size": "50000000000"}.
    - `length`: the Content-Length a GET announces instead of the true one.
    `sent[name]`: bytes of the body written so far; `served`: names whose body a GET started."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.meta: dict[str, dict[str, str | None]] = {}
        self.length: dict[str, int] = {}
        self.log: list[Request] = []
        self.sent: dict[str, int] = {}
        self.served: list[str] = []
        self._release = threading.Event()
        self.hub = self._server("hub")
        self.cdn = self._server("cdn")
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]

    def _option(self, table: dict, name: str, default=None):
        return table.get(name, table.get("*", default))

    def _server(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
            def log_message(self, *_args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.log.append(Request(self.command, role, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if role == "cdn":
                    key = next((k for k in hub.files if hub._lfs_path(k) == self.path.split("?")[0]), None)
                    if key is None:
                        return self._status(404)
                    return self._send(key, body)
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._status(404)
                key = "/".join(parts[:2] + parts[4:])
                name = parts[-1]
                data = hub.files.get(key)
                if data is None:
                    return self._status(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
                headers = {"X-Repo-Commit": COMMIT, "Content-Length": str(len(data))}
                if name.endswith(".safetensors"):  # LFS: metadata on the redirect, bytes on the CDN
                    sha = hashlib.sha256(data).hexdigest()
                    headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                    "Location": f"{hub.cdn_url}{hub._lfs_path(key)}?signature=x",
                                    "Content-Length": "0"})
                    status = 302
                else:
                    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    headers["ETag"] = f'"{blob}"'
                    status = 200
                if not body or status == 302:
                    for k, v in hub._option(hub.meta, name, {}).items():
                        headers.pop(k, None)
                        if v is not None:
                            headers[k] = v
                    return self._status(status, headers)
                self._send(key, body)

            def _status(self, code: int, headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {"Content-Length": "0"}).items():
                    self.send_header(k, v)
                self.end_headers()

            def _send(self, key: str, body: bool) -> None:
                data = hub.files[key]
                name = key.rsplit("/", 1)[1]
                mode = hub._option(hub.mode, name, "ok")
                if not body:
                    return self._status(200, {"Content-Length": str(len(data))})
                if mode == "silent":
                    hub._release.wait(30)
                    return
                hub.served.append(name)
                hub.sent[name] = 0
                self.send_response(200)
                if mode != "more":
                    self.send_header("Content-Length", str(hub.length.get(name, len(data))))
                self.end_headers()
                try:
                    self._body(data, name, mode)
                except OSError:  # the client went away
                    pass

            def _body(self, data: bytes, name: str, mode: str) -> None:
                def write(b: bytes) -> None:
                    self.wfile.write(b)
                    self.wfile.flush()
                    hub.sent[name] += len(b)

                if mode == "ok":
                    write(data)
                elif mode == "cut":
                    write(data[: len(data) // 2])
                elif mode == "stall":
                    self.wfile.flush()
                    hub._release.wait(30)
                elif mode == "slow":
                    for i in range(0, len(data), 1024):
                        if hub._release.is_set():
                            break
                        write(data[i:i + 1024])
                        time.sleep(0.05)
                elif mode == "trickle":
                    end = time.monotonic() + 8
                    for i in range(len(data)):
                        if hub._release.is_set() or time.monotonic() > end:
                            break
                        write(data[i:i + 1])
                        time.sleep(0.3)
                elif mode == "more":
                    write(data)
                    junk = bytes(1 << 16)
                    while not hub._release.is_set() and hub.sent[name] < len(data) + (256 << 20):
                        write(junk)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server

    @staticmethod
    def _lfs_path(key: str) -> str:
        return "/xet-bridge/" + hashlib.sha256(key.encode()).hexdigest()

    def __enter__(self) -> HubStandIn:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._release.set()
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()


def point_at(monkeypatch, endpoint: str) -> None:
    """What HF_ENDPOINT=`endpoint` gives when set before huggingface_hub is imported (constants.py
    derives both names from it then)."""
    from huggingface_hub import constants, file_download

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    values = {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": template}
    for name, value in values.items():
        for module in (constants, file_download):  # huggingface_hub < 1.0 copies them into file_download
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)


def use_standin(monkeypatch, hub: HubStandIn, tmp_path) -> None:
    """Point huggingface_hub (and so the pack) at the stand-in, as a user's HF_ENDPOINT would, with
    downloads allowed: the suite sets HF_HUB_OFFLINE=1 for everything else, and huggingface_hub
    reads its switches once, at import, into `huggingface_hub.constants`. The user's own hub cache
    and login are replaced by empty ones (a developer's real cache must not answer)."""
    from huggingface_hub import constants

    point_at(monkeypatch, hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_token"))
    # huggingface_hub 2.x fetches a registry for its user agent once a day into HF_HOME
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LINFUSION_DOWNLOAD_TIMEOUT", "2")


@contextlib.contextmanager
def sd15_hub(lf, sd15, monkeypatch, tmp_path):
    """The stand-in serving SD1.5-family LinFusion weights sized for the small SD1.5 model, with
    huggingface_hub pointed at it (the body of the test modules' `hub` fixtures)."""
    import comfy.model_management
    from helpers import put_weights

    src = put_weights(lf, tmp_path / "hubfiles", "sd15", sd15, name="w")
    try:
        with HubStandIn() as h:
            for name in ("config.json", "diffusion_pytorch_model.safetensors"):
                h.files[f"Yuanshi/LinFusion-1-5/{name}"] = (src / name).read_bytes()
            use_standin(monkeypatch, h, tmp_path)
            yield h
    finally:
        comfy.model_management.interrupt_current_processing(False)
