"""Where LinFusion weights live in ComfyUI: the `linfusion` models folder, auto-download, cache."""

from __future__ import annotations

import logging
import os
import shutil
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
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    LinFusionWeights,
    LinFusionWeightsError,
    load_weights,
)
from . import hub_download

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


def download(fam: Family, target: Path) -> Path:
    """Fetch config.json and the safetensors of `fam`'s repo into `target`.

    The files are streamed into a hidden folder inside `target` and moved into place only when
    complete (the weights last, so the folder is offered only once whole). Files already in
    `target` are kept, and nothing the pack did not write is ever deleted; `target` may be a
    symbolic link to a folder elsewhere. Cancel in ComfyUI stops the transfer within a chunk;
    a stalled connection gives up after LINFUSION_DOWNLOAD_TIMEOUT seconds (default 30).
    Progress shows on the node's progress bar."""
    manual = (f"Download {CONFIG_NAME} and {WEIGHTS_NAME} from https://huggingface.co/{fam.repo_id} and put both "
              f"in {target}{os.sep}")
    offline = hub_download.offline_variable()
    if offline:
        raise LinFusionWeightsError(
            f"LinFusion 'auto' needs the weights of {fam.label} ({fam.repo_id}), which are not in {target}, and "
            f"{offline}={os.environ[offline]} is set, which forbids downloads: unset {offline} (or set it to 0) and "
            f"restart ComfyUI to let 'auto' download them. Or: {manual}")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".linfusion-download-", dir=target))
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (target / n).is_file()]
    log.info("LinFusion: downloading %s (%s) into %s ...", fam.repo_id, fam.label, target)
    try:
        for name in names:
            url = hub_download.file_url(fam.repo_id, name)
            try:
                hub_download.fetch(url, work / name,
                                   check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                   progress=_progress_bar(name))
            except hub_download.DownloadError as exc:
                raise LinFusionWeightsError(
                    f"LinFusion 'auto' needs the weights of {fam.label} and could not download {name} of "
                    f"{fam.repo_id} from {url}: {exc}. Check the connection and run again, or: {manual}") from None
        for name in names:  # WEIGHTS_NAME last: the folder counts as weights only once complete
            os.replace(work / name, target / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            try:
                target.rmdir()  # only if still empty: a failed first download leaves nothing behind
            except OSError:
                pass
    log.info("LinFusion: %s ready in %s", fam.repo_id, target)
    return target


def _progress_bar(name: str):
    """progress(done, total) callback: the node's ComfyUI progress bar in KiB, a log line every 10%."""
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
