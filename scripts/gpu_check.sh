#!/usr/bin/env bash
# GPU validation (NVIDIA, under 9 minutes, one table): see scripts/gpu_check.py.
#   scripts/gpu_check.sh [--only tests layer step hybrid dynamic sdxl]
# Uses the dev venv (scripts/dev_setup.sh) and its ComfyUI, or $COMFYUI_PATH.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/dev_setup.sh" >/dev/null
exec "${LINFUSION_DEV:-$repo/.dev}/venv/bin/python" "$repo/scripts/gpu_check.py" "$@"
