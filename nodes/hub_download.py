"""Files from the Hugging Face hub: huggingface_hub for what it knows, bounded interruptible bytes.

`huggingface_hub` gives the file's URL (`hf_hub_url`), the request headers with the user's
token (`HF_TOKEN` or `hf auth login`) and user agent (`build_hf_headers`), the endpoint and
offline switches (`huggingface_hub.constants`: `HF_ENDPOINT`, `HF_HUB_OFFLINE`), the file's
metadata (`get_hf_file_metadata`: size and SHA-256 of an LFS file, the commit) and the user's
hub cache (`try_to_load_from_cache`, which makes no request). The bytes are streamed here,
not by `hf_hub_download`: a node on ComfyUI's queue must stop within a second on Cancel, also
while no byte arrives; bound every transfer by a size known before its first byte; give up
on a stalled or crawling connection; check size and hash; and leave no partial file.
Needs huggingface_hub 0.20 or newer (checked against 0.20.3, 0.23.5, 0.36.2, 1.3.7 and 2.4.0).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers

LIBRARY = "ComfyUI-LinFusion"


def _version() -> str | None:
    """The pack's version (pyproject.toml), for the user agent."""
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    except OSError:
        return None
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return found[1] if found else None


VERSION = _version()
CHUNK = 1 << 20
POLL = 0.5  # seconds between Cancel checks while waiting for the network
TIMEOUT_ENV = "LINFUSION_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a connection counts as stalled
MIN_RATE_ENV = "LINFUSION_DOWNLOAD_MIN_RATE"
DEFAULT_MIN_RATE = 10.0  # KiB/s on average, required once a transfer has run for the stall limit
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


class DownloadError(RuntimeError):
    """A download that did not complete; the message says what happened (no file is left)."""


class DiskFullError(DownloadError):
    """The disk ran full (ENOSPC) while writing; `need` is the file's expected size in bytes."""

    def __init__(self, need: int | None) -> None:
        super().__init__("the disk is full")
        self.need = need


def endpoint() -> str:
    """The hub (or mirror) address: HF_ENDPOINT, as huggingface_hub read it."""
    return hf_constants.ENDPOINT.rstrip("/")


def offline_variable() -> str | None:
    """The name of the offline switch huggingface_hub obeys (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)
    when it is on, else None."""
    if not hf_constants.HF_HUB_OFFLINE:
        return None
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return "HF_HUB_OFFLINE"


def _env_float(name: str, default: float, minimum: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= minimum and value == value and value != float("inf") else default


def timeout() -> float:
    value = _env_float(TIMEOUT_ENV, DEFAULT_TIMEOUT, 0.0)
    return value if value > 0 else DEFAULT_TIMEOUT


def min_rate() -> float:
    """Bytes per second a transfer must average once it has run for `timeout()` seconds (0: no rule)."""
    return _env_float(MIN_RATE_ENV, DEFAULT_MIN_RATE, 0.0) * 1024


def file_url(repo_id: str, filename: str, revision: str | None = None) -> str:
    return hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def request_headers(url: str) -> dict[str, str]:
    """huggingface_hub's headers (the user's token, the user agent) for a GET of `url`; the token
    only goes to the hub itself, never to the CDN a large file is served from."""
    headers = build_hf_headers(library_name=LIBRARY, library_version=VERSION)
    if _origin(url) != _origin(endpoint()):
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    headers["Accept-Encoding"] = "identity"
    return headers


@dataclass(frozen=True)
class Remote:
    """What the hub says about one file before any of its bytes are fetched."""

    url: str  # the hub's resolve URL
    location: str  # where the bytes are: the resolve URL, or the CDN it redirects to
    size: int | None
    sha256: str | None  # LFS files: the hub's X-Linked-Etag
    git_sha1: str | None  # regular files: the ETag is git's blob hash
    commit: str | None


def describe(repo_id: str, filename: str, *, check_interrupt: Callable[[], None] = lambda: None) -> Remote:
    """The hub's metadata of a file (one HEAD request, no retries), interruptible."""
    url = file_url(repo_id, filename)
    try:
        meta = _interruptible(lambda: get_hf_file_metadata(url, timeout=timeout(), library_name=LIBRARY,
                                                       library_version=VERSION),
                              check_interrupt)
    except (TypeError, AttributeError, NameError):  # a mistake here, or a huggingface_hub below the minimum
        raise
    except Exception as exc:  # network and HTTP errors differ between its versions (requests, httpx)
        raise DownloadError(_metadata_failure(exc)) from None
    etag = (meta.etag or "").lower()
    return Remote(url=url, location=meta.location or url, size=meta.size or None,  # 0: a redirect's own length
                  sha256=etag if _SHA256.fullmatch(etag) else None,
                  git_sha1=etag if _GIT_SHA1.fullmatch(etag) else None, commit=meta.commit_hash)


def _metadata_failure(exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return ("HTTP 401: the repository is private or gated and no token with access was sent: log in "
                "(`hf auth login`) or set HF_TOKEN")
    if status == 403:
        return "HTTP 403: access refused (a gated repository whose terms this token has not accepted?)"
    if status == 404:
        return "HTTP 404 (no such file in that repository)"
    if status is not None:
        return f"HTTP {status}"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"cannot connect ({type(exc).__name__}: {text})"


def _interruptible(fn: Callable, check_interrupt: Callable[[], None]):
    """fn() in a daemon thread, polling `check_interrupt` every POLL seconds meanwhile (the thread
    of a cancelled call ends by itself at its own timeout)."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="linfusion-hub", daemon=True).start()
    while not done.wait(POLL):
        check_interrupt()
    check_interrupt()
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- the cache ------------------------------------------------------------------------------------
def cached_file(repo_id: str, filename: str) -> Path | None:
    """The file in the user's hub cache (HF_HUB_CACHE) at the `main` revision, if there: no request."""
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # a damaged cache is no reason to fail: the file is downloaded instead
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def copy_from_cache(src: Path, dest: Path, *, limit: int,
                    check_interrupt: Callable[[], None] = lambda: None) -> int | None:
    """Link (same disk) or copy a cached file to `dest`, checked against the hash its blob is named
    by (SHA-256 of LFS files, git's SHA-1 of others) and `limit`. Returns its size, or None (and no
    `dest`) when it does not pass: then the file is downloaded instead."""
    blob = Path(os.path.realpath(src))
    expected = blob.name.lower()
    try:
        size = blob.stat().st_size
        if size > limit:
            return None
        try:
            os.link(blob, dest)
        except OSError:
            with open(blob, "rb") as fin, _create(dest) as out:
                while chunk := fin.read(CHUNK):
                    check_interrupt()
                    _write(out, chunk, size)
        if _SHA256.fullmatch(expected):
            ok = file_sha256(dest, check_interrupt) == expected
        elif _GIT_SHA1.fullmatch(expected):
            ok = git_blob_sha1(dest) == expected
        else:
            ok = True  # a cache without hashed blob names: the size bound and the weights' checks remain
        if ok and dest.stat().st_size == size:
            return size
    except OSError:
        pass
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    dest.unlink(missing_ok=True)
    return None


def file_sha256(path: Path, check_interrupt: Callable[[], None] = lambda: None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            check_interrupt()
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """git's hash of a file (the hub's ETag of a file not stored in LFS)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, remote: Remote, sha256: str) -> None:
    """Raise DownloadError when the file's size or hash differs from what the hub announced."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise DownloadError(f"got {size} bytes, the hub announced {remote.size}")
    if remote.sha256 is not None and sha256 != remote.sha256:
        raise DownloadError(f"the SHA-256 of the bytes received is {sha256}, the hub announced {remote.sha256}: "
                            "a mirror, proxy or cache served other content")
    if remote.git_sha1 is not None and remote.sha256 is None and git_blob_sha1(path) != remote.git_sha1:
        raise DownloadError(f"the content's git hash differs from the hub's ({remote.git_sha1}): a mirror, proxy or "
                            "cache served other content")


# -- streaming ------------------------------------------------------------------------------------
class _NoTokenAcrossOrigins(urllib.request.HTTPRedirectHandler):
    """Follows redirects, without the Authorization header once they leave the first origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_NoTokenAcrossOrigins)


def _create(path: Path):
    """A new file for writing (tests replace this to reach a full disk)."""
    return open(path, "xb")


def _write(out, chunk: bytes, need: int | None) -> None:
    """Write and flush (so that a full disk shows here, not at close), ENOSPC as DiskFullError."""
    try:
        out.write(chunk)
        out.flush()
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskFullError(need) from None


class _Reader(threading.Thread):
    """Opens the URL and reads at most `limit` + 1 bytes into a short queue; the caller's thread
    writes them, so it can stop at any time: on Cancel, a stall, a crawl or too many bytes."""

    def __init__(self, request: urllib.request.Request, limit: int, wait: float) -> None:
        super().__init__(name="linfusion-download", daemon=True)
        self.request, self.limit, self.wait = request, limit, wait
        self.events: queue.Queue = queue.Queue(maxsize=4)
        self.go = threading.Event()
        self.stop = threading.Event()
        self.response = None

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.events.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            self.response = _OPENER.open(self.request, timeout=self.wait)
            if not self._put(("head", self.response.headers)):
                return
            while not self.go.wait(POLL):
                if self.stop.is_set():
                    return
            left = self.limit + 1
            while left > 0 and not self.stop.is_set():
                chunk = self.response.read1(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if not self._put(("data", chunk)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the caller's thread
            self._put(("error", exc))
        finally:
            if self.response is not None:
                self.response.close()

    def close(self) -> None:
        """Stop: the socket is shut down, so a read blocked in this thread returns at once."""
        self.stop.set()
        self.go.set()
        sock = getattr(getattr(getattr(self.response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(2)
            except OSError:
                pass


def fetch(url: str, dest: Path, *, limit: int, size: int | None = None, headers: dict[str, str] | None = None,
          check_interrupt: Callable[[], None] = lambda: None,
          progress: Callable[[int, int | None], None] | None = None) -> tuple[int, str]:
    """Stream `url` into `dest` (a new file); returns (byte count, SHA-256).

    At most `limit` bytes are accepted (`size`, when the hub announced one, must match exactly):
    a longer Content-Length is refused before the first byte, a longer stream is stopped at the
    limit. `check_interrupt` runs at least every POLL seconds and may raise to cancel, also while
    no byte arrives; `progress(done, total)` after every chunk. No byte for `timeout()` seconds,
    an average below `min_rate()` once the transfer has run that long, a length mismatch or an
    HTTP error raise DownloadError. On any exception `dest` is removed."""
    if size is not None:
        limit = min(limit, size)
    wait, rate = timeout(), min_rate()
    request = urllib.request.Request(url, headers=request_headers(url) if headers is None else headers)
    reader = _Reader(request, limit, wait)
    done, total = 0, size
    digest = hashlib.sha256()
    out = None
    try:
        check_interrupt()
        reader.start()
        start = last = time.monotonic()
        while True:
            check_interrupt()
            kind, value = _next_event(reader)
            now = time.monotonic()
            _check_pace(kind, now - last, now - start, done, wait, rate)
            if kind is not None:
                last = now
            if kind == "head":
                total = _announced_total(value, limit, size)
                out = _create(dest)
                reader.go.set()
            elif kind == "data":
                _check_bound(done + len(value), limit, size)
                _write(out, value, total or limit)
                digest.update(value)
                done += len(value)
                if progress is not None:
                    progress(done, total)
            elif kind == "end":
                break
            elif kind == "error":
                raise DownloadError(_transfer_failure(value, done, wait, out is not None)) from None
        out.close()
        if total is not None and done != total:
            raise DownloadError(f"connection closed after {done} of {total} bytes")
        return done, digest.hexdigest()
    except BaseException:
        _discard(out, dest)
        raise
    finally:
        reader.close()


def _next_event(reader: _Reader) -> tuple[str | None, object]:
    """The reader's next (kind, value), or (None, None) when none came within POLL seconds."""
    try:
        return reader.events.get(timeout=POLL)
    except queue.Empty:
        return None, None


def _stalled(wait: float, done: int) -> str:
    """The message of a connection that sent no byte for `wait` seconds."""
    return f"no data for {wait:.0f} s after {done} bytes (stalled connection; {TIMEOUT_ENV} sets the limit)"


def _check_pace(kind: str | None, idle: float, elapsed: float, done: int, wait: float, rate: float) -> None:
    """Raise DownloadError on a stall (no event for `wait` s) or a crawl (below `rate` after `wait` s)."""
    if kind is None and idle >= wait:
        raise DownloadError(_stalled(wait, done))
    if rate > 0 and done > 0 and elapsed >= wait and done < rate * elapsed and kind != "end":
        raise DownloadError(
            f"{done} bytes in {elapsed:.0f} s, an average of {done / elapsed / 1024:.2f} KiB/s, "
            f"below the minimum of {rate / 1024:g} KiB/s ({MIN_RATE_ENV} sets it; 0 turns this rule off)")


def _announced_total(headers, limit: int, size: int | None) -> int | None:
    """The file's length from the response's Content-Length (else `size`), checked against both."""
    length = headers.get("Content-Length")
    announced = int(length) if length and length.strip().isdigit() else None
    if announced is not None and announced > limit:
        raise DownloadError(f"the server announces {announced} bytes, more than the {limit} expected "
                            "of this file: refused before the first byte")
    if announced is not None and size is not None and announced != size:
        raise DownloadError(f"the server announces {announced} bytes, the hub's metadata {size}")
    return announced if announced is not None else size


def _check_bound(received: int, limit: int, size: int | None) -> None:
    """Raise DownloadError when the bytes `received` so far pass `limit`."""
    if received > limit:
        what = "the hub announced" if size is not None else "the most this file can have"
        raise DownloadError(f"the server sent more than {limit} bytes, {what}: stopped there")


def _discard(out, dest: Path) -> None:
    """What a failed transfer leaves: close the file (if opened) and remove it."""
    if out is not None:
        try:
            out.close()
        except OSError:  # what a full disk still holds in the buffer
            pass
    dest.unlink(missing_ok=True)


def _transfer_failure(exc: BaseException, done: int, wait: float, started: bool) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        hint = " (no such file in that repository)" if exc.code == 404 else ""
        return f"HTTP {exc.code} {exc.reason}{hint}"
    if isinstance(exc, TimeoutError):
        return _stalled(wait, done)
    if not started and isinstance(exc, (urllib.error.URLError, OSError)):
        return f"cannot connect ({getattr(exc, 'reason', exc)})"
    if isinstance(exc, (http.client.HTTPException, OSError)):
        return f"connection broke after {done} bytes ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
