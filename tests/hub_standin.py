"""A stand-in for the Hugging Face hub on 127.0.0.1, for testing the real download code offline.

Serves `GET /<repo_id>/resolve/<revision>/<filename>` from a dict, the way the hub's resolve
URL does (the download code reaches it through HF_ENDPOINT), with failure modes a real network
has: a connection cut half-way, a stalled connection, a slow trickle. Requests are counted.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    """`files`: {"Yuanshi/LinFusion-1-5/config.json": b"..."}; `mode` per file name or "*":
    "ok", "cut" (announces the full length, closes after half), "stall" (headers, then no
    byte until closed), "slow" (1 KiB every 50 ms)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.requests: list[str] = []
        self._release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hub.requests.append(self.path)
                parts = self.path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    self.send_error(404)
                    return
                key = "/".join(parts[:2] + parts[4:])
                data = hub.files.get(key)
                if data is None:
                    self.send_error(404, "Entry not found")
                    return
                mode = hub.mode.get(parts[-1], hub.mode.get("*", "ok"))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(data)
                elif mode == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif mode == "stall":
                    self.wfile.flush()
                    hub._release.wait(30)
                    self.close_connection = True
                elif mode == "slow":
                    for i in range(0, len(data), 1024):
                        if hub._release.is_set():
                            break
                        self.wfile.write(data[i:i + 1024])
                        self.wfile.flush()
                        time.sleep(0.05)
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
