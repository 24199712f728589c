#!/usr/bin/env bash
# Start a local ComfyUI at http://127.0.0.1:8188 with this pack loaded (no install into
# ComfyUI's own custom_nodes: an extra model paths file points at a folder that links here).
#   scripts/run_comfyui.sh [extra ComfyUI args...]     e.g. --port 8189
# Models: put checkpoints in .dev/ComfyUI/models/checkpoints (or that of $COMFYUI_PATH),
# LinFusion weights in .../models/linfusion (or let the node's "auto" download them).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=${LINFUSION_DEV:-$repo/.dev}
bash "$repo/scripts/dev_setup.sh"
comfy=$(cat "$dev/comfyui_path")
mkdir -p "$dev/custom_nodes"
ln -sfn "$repo" "$dev/custom_nodes/ComfyUI-LinFusion"
cat > "$dev/extra_model_paths.yaml" <<YAML
comfyui_linfusion_dev:
  custom_nodes: $dev/custom_nodes
YAML
cd "$comfy"
gpu=()
"$dev/venv/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || gpu=(--cpu)
exec "$dev/venv/bin/python" main.py "${gpu[@]}" --listen 127.0.0.1 --port 8188 --disable-auto-launch \
  --extra-model-paths-config "$dev/extra_model_paths.yaml" "$@"
