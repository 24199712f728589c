"""torch.compile (issue 24): ComfyUI's TorchCompileModel on a LinFusion model traces every
LinFusion path (plain, hybrid, low_memory's streamed layers and banded UNet pieces, the high-res
sampler's dilated pass) without a graph break that comes from this pack, without a
recompilation per call, and computes what the eager model computes.

How, and why this way:
* The compile is ComfyUI's own: `set_torch_compile_wrapper` (comfy_api/torch_helpers/
  torch_compile.py), which the TorchCompileModel node (comfy_extras/nodes_torch_compile.py)
  calls with the backend the user picks. Here the backend is dynamo's "eager": dynamo traces
  the UNet exactly as for inductor and runs the captured graphs without generating code
  (seconds instead of minutes on these CPUs; bench/peers.py runs inductor).
* Breaks are read from dynamo's graph-break log, which names the file and line each break
  happens at: a break is the pack's when that file is under linfusion/ or nodes/ (ComfyUI's
  own are not ours). The first test checks that this capture does see a break in a pack file.
* ComfyUI's attention is its SDPA function (`attention_pytorch` in comfy/ldm/modules/
  attention.py, what it picks on a GPU). Its CPU default (sub-quadratic attention) asks psutil
  for free memory on every call, a builtin open() dynamo cannot trace: those breaks cut the
  UNet into per-block frames that recompile on transformer_options['block'] until dynamo's
  recompile limit, after which they run eagerly, untraced, which would hide breaks of ours.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import comfy.ldm.modules.attention as comfy_attention
import helpers
import pytest
import torch
import torch._dynamo
from comfy_api.torch_helpers import set_torch_compile_wrapper
from torch._dynamo.utils import counters

REPO = Path(__file__).resolve().parents[1]
PACK_DIRS = (REPO / "linfusion", REPO / "nodes")
REL_TOL = 1e-5
BREAK_AT = re.compile(r"^Graph break.* in user code at (.+):(\d+)\s*$")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


class DynamoLog(logging.Handler):
    """Inside the block (dynamo's caches cleared on entry and exit): `breaks`, the graph breaks
    dynamo logged as (file, line, message); `recompiles`, its recompilation messages; `graphs`,
    the number of distinct graphs it captured."""

    def __init__(self):
        super().__init__()
        self.breaks: list[tuple[str, int, str]] = []
        self.recompiles: list[str] = []
        self.graphs = 0

    def emit(self, record):
        msg = record.getMessage()
        first = msg.splitlines()[0] if msg else ""
        m = BREAK_AT.match(first)
        if m:
            self.breaks.append((m.group(1), int(m.group(2)), msg[:3000]))
        elif first.startswith("Recompiling function"):
            self.recompiles.append(msg)

    @property
    def ours(self) -> list[tuple[str, int, str]]:
        return [b for b in self.breaks if any(Path(b[0]).resolve().is_relative_to(d) for d in PACK_DIRS)]

    def __enter__(self):
        torch._dynamo.reset()
        counters.clear()
        logging.getLogger("torch._dynamo").addHandler(self)
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
        return self

    def __exit__(self, *exc):
        self.graphs = counters["stats"]["unique_graphs"]
        torch._logging.set_logs()
        logging.getLogger("torch._dynamo").removeHandler(self)
        torch._dynamo.reset()


def compiled(model):
    """A clone of `model` with ComfyUI's torch.compile wrapper, dynamo backend "eager"."""
    m = model.clone()
    set_torch_compile_wrapper(model=m, backend="eager")
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sdpa():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy_attention, "optimized_attention", comfy_attention.attention_pytorch)
        yield


@pytest.fixture(scope="module")
def plain_run(sdpa):
    """The plain small SD1.5 model compiled and sampled for two steps: (model, DynamoLog)."""
    model = helpers.small_model("sd15")
    with DynamoLog() as log:
        helpers.sample(compiled(model), "sd15", steps=2)
    return model, log


def test_the_capture_sees_a_break_in_a_pack_file(lf):
    """With its compile branch switched off (torch.compiler.is_compiling() patched to say no),
    attention._into passes out= a strided tensor, which dynamo refuses: the capture reports that
    break at linfusion/attention.py. With the branch on, no break and the same values.

    Order matters: dynamo keeps the function objects of its rules (is_compiling among them)
    from its first trace on, so the real one must be loaded first, by the run with the branch
    on; the last run shows that nothing stayed switched off."""
    out = torch.empty(4, 6).t()
    x = torch.randn(6, 4)

    def f(t):
        return lf.attention._into(torch.mul, t, 2.0, out=out) + 1

    results, logs = [], []
    for switched_off in (False, True, False):
        with pytest.MonkeyPatch.context() as mp, DynamoLog() as log:
            if switched_off:
                mp.setattr(torch.compiler, "is_compiling", lambda: False)
            results.append(torch.compile(f, backend="eager")(x))
        logs.append(log)
    on, off, again = logs
    assert off.ours and {Path(p).name for p, _, _ in off.ours} == {"attention.py"}
    assert all("non-contiguous `out=`" in msg for _, _, msg in off.ours)
    assert on.breaks == again.breaks == [] and on.graphs == again.graphs == 1
    assert all(torch.equal(r, 2 * x + 1) for r in results)


@pytest.mark.parametrize("softmax_max_tokens", [0, 64], ids=["linfusion", "hybrid"])
def test_sampling_compiles_without_breaks_from_the_pack(node_classes, lf, linfusion_dir, plain_run,
                                                        softmax_max_tokens):
    """Two Euler steps at 16x16 latent (256 tokens at level 0, 64 at level 1, 16 at level 2).
    Hybrid at <= 64 tokens: level 0 linear, the others through the model's own attention.
    No break from the pack; no more breaks and graphs than the plain model (one graph for both
    steps); compiled equals eager."""
    plain, plain_log = plain_run
    patched = helpers.apply_random_linfusion(lf, node_classes, linfusion_dir, plain,
                                             softmax_max_tokens=softmax_max_tokens)
    eager = helpers.sample(patched, "sd15", steps=2)
    with DynamoLog() as log:
        got = helpers.sample(compiled(patched), "sd15", steps=2)
    assert log.ours == [], log.ours[0][2]
    assert len(log.breaks) <= len(plain_log.breaks) and log.graphs == plain_log.graphs == 1
    assert rel(got, eager) <= REL_TOL


def test_high_res_low_memory_and_dilated_pass_compile_without_breaks(node_classes, pack, lf, linfusion_dir, sdpa,
                                                                     monkeypatch):
    """One high-res stage (4x4 -> 8x8 latent, demofusion: a local and a dilated UNet pass per
    step, two steps) with low_memory, on a hybrid LinFusion model, its thresholds lowered so
    that every piece runs on the small model: LinFusion layers with streamed queries at level 0
    (64 tokens in 32-token chunks), the plain layer at level 1 (16 tokens), softmax at <= 4
    tokens; banded resnets, upsamplers and output head; the decoder's skip concatenations left
    to the banded resnets; skip connections parked (on the CPU, from 0 bytes). The eager run
    shows these ran; the compiled run has no break from the pack, exactly two graphs (local
    and dilated: the only recompilation is for the convs' dilation) and equals eager."""
    lm, bd, LM, H = lf.lowmem, lf.banded, pack.nodes.lowmem, pack.nodes.highres
    made = {"SkipParking": [], "SkipConcat": []}
    for name, kw in (("SkipParking", {"min_bytes": 0}), ("SkipConcat", {})):
        cls = getattr(lm, name)

        def make(*a, _cls=cls, _name=name, _kw=kw, **k):
            made[_name].append(_cls(*a, **{**_kw, **k}))
            return made[_name][-1]

        monkeypatch.setattr(lm, name, make)
    monkeypatch.setattr(LM, "PARK_DEVICE", "cpu")
    monkeypatch.setattr(bd, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(lm, "PROJECTION_CHUNK_TOKENS", 32)
    streamed = []
    own_streamed = lm.token_chunked_linfusion_forward

    def counting(layer, chunk_tokens=None):
        fwd = own_streamed(layer, chunk_tokens)

        @functools.wraps(fwd)
        def run(x, *a, **k):
            if not torch.compiler.is_compiling():
                streamed.append(x.shape[1])
            return fwd(x, *a, **k)

        return run

    monkeypatch.setattr(lm, "token_chunked_linfusion_forward", counting)
    model = helpers.apply_random_linfusion(lf, node_classes, linfusion_dir, helpers.small_model("sd15"),
                                           softmax_max_tokens=4)
    base = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 5
    pos, neg = helpers.conds("sd15")
    settings = H.HighResSettings(seed=7, steps=6, cfg=5.0, sampler_name="euler", scheduler="normal",
                                 method="demofusion", upscale_method="latent", low_memory=True, native_size=32,
                                 dilated_min_weight=0.0)

    def run(m):
        with torch.inference_mode():
            out, rep = H.run_stages(m, pos, neg, {"samples": base}, None, (64, 64), settings)
        assert [(s.steps, s.dilation) for s in rep.stages] == [(2, 2)]
        return out["samples"].clone()

    eager = run(model)
    # 16 layers in each of 6 UNet calls (cond and uncond one at a time; step 1 local and dilated,
    # step 2 local only: the dilated weight is 0 at the last sigma): 5 at 64 tokens stream
    assert {n: streamed.count(n) for n in set(streamed)} == {64: 30, 16: 30, 4: 30, 1: 6}
    assert sum(p.parked for p in made["SkipParking"]) > 0 and sum(c.deferred for c in made["SkipConcat"]) > 0
    with DynamoLog() as log:
        got = run(compiled(model))
    assert log.ours == [], log.ours[0][2]
    assert log.breaks == [] and log.graphs == 2
    assert len(log.recompiles) == 1 and re.search(r"\.(padding|dilation) ==", log.recompiles[0]), log.recompiles
    assert rel(got, eager) <= REL_TOL
