#!/usr/bin/env bash
# Set up the development environment (idempotent) and run the whole test suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/dev_setup.sh"
cd "$repo"
exec "${LINFUSION_DEV:-$repo/.dev}/venv/bin/python" -m pytest "$@"
