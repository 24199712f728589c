"""The example workflows in ComfyUI's real web UI, in headless Chromium.

Debian's chromium is driven by playwright-core from npm (scripts/browser_setup.sh installs
both; .ci/run calls it) through tests/browser_driver.mjs. The page is the one the test
server (the same server as tests/test_workflows.py, stand-ins in place) serves. Every workflow
is fetched the way the UI's template browser fetches it (/api/workflow_templates/<pack>/...)
and loaded with app.loadGraphData; then: no node type is missing, no dialog opened (missing
nodes or missing models), every node of the file is in the graph and inside the visible
canvas once the view is fitted, the UI saves the graph back unchanged (widgets, inputs,
links), and the API prompt the UI would queue equals the one scripts/run_workflow.py makes.
Finally one workflow (SD1.5 512 -> 2K) is queued from the page with small sizes set in its
widgets, and its output images must arrive (the `executed` event) and load in the page at
the expected sizes. Screenshots: test-output/browser/ (or $LINFUSION_TEST_OUTPUT/browser).

The tests skip only when the browser cannot start (no node, no chromium, no playwright-core,
or chromium failing to launch), and say which.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import run_workflow as rw
import server_fixtures
import standins
from test_workflows import NAMES, load

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT = Path(os.environ.get("LINFUSION_DEV", REPO / ".dev")) / "browser" / "node_modules" / "playwright-core"
OUTPUT = Path(os.environ.get("LINFUSION_TEST_OUTPUT", REPO / "test-output")) / "browser"
DRIVER = Path(__file__).with_name("browser_driver.mjs")

QUEUED = "SD1.5 512 to 2K with LinFusion"
# Small sizes and steps typed into the widgets before queueing (node id -> widget -> value).
QUEUE_WIDGETS = {"5": {"width": 32, "height": 32}, "6": {"steps": 1, "cfg": 1, "seed": 5},
                 "9": {"steps": 5, "cfg": 1, "seed": 5}}
QUEUE_SIZES = {"8": [32, 32], "11": [128, 128]}  # base x4


def browser_unavailable() -> str | None:
    """Why the browser cannot start here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node (Node.js) is not installed: run scripts/browser_setup.sh"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM}: run scripts/browser_setup.sh (apt-get install chromium)"
    if not (PLAYWRIGHT / "package.json").exists():
        return f"playwright-core is not installed in {PLAYWRIGHT.parents[1]}: run scripts/browser_setup.sh"
    try:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={OUTPUT.parent / '.chromium-probe'}", "--dump-dom", "about:blank"],
                           capture_output=True, text=True, timeout=90)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Chromium does not start: {e}"
    finally:
        shutil.rmtree(OUTPUT.parent / ".chromium-probe", ignore_errors=True)
    if r.returncode != 0 or "<html" not in r.stdout:
        return f"Chromium does not start (exit {r.returncode}): {r.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def wf(tmp_path_factory, lf, request):
    srv = standins.WorkflowServer.shared(lambda: tmp_path_factory.mktemp("workflow-server"), lf, request.config)
    yield srv
    srv.free()


@pytest.fixture(scope="module")
def ui(wf) -> dict:
    why = browser_unavailable()
    if why:
        pytest.skip(f"browser test skipped: {why}")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT.glob("*.png"):
        old.unlink()
    index = wf.client.request("/api/workflow_templates")
    pack = next(k for k, v in index.items() if set(v) == set(NAMES))
    job = {"url": wf.url + "/", "chromium": CHROMIUM, "playwright": str(PLAYWRIGHT), "out": str(OUTPUT),
           "templates": {"pack": pack, "names": NAMES},
           "queue": {"name": QUEUED, "widgets": QUEUE_WIDGETS, "timeout_ms": 480_000}}
    t0 = time.monotonic()
    r = subprocess.run(["node", str(DRIVER)], input=json.dumps(job), capture_output=True, text=True, timeout=600,
                       cwd=str(REPO))
    wall = time.monotonic() - t0
    assert r.returncode == 0, f"browser driver failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    result = json.loads(r.stdout)
    result["wall_s"] = wall
    result["pack"] = pack
    t = result["timings"]
    loads = sum(v["seconds"] for v in result["templates"].values())
    server_fixtures.note("Browser test", f"{wall:.1f} s wall (Chromium up {t['launch_s']:.1f} s, page ready "
                                         f"{t['page_ready_s']:.1f} s, {len(NAMES)} loads {loads:.1f} s, "
                                         f"queued run {result['queue']['seconds']:.1f} s); screenshots {OUTPUT}")
    return result


@pytest.fixture(scope="module")
def object_info(wf) -> dict:
    return wf.client.object_info()


def test_the_ui_lists_the_workflows_as_templates(ui):
    assert sorted(ui["template_index"][ui["pack"]]) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_no_missing_node_and_no_dialog(ui, name):
    r = ui["templates"][name]
    assert r["fetch_status"] == 200
    bad = [n for n in r["nodes"] if n["has_errors"] or not n["registered"]]
    assert not bad, f"node types missing in the UI: {bad}"
    assert r["dialogs"] == [], r["dialogs"]  # e.g. the missing-nodes or missing-models dialog
    assert (OUTPUT / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", NAMES)
def test_every_node_is_on_the_canvas(ui, name):
    r = ui["templates"][name]
    file_ids = sorted(n["id"] for n in load(name)["nodes"])
    assert sorted(n["id"] for n in r["nodes"]) == file_ids
    assert {n["id"]: n["type"] for n in r["nodes"]} == {n["id"]: n["type"] for n in load(name)["nodes"]}
    assert r["canvas_graph_is_app_graph"]
    assert sorted(r["visible"]) == file_ids


@pytest.mark.parametrize("name", NAMES)
def test_the_ui_saves_it_back_unchanged(ui, name):
    """What the UI would save after loading: the same widget values, inputs and links."""
    saved = ui["templates"][name]["serialized"]
    original = load(name)
    by_id = {n["id"]: n for n in original["nodes"]}
    for n in saved["nodes"]:
        o = by_id[n["id"]]
        assert n.get("widgets_values") == o.get("widgets_values"), (name, n["id"], n["type"])
        assert [(i["name"], i.get("link")) for i in n.get("inputs", [])] == \
               [(i["name"], i.get("link")) for i in o.get("inputs", [])], (name, n["id"], n["type"])
    assert sorted(map(tuple, saved["links"])) == sorted(map(tuple, original["links"]))


@pytest.mark.parametrize("name", NAMES)
def test_runner_converts_as_the_ui_queues(ui, name, object_info):
    def strip(p):
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}

    assert strip(rw.ui_to_api(load(name), object_info)) == strip(ui["templates"][name]["api"])


def test_queue_from_the_page_and_see_the_images(ui, wf):
    q = ui["queue"]
    assert q["outcome"] == "execution_success", q.get("error")
    assert len(q["changed"]) == sum(len(v) for v in QUEUE_WIDGETS.values())
    shown = {im["node"]: im["natural"] for im in q["images"]}
    assert shown == QUEUE_SIZES
    history = wf.client.history(q["prompt_id"])
    assert history["status"]["status_str"] == "success"
    files = {nid: [im["filename"] for im in out.get("images", [])] for nid, out in history["outputs"].items()}
    assert {im["node"]: [im["filename"]] for im in q["images"]} == files
    assert (OUTPUT / "queued_run.png").stat().st_size > 10_000


def overlaps(boxes: list[dict]) -> list[tuple]:
    """Pairs of node boxes (title bar included) that intersect."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and \
               a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]:
                out.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return out


def test_no_template_request_is_answered_404(ui):
    """The template browser asks for each workflow and its <name>.jpg thumbnail."""
    missing = [u for u in ui["not_found"] if "workflow_templates" in u]
    assert missing == []
    for name in NAMES:
        assert (ui["templates"][name]["thumb_status"], ui["templates"][name]["thumb_type"]) == (200, "image/jpeg")


@pytest.mark.parametrize("name", NAMES)
def test_no_nodes_overlap_as_loaded(ui, name):
    assert overlaps(ui["templates"][name]["boxes"]) == []


def test_no_nodes_overlap_after_a_run(ui):
    """Samplers and image nodes grow to show their previews after a run: the layout leaves
    them room."""
    assert ui["queue"]["boxes"] and overlaps(ui["queue"]["boxes"]) == []
