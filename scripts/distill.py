"""Command line: distill LinFusion weights for an SD1.x / SD2.x / SDXL checkpoint.

    python scripts/distill.py --checkpoint model.safetensors --data images/ --out my_linfusion/
    python scripts/distill.py --help

Run it with the Python that runs your ComfyUI. ComfyUI is found through --comfyui,
$COMFYUI_PATH, the ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>), or the
dev setup's copy. The work is done by the pack's linfusion/distill_cli.py (the arguments, the
data pipeline and the run), nodes/distill_model.py (reading the checkpoint through ComfyUI)
and linfusion/distill.py (the training); see docs/distill.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_linfusion"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--comfyui" in argv[:-1]:
        os.environ["COMFYUI_PATH"] = argv[argv.index("--comfyui") + 1]
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_env

    comfy_env.setup()  # CPU mode when there is no CUDA, before ComfyUI picks a device
    # The pack's folder name need not be a Python name: import it as a package under a fixed one.
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pack
    spec.loader.exec_module(pack)
    from comfyui_linfusion.linfusion.distill_cli import main as cli_main
    from comfyui_linfusion.nodes.distill_model import load_with_comfyui

    return cli_main(argv, load_with_comfyui)


if __name__ == "__main__":
    sys.exit(main())
