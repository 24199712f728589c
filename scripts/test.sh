#!/usr/bin/env bash
# Set up the development environment (idempotent) and run the whole test suite.
#   scripts/test.sh [pytest args...]
#   COMFYUI_VERSION=0.3.52 scripts/test.sh -m "not server"   # against another bundled ComfyUI
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=${LINFUSION_DEV:-$repo/.dev}
bash "$repo/scripts/dev_setup.sh"
if [ -n "${COMFYUI_VERSION:-}" ] && [ -z "${COMFYUI_PATH:-}" ]; then
  # the folders dev_setup.sh chose for that version: its ComfyUI, and its pinned packages first on the path
  set -a
  # shellcheck disable=SC1090
  source "$dev/comfyui-$COMFYUI_VERSION.env"
  set +a
  [ -n "$PYTHONPATH" ] || unset PYTHONPATH
fi
cd "$repo"
exec "$dev/venv/bin/python" -m pytest "$@"
