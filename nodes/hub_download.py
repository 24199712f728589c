"""Fetching one file from the Hugging Face hub over plain HTTP, interruptibly.

Why not `huggingface_hub.hf_hub_download`: it retries for tens of seconds when the network is
down, cannot be cancelled while bytes arrive, and may hand the transfer to a native backend
that nothing here can stop. A node that downloads on ComfyUI's queue must stop at once on
Cancel, give up on a stalled connection after a bounded time, and leave no partial file. The
hub's `resolve` URL serves every file of a public repository with an ordinary GET (following
redirects to its CDN), so the standard library suffices; `HF_ENDPOINT` points it elsewhere
(a mirror, or the tests' stand-in on 127.0.0.1).
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
TIMEOUT_ENV = "LINFUSION_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a connection counts as stalled
_TRUE = {"1", "on", "yes", "true"}


class DownloadError(RuntimeError):
    """A download that did not complete; the message says what happened (no file is left)."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_variable() -> str | None:
    """The name of the set offline switch (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), else None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def file_url(repo_id: str, filename: str, revision: str = "main") -> str:
    quote = urllib.parse.quote
    return f"{endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def fetch(url: str, dest: Path, *, check_interrupt: Callable[[], None] = lambda: None,
          progress: Callable[[int, int | None], None] | None = None) -> int:
    """Stream `url` into `dest` (a new file); returns the byte count.

    `check_interrupt` runs before every chunk and may raise to cancel; `progress(done, total)`
    after every chunk (total None when the server sends no length). A connection that yields
    no byte for `timeout()` seconds, a length mismatch or an HTTP error raises DownloadError.
    On any exception `dest` is removed."""
    request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-LinFusion"})
    wait = timeout()
    done = 0
    try:
        check_interrupt()
        try:
            response = urllib.request.urlopen(request, timeout=wait)
        except urllib.error.HTTPError as exc:
            hint = " (no such file in that repository)" if exc.code == 404 else ""
            raise DownloadError(f"HTTP {exc.code} {exc.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"cannot connect ({reason})") from None
        with response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while True:
                check_interrupt()
                try:
                    chunk = response.read1(CHUNK)
                except TimeoutError:
                    raise DownloadError(f"no data for {wait:.0f} s after {done} bytes (stalled connection; "
                                        f"{TIMEOUT_ENV} sets the limit)") from None
                except (http.client.HTTPException, OSError) as exc:
                    raise DownloadError(f"connection broke after {done} bytes ({type(exc).__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if total is not None and done != total:
            raise DownloadError(f"connection closed after {done} of {total} bytes")
        return done
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
