"""Where LinFusion weights live in ComfyUI: the `linfusion` models folder, auto-download, cache."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

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

FOLDER = "linfusion"
AUTO = "auto"
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

    Follows symbolic links (shared model stores often link whole folders in), skips hidden
    entries and unfinished downloads (`*.partial`). A folder holding the official pair is one
    entry; other files in it (a trainer's `training_state.safetensors`) are not offered.
    """
    found: set[str] = set()
    for root in folders():
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(".partial")]
            rel_dir = Path(dirpath).relative_to(root).as_posix()
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
    for root in folders():
        p = Path(root) / choice
        if p.exists():
            return p
    raise LinFusionWeightsError(
        f"LinFusion weights '{choice}' not found in {folders()}: refresh the node list or pick another entry"
    )


def auto_folder(fam: Family) -> Path:
    """Where 'auto' keeps the weights of a family: <first linfusion folder>/<repo name>."""
    for root in folders():
        p = Path(root) / fam.folder_name
        if (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file():
            return p
    return Path(folders()[0]) / fam.folder_name


def download(fam: Family, target: Path) -> Path:
    """Fetch config.json and the safetensors of `fam`'s repo into `target`, all or nothing."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - listed in requirements.txt
        raise LinFusionWeightsError("huggingface_hub is not installed: pip install -r requirements.txt") from exc
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("LinFusion: downloading %s (%s) into %s ...", fam.repo_id, fam.label, target)
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            hf_hub_download(fam.repo_id, name, local_dir=str(partial))
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise LinFusionWeightsError(
            f"LinFusion 'auto' needs the weights of {fam.label} and could not download {fam.repo_id} "
            f"({type(exc).__name__}: {first_line}). Download {CONFIG_NAME} and {WEIGHTS_NAME} from "
            f"https://huggingface.co/{fam.repo_id} and put both in {target}{os.sep}"
        ) from exc
    if target.exists():
        shutil.rmtree(target)
    # hf_hub_download leaves a .cache folder of metadata beside the files: not ours to keep.
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    partial.rename(target)
    log.info("LinFusion: %s ready in %s", fam.repo_id, target)
    return target


class WeightsCache:
    """Loaded weights by path, reused while the file's size and mtime are unchanged."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: dict[str, tuple[tuple[int, int], LinFusionWeights]] = {}
        self.loads = 0  # how many times a file was actually read (tests count this)

    def get(self, path: Path) -> LinFusionWeights:
        file = path / WEIGHTS_NAME if path.is_dir() else path
        key = str(path.resolve())
        try:
            st = file.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        weights = load_weights(path)
        self.loads += 1
        self._entries.pop(key, None)
        self._entries[key] = (stamp, weights)
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))
        return weights


CACHE = WeightsCache()
