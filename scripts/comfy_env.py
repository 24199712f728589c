"""Put a real ComfyUI on sys.path for tests and benchmarks, in CPU mode when there is no GPU.

ComfyUI comes from $COMFYUI_PATH, else from the copy scripts/dev_setup.sh made
(.dev/comfyui_path). Import this before anything imports comfy.model_management.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    """$COMFYUI_PATH, else the ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>),
    else the dev setup's copy."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    if (REPO.parents[1] / "comfy" / "sd.py").is_file():
        return REPO.parents[1]
    marker = Path(os.environ.get("LINFUSION_DEV", REPO / ".dev")) / "comfyui_path"
    if marker.is_file():
        return Path(marker.read_text().strip())
    raise RuntimeError("No ComfyUI found: run scripts/dev_setup.sh, or set COMFYUI_PATH to a ComfyUI checkout")


def setup(cpu: bool | None = None) -> Path:
    """Add ComfyUI to sys.path and pick CPU mode (default: when CUDA is unavailable)."""
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args
    import torch

    if cpu if cpu is not None else not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    return path
