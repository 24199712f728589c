"""scripts/gpu_check.py without a GPU: it refuses cleanly, and its non-GPU pieces (the table,
the parsing of the children's output, the Dynamic VRAM detection) work. The GPU parts
themselves need an NVIDIA GPU (none is available to this suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gpu_check
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: the refusal cannot be seen")
def test_refuses_cleanly_without_cuda(tmp_path):
    t = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path))
    assert t.returncode == 2
    assert t.stdout == "" and t.stderr.strip() == gpu_check.NO_CUDA


def test_table_aligns_every_row():
    rows = [{"part": "hybrid + LoRA", "case": "dynamic VRAM on", "result": "ok", "numbers": "max abs 1e-06"},
            {"part": "tests", "case": "-", "result": "FAIL", "numbers": "exit 1: boom"}]
    lines = gpu_check.table(rows).splitlines()
    assert len(lines) == 4 and len({len(ln) for ln in lines}) == 1
    assert lines[0].startswith("| part ") and "| FAIL " in lines[3]


def test_child_output_and_failures_are_read():
    assert gpu_check.child_json("log line\n{\"max_abs\": 1e-07}\nmore log\n") == {"max_abs": 1e-07}
    assert gpu_check.child_json("no json here") is None
    row = gpu_check.fail_row("sdxl", "4096 px", None, "a\nb\nCUDA out of memory", 120.4)
    assert row["result"] == "FAIL" and row["numbers"].startswith("stopped after 120 s: b / CUDA out of memory")


def test_dynamic_vram_settings_follow_this_comfyui():
    import comfy.cli_args

    has = any("--disable-dynamic-vram" in a.option_strings for a in comfy.cli_args.parser._actions)
    assert gpu_check.dynamic_vram_settings() == (["on", "off"] if has else ["n/a"])



def test_dynamic_vram_preinit_runs_before_torch():
    """0.38's main.py initialises comfy-aimdo before torch is imported; gpu_check's copy of that
    step must not import torch itself. On a ComfyUI without Dynamic VRAM it says so."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; "
            "print(repr(gpu_check.dynamic_vram_preinit()), 'torch' in sys.modules)")
    t = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts")], capture_output=True, text=True,
                       timeout=120)
    assert t.returncode == 0, t.stderr
    has = gpu_check.dynamic_vram_settings() != ["n/a"]
    reason, torch_imported = t.stdout.strip().rsplit(" ", 1)
    assert torch_imported == "False"
    assert (reason == "None") if has else (reason == "'this ComfyUI has no Dynamic VRAM'")
