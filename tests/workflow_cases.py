"""The example workflows (workflows/*.json) and how the tests run them: their names, a loader,
and per workflow the runner's --scale and --set with the image sizes it must then produce
(tests/test_workflows.py runs them through scripts/run_workflow.py, tests/test_browser.py
queues some of them from the page with the same sizes and steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import standins

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
FILES = sorted(WORKFLOWS.glob("*.json"))
NAMES = [p.stem for p in FILES]


@dataclass
class Run:
    """How a workflow runs in the test, and what it must produce."""

    family: str  # the model family the workflow is made for
    scale: float  # the runner's --scale
    sets: list[str]  # the runner's --set (steps and cfg only)
    promised: dict[str, tuple[int, int]]  # SaveImage node id -> (width, height) at full size
    stage_steps: str  # what the step cut leaves, for the reader
    reduced: bool = False  # SDXL graph run on the SD1.5 stand-in (see tests/test_workflows.py's docstring)


IN_W, IN_H = standins.WorkflowServer.INPUT_IMAGE_SIZE
RUNS = {
    "SD1.5 512 to 2K with LinFusion": Run(
        "sd15", 1 / 16, ["KSampler.steps=1", "LinFusionHighResSampler.steps=5", "cfg=1"],
        {"8": (512, 512), "11": (2048, 2048)}, "base 1; stages x2, x2: 2 + 1 (notebook strengths 0.4, 0.3 of 5)"),
    "16K image with SD1.5 and LinFusion": Run(
        "sd15", 1 / 32, ["KSampler.steps=1", "LinFusionHighResSamplerAdvanced.steps=10", "strength_schedule=constant",
                         "upscale_strength=0.1", "cfg=1", "low_memory=false"],
        {"8": (1024, 512), "11": (16384, 8192)},
        "base 1; four x2 stages: 1 + 1 + 1 + 1 (constant 0.1 of 10); low_memory off: at a few hundred tokens its 16 "
        "feed-forward chunks re-read each weight 16 times (measured 27-30 s per step instead of 4-6 s on 2 cores)"),
    "SDXL 1024 to 4K with LinFusion": Run(
        "sdxl", 1 / 32, ["KSampler.steps=1", "LinFusionHighResSamplerAdvanced.steps=4", "strength_schedule=constant",
                         "upscale_strength=0.25", "cfg=1"],
        {"8": (1024, 1024), "11": (4096, 4096)},
        "base 1; two x2 stages: 1 + 1 (constant 0.25 of 4, rounded up); dilation 1 at this scale (stages below the "
        "native 512 px of the stand-in): 1 UNet call each",
        reduced=True),
    # Super-resolution doubles whatever image it gets: the promise is relative to the input.
    "SDXL super-resolution x2 with LinFusion": Run(
        "sdxl", 1.0, ["steps=4", "upscale_strength=0.25", "cfg=1"], {"7": (2 * IN_W, 2 * IN_H)},
        "one stage: 1 (0.25 of 4, rounded up), 2 UNet calls where the target passes 512 px",
        reduced=True),
    "SD2.1 768 to 1536 with LinFusion": Run(
        "sd21", 1 / 16, ["KSampler.steps=1", "LinFusionHighResSampler.steps=3", "cfg=1"],
        {"8": (768, 768), "11": (1536, 1536)}, "base 1; one x2 stage: 1 (0.4 of 3)"),
    "SD1.5 LoRA and ControlNet with LinFusion": Run(
        "sd15", 1 / 16, ["KSampler.steps=1", "LinFusionHighResSampler.steps=3", "cfg=1"],
        {"8": (512, 512), "11": (1024, 1024)}, "base 1; one x2 stage: 1 (0.4 of 3)"),
}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def expected_sizes(run: Run) -> dict[str, tuple[int, int]]:
    """The promised sizes times the scale (all promised sizes are multiples of 8 / scale)."""
    out = {}
    for nid, (w, h) in run.promised.items():
        sw, sh = w * run.scale, h * run.scale
        assert sw == int(sw) and sh == int(sh) and sw % 8 == 0 and sh % 8 == 0, "choose a scale that keeps the grid"
        out[nid] = (int(sw), int(sh))
    return out
