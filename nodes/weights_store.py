"""Where LinFusion weights live in ComfyUI: the `linfusion` models folder, auto-download, cache."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..linfusion.families import Family
from ..linfusion.weights import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    LinFusionWeights,
    LinFusionWeightsError,
    data_bytes,
    load_weights,
    read_header,
)
from . import hub_download
from .progress_text import show_download

FOLDER = "linfusion"
AUTO = "auto"
MAX_DEPTH = 8  # folder levels below models/linfusion that the scan enters
log = logging.getLogger("ComfyUI-LinFusion")


def register_folder() -> None:
    """Register models/linfusion, keeping paths an extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors", *PICKLE_SUFFIXES})


def folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER)


def choices() -> list[str]:
    """'auto', then weight folders (holding the official pair of files), then loose files.

    Follows symbolic links (shared model stores often link whole folders in), but enters each
    real folder once and at most MAX_DEPTH levels deep, so a link loop cannot hang the server
    (this runs on its main thread for /object_info). Skips hidden entries (the pack's own
    download folders) and unfinished downloads (`*.partial`). A folder holding the official
    pair is one entry; other files in it (a trainer's `training_state.safetensors`) are not
    offered.
    """
    found: set[str] = set()
    for root in folders():
        seen = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            depth = 0 if rel_dir == "." else rel_dir.count("/") + 1
            keep = []
            for d in sorted(dirnames):
                if d.startswith(".") or d.endswith(".partial") or depth >= MAX_DEPTH:
                    continue
                real = os.path.realpath(os.path.join(dirpath, d))
                if real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            if WEIGHTS_NAME in filenames and rel_dir != ".":
                found.add(rel_dir)  # an official-format folder: other files in it are not weights
                continue
            for name in filenames:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in {".safetensors", *PICKLE_SUFFIXES}:
                    found.add(name if rel_dir == "." else f"{rel_dir}/{name}")
    return [AUTO, *sorted(found)]


def resolve(choice: str) -> Path:
    """The path of a `weights` entry. Only names that choices() offers are accepted: an
    absolute path, `..` or any other name is refused with the same text whether or not
    something exists there, so a prompt can neither load nor probe files outside the
    linfusion folders."""
    if not isinstance(choice, str):
        raise LinFusionWeightsError(
            f"LinFusion 'weights' must be the name of an entry in the list, got {type(choice).__name__} "
            f"{_quoted(choice)}: pick 'auto' or an entry of models/linfusion")
    if choice in choices()[1:]:
        for root in folders():
            p = Path(root) / choice
            if p.exists():
                return p
    raise LinFusionWeightsError(
        f"LinFusion weights {_quoted(choice)} not found: not an entry of the linfusion model folders "
        f"{folders()}. Pick 'auto' or an entry from the list (after adding files, press R in ComfyUI to "
        "refresh it); paths outside these folders are never read."
    )


def _quoted(value, limit: int = 120) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def auto_folder(fam: Family) -> Path:
    """Where 'auto' keeps the weights of a family: <first linfusion folder>/<repo name>."""
    for root in folders():
        p = Path(root) / fam.folder_name
        if (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file():
            return p
    return Path(folders()[0]) / fam.folder_name


STAGING_PREFIX = ".linfusion-download-"
OWNER_NAME = ".owner"  # in each staging folder: which process made it (stale folders are removed by it)
MARGIN = 1.01  # on the table's sizes


def size_limit(fam: Family, name: str) -> int:
    """The most bytes a download of `name` for `fam` may have: config.json 1 MB; the weights the
    family's float16 size (198.5 MB for SD1.x/SD2.x, 871.1 MB for SDXL) plus 1% and the largest
    header the loader accepts."""
    if name == CONFIG_NAME:
        return MAX_CONFIG_BYTES
    return int(data_bytes(fam.modules()) * MARGIN) + MAX_HEADER_BYTES


def download(fam: Family, target: Path) -> Path:
    """Bring config.json and the safetensors of `fam`'s repo into `target`.

    Each missing file comes from the user's Hugging Face cache when it is there (linked or copied,
    checked against its hash; no request), else from the hub: huggingface_hub's metadata first
    (size and SHA-256, the user's token), then the pack's bounded stream (hub_download.fetch).
    Both go to a hidden folder inside `target`, are checked (size, hash, the weights' header and
    family) and only then moved into place, the weights last, so the folder is offered only once
    whole. Files already in `target` are kept and nothing the pack did not write is deleted;
    `target` may be a symbolic link to a folder elsewhere. Staging folders left by a process that
    died are removed first. Progress shows on the node's progress bar."""
    manual = (f"Download {CONFIG_NAME} and {WEIGHTS_NAME} from https://huggingface.co/{fam.repo_id} and put both "
              f"in {target}{os.sep}")
    _check_target(target, fam)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    work = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (target / n).is_file()]
    interrupt = comfy.model_management.throw_exception_if_processing_interrupted
    try:
        (work / OWNER_NAME).write_text(json.dumps(_owner()))
        fetched = []
        for name in names:
            cached = hub_download.cached_file(fam.repo_id, name)
            if cached is not None and hub_download.copy_from_cache(
                    cached, work / name, limit=size_limit(fam, name), check_interrupt=interrupt) is not None:
                log.info("LinFusion: %s of %s taken from the Hugging Face cache (%s)", name, fam.repo_id, cached)
            else:
                fetched.append(name)
        if fetched:
            _fetch(fam, target, work, fetched, manual, interrupt)
        _check_staged(fam, target, work, names, manual)
        for name in names:  # WEIGHTS_NAME last: the folder counts as weights only once complete
            os.replace(work / name, target / name)
    except hub_download.DiskFullError as exc:
        raise LinFusionWeightsError(_disk_full(fam, target, exc.need, manual)) from None
    except hub_download.DownloadError as exc:
        raise LinFusionWeightsError(f"LinFusion 'auto' could not bring the weights of {fam.label} into {target}: "
                                    f"{exc}. Or: {manual}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            try:
                target.rmdir()  # only if still empty: a failed first download leaves nothing behind
            except OSError:
                pass
    log.info("LinFusion: %s ready in %s", fam.repo_id, target)
    return target


def _fetch(fam: Family, target: Path, work: Path, names: list[str], manual: str, interrupt) -> None:
    """Download `names` of `fam`'s repo into `work`: metadata and bounds first, then the bytes."""
    offline = hub_download.offline_variable()
    if offline:
        raise LinFusionWeightsError(
            f"LinFusion 'auto' needs the weights of {fam.label} ({fam.repo_id}), which are neither in {target} nor in "
            f"the Hugging Face cache, and {offline}={os.environ.get(offline, '1')} is set, which forbids downloads: "
            f"unset {offline} (or set it to 0) and restart ComfyUI to let 'auto' download them. Or: {manual}")
    remotes = {}
    for name in names:
        try:
            remote = hub_download.describe(fam.repo_id, name, check_interrupt=interrupt)
        except hub_download.DownloadError as exc:
            raise _failed(fam, name, hub_download.file_url(fam.repo_id, name), exc, manual) from None
        limit = size_limit(fam, name)
        if remote.size is not None and remote.size > limit:
            raise _failed(fam, name, remote.url, hub_download.DownloadError(
                f"the hub announces {remote.size} bytes; {name} of {fam.repo_id} has at most {limit}: refused before "
                "the first byte (a wrong mirror or proxy?)"), manual)
        remotes[name] = remote
    need = sum(r.size if r.size is not None else size_limit(fam, n) for n, r in remotes.items())
    free = _free_bytes(work)
    if free is not None and free < need:
        raise LinFusionWeightsError(_disk_full(fam, target, need, manual))
    commit = next((r.commit for r in remotes.values() if r.commit), "unknown")
    log.info("LinFusion: downloading %s (%s, commit %s) into %s ...", fam.repo_id, fam.label, commit, target)
    for name, remote in remotes.items():
        try:
            _, sha256 = hub_download.fetch(remote.location, work / name, limit=size_limit(fam, name),
                                           size=remote.size, check_interrupt=interrupt,
                                           progress=_progress_bar(f"{fam.repo_id}/{name}"))
            hub_download.verify(work / name, remote, sha256)
        except hub_download.DiskFullError:
            raise
        except hub_download.DownloadError as exc:
            (work / name).unlink(missing_ok=True)
            raise _failed(fam, name, remote.url, exc, manual) from None


def _failed(fam: Family, name: str, url: str, exc: Exception, manual: str) -> LinFusionWeightsError:
    return LinFusionWeightsError(
        f"LinFusion 'auto' needs the weights of {fam.label} and could not download {name} of {fam.repo_id} from "
        f"{url}: {exc}. Check the connection and run again, or: {manual}")


def _check_staged(fam: Family, target: Path, work: Path, names: list[str], manual: str) -> None:
    """The weights' own header checks and family on the staged files, before anything moves."""
    file = work / WEIGHTS_NAME if WEIGHTS_NAME in names else target / WEIGHTS_NAME
    cfg = work / CONFIG_NAME if CONFIG_NAME in names else target / CONFIG_NAME
    try:
        header = read_header(file, cfg if cfg.is_file() else None)
        if header.family is not fam:
            raise LinFusionWeightsError(f"they are {header.describe()}, not the weights of {fam.label}")
    except LinFusionWeightsError as exc:
        raise LinFusionWeightsError(
            f"LinFusion 'auto': the files received for {fam.repo_id} are not usable ({exc}); nothing was installed in "
            f"{target}. Run again later, or: {manual}") from None


def _check_target(target: Path, fam: Family) -> None:
    """`target` must be a folder, a link to one, or not exist: a file, a dangling link or a link loop
    of that name get a message instead of a bare FileExistsError."""
    what = None
    try:
        if not stat.S_ISDIR(os.stat(target).st_mode):
            what = "is a file, not a folder"
    except FileNotFoundError:
        if os.path.islink(target):
            what = f"is a symbolic link to {os.readlink(target)}, which does not exist"
    except OSError as exc:
        what = ("is a symbolic link that loops back on itself" if exc.errno == errno.ELOOP
                else f"cannot be read ({exc.strerror})")
    if what:
        raise LinFusionWeightsError(
            f"LinFusion 'auto' keeps the weights of {fam.label} in the folder {target}, but that name {what}: rename "
            "or remove it (or make it a folder, or a link to one), then run again")


def _disk_full(fam: Family, target: Path, need: int | None, manual: str) -> str:
    free = _free_bytes(target)
    return (f"LinFusion 'auto' needs {_mb(need) if need else 'more space'} for the weights of {fam.label} in {target}, "
            f"and the disk holding it {'is full' if free is None else f'has {_mb(free)} free'}: free space there, or "
            f"put models/linfusion on another disk (a symbolic link or extra_model_paths.yaml). Or: {manual}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    """When the process started (Linux: /proc), so that a reused process id is not taken for the owner."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        try:
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


def remove_stale_staging(target: Path) -> None:
    """Remove the pack's staging folders in `target` whose process has ended (on this machine).

    Only folders named `.linfusion-download-*` that are real folders, hold the owner file the
    pack writes and nothing but the files it downloads; anything else is left alone."""
    own = {OWNER_NAME, CONFIG_NAME, WEIGHTS_NAME}
    try:
        entries = list(os.scandir(target))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        try:
            if not {p.name for p in folder.iterdir()} <= own or (folder / OWNER_NAME).is_symlink():
                continue
            with open(folder / OWNER_NAME, "rb") as f:
                owner = json.loads(f.read(4096))
            pid = owner["pid"]
            if not isinstance(pid, int) or owner.get("host") != socket.gethostname() or _alive(pid, owner.get("start")):
                continue
        except (OSError, ValueError, TypeError, KeyError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("LinFusion: removed %s, an unfinished download of a process that ended", folder)


def _progress_bar(name: str):
    """progress(done, total) callback: the node's ComfyUI progress bar in KiB, a log line every 10%,
    and the name and what is left as text on the node (progress_text.show_download)."""
    state = {"bar": None, "logged": -1, "shown": 0.0}

    def progress(done: int, total: int | None) -> None:
        if total is None:
            return
        if state["bar"] is None:
            state["bar"] = comfy.utils.ProgressBar(max(1, total >> 10))
        now = time.monotonic()
        if done < total and now - state["shown"] < 0.25:
            return
        state["shown"] = now
        state["bar"].update_absolute(done >> 10)
        show_download(name, done, total)
        tenth = done * 10 // total
        if tenth != state["logged"]:
            state["logged"] = tenth
            log.info("LinFusion: %s %d%% (%d of %d MiB)", name, tenth * 10, done >> 20, total >> 20)

    return progress


class WeightsCache:
    """Loaded weights by path, reused while the file's size and mtime are unchanged."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: dict[str, tuple[tuple[int, int], LinFusionWeights]] = {}
        self.loads = 0  # how many times a file was actually read (tests count this)

    def get(self, path: Path, check: Callable[[LinFusionWeights], None] | None = None) -> LinFusionWeights:
        """The weights at `path`; `check(weights)` runs first on the cached entry or on the file's
        header before any tensor is read (see load_weights), so refused weights are neither read
        nor cached."""
        file = path / WEIGHTS_NAME if path.is_dir() else path
        key = str(path.resolve())
        try:
            st = file.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            if check is not None:
                check(hit[1])
            return hit[1]
        weights = load_weights(path, check=check)
        self.loads += 1
        self._entries.pop(key, None)
        self._entries[key] = (stamp, weights)
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return weights


CACHE = WeightsCache()
