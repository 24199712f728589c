"""Band-parallel cases run by tests/test_parallel.py, in the parent (single-process reference)
and in spawned worker processes (band-parallel). Importable in a fresh process: it puts
ComfyUI and the pack's pure-PyTorch `linfusion` package on sys.path itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import comfy_env  # noqa: E402

comfy_env.setup(cpu=True)
import helpers  # noqa: E402  (imports comfy)
import parallel_tiny  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import linfusion as lf  # noqa: E402  (the top-level package: one class identity for isinstance)
import linfusion.parallel as par  # noqa: E402

WIDTH = 8  # latent columns: bands split rows only, so width just needs to be small
# (world, latent height): even and uneven bands (uneven bands differ by 8 rows)
EVEN2, UNEVEN2, EVEN3, UNEVEN3 = (2, 16), (2, 24), (3, 24), (3, 32)
# Hybrid softmax range. At height 32 the SD1.5 transformer levels have 256, 64 and 16 tokens:
# only the deepest (16) takes the softmax branch. A band-local decision would be wrong at the
# middle level, whose bands hold 32/16/16 tokens: the decision must use the global count.
HYBRID_TOKENS = 32


TINY_HEIGHTS = [24, 40]  # the pure-PyTorch net on 3 ranks: bands of 8/8/8 and 16/16/8 rows


def unet(kind: str, hybrid_tokens: int = 0, linfusion: bool = True) -> torch.nn.Module:
    """The small real-layout UNet of `kind` (fp32, CPU, fixed random weights) with LinFusion
    layers in place of every attn1 (hybrid: the original kept for <= hybrid_tokens tokens)."""
    model = helpers.base_model(kind, helpers.LAYOUTS[kind][2])
    helpers.fill_random(model, seed=0)
    net = model.diffusion_model.eval().requires_grad_(False)
    if not linfusion:
        return net
    mods = helpers.lf_modules(lf, kind, net)
    weights = lf.LinFusionWeights(mods, helpers.random_state(lf, mods, seed=3, dtype=torch.float32))
    plan = lf.plan_replacements(weights, net)
    originals = {r.path: net.get_submodule(r.path) for r in plan}
    for path, layer in lf.build_replacements(weights, plan, originals, softmax_max_tokens=hybrid_tokens).items():
        net.set_submodule(path, layer)
    return net


def inputs(kind: str, height: int, batch: int = 2) -> tuple[torch.Tensor, tuple, dict]:
    """(latent (B, 4, H, WIDTH), args, kwargs) of one UNet call; batch 2 like cond + uncond."""
    g = torch.Generator().manual_seed(height)
    x = torch.randn(batch, 4, height, WIDTH, generator=g)
    t = torch.tensor([700.0, 700.0][:batch])
    ctx = torch.randn(batch, 77, helpers.CONTEXT[kind], generator=g)
    kw = {"y": torch.randn(batch, 2816, generator=g)} if kind == "sdxl" else {}
    return x, (t, ctx), kw


# (layout, hybrid tokens, LinFusion applied) -> shapes. SD1.5 runs every shape (2 and 3 ranks,
# even and uneven); the slower SD2.1 and SDXL builds one shape each, so that together they
# still cover 2 and 3 ranks (the test machine's CPU is the limit: SDXL's 70 layers are slow).
CASES = {
    ("sd15", 0, True): [EVEN2, UNEVEN2, EVEN3, UNEVEN3],
    ("sd21", 0, True): [UNEVEN3],
    ("sdxl", 0, True): [UNEVEN2],
    ("sd15", HYBRID_TOKENS, True): [UNEVEN3],  # hybrid: the softmax branch gathers tokens
    ("sd15", 0, False): [UNEVEN2],  # no LinFusion: the model's own attn1 gathers tokens
}


# ControlNet-style residuals (random, of each level's shape) on the SD1.5 layout: (world, height)
CONTROL_SHAPES = [UNEVEN2, UNEVEN3]


def control_dict(net: torch.nn.Module, height: int, batch: int = 2) -> dict:
    """A synthetic `control` argument for `net` at latent `height`: a random residual for every
    input block, the middle block and every skip, in the order the UNet pops them, with None at
    a few places (as T2I-Adapters leave levels out). Shapes from a forward with hooks."""
    x, args, kw = inputs("sd15", height, batch)
    shapes: dict[str, list] = {"input": [], "middle": []}
    # the UNet calls its blocks' layers one by one (forward_timestep_embed): hook each block's last
    hooks = [b[-1].register_forward_hook(lambda m, a, o: shapes["input"].append(tuple(o.shape)))
             for b in net.input_blocks]
    hooks.append(net.middle_block[-1].register_forward_hook(lambda m, a, o: shapes["middle"].append(tuple(o.shape))))
    with torch.no_grad():
        net(x, *args, **kw)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(100 + height)

    def rand(shape):
        return torch.randn(shape, generator=g) * 0.5

    ins = shapes["input"]
    assert len(ins) == len(net.input_blocks) and len(shapes["middle"]) == 1, shapes
    return {"input": [None if i % 4 == 1 else rand(s) for i, s in enumerate(reversed(ins))],  # popped from the end
            "middle": [rand(shapes["middle"][0])],
            "output": [None if i % 5 == 2 else rand(s) for i, s in enumerate(ins)]}  # popped like the skips


def control_fresh(control: dict) -> dict:
    """A copy with new lists: the UNet pops residuals from the lists it is given."""
    return {k: list(v) for k, v in control.items()}


def references() -> dict:
    """Single-process outputs of every case and shape: {(case, world, height): (B, 4, H, W)}."""
    torch.set_num_threads(1)
    out = {}
    for case, shapes in CASES.items():
        net = unet(*case)
        for w, height in shapes:
            x, args, kw = inputs(case[0], height)
            with torch.no_grad():
                out[(case, w, height)] = net(x, *args, **kw)
    net = unet("sd15")
    for w, height in CONTROL_SHAPES:
        x, args, kw = inputs("sd15", height)
        with torch.no_grad():
            out[("control", w, height)] = net(x, *args, control=control_fresh(control_dict(net, height)), **kw)
    return out


def patched_leftovers(net: torch.nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if "forward" in m.__dict__]


def run_cases(rank: int, world: int) -> dict:
    """In each of 3 workers: every case at every (world, height) of SHAPES; 2-rank shapes run in a
    subgroup of ranks 0 and 1. Returns {(case, height, world): output as numpy} and diagnostics."""
    torch.set_num_threads(1)
    groups = {3: None, 2: dist.new_group([0, 1], timeout=dist.default_pg_timeout)}
    out: dict = {"outputs": {}, "leftovers": [], "bytes": {}}
    for case, shapes in CASES.items():
        shapes = [(w, height) for w, height in shapes if rank < w]
        net = unet(*case) if shapes else None
        for w, height in shapes:
            x, args, kw = inputs(case[0], height)
            with par.band_parallel(net, groups[w], timeout_s=30) as bp, torch.no_grad():
                y = bp.forward(net, x, *args, **kw)
            out["outputs"][(case, w, height)] = y.numpy()
            out["bytes"][(case, w, height)] = dict(bp.bytes_sent)
            out["leftovers"] += patched_leftovers(net)
    # ControlNet residuals: each rank adds the rows of its band at every level
    net = unet("sd15")
    for w, height in CONTROL_SHAPES:
        if rank >= w:
            continue
        x, args, kw = inputs("sd15", height)
        control = control_dict(net, height)
        with par.band_parallel(net, groups[w], timeout_s=30) as bp, torch.no_grad():
            y = bp.forward(net, x, *args, control=par.split_control(control, bp.bands(height), rank), **kw)
        out["outputs"][("control", w, height)] = y.numpy()
        out["bytes"][("control", w, height)] = dict(bp.bytes_sent)
    out["leftovers"] += patched_leftovers(net)
    # other_attention="error" refuses the gathered softmax branch with a clear message
    net = unet("sd15", HYBRID_TOKENS)
    x, args, kw = inputs("sd15", 32)
    try:
        with par.band_parallel(net, other_attention="error", timeout_s=30) as bp, torch.no_grad():
            bp.forward(net, x, *args, **kw)
        out["refusal"] = None
    except par.BandParallelError as e:
        out["refusal"] = str(e)
    out["leftovers"] += patched_leftovers(net)
    dist.destroy_process_group(groups[2])
    out["tiny"] = parallel_tiny.overlap_cases(rank, world, TINY_HEIGHTS)
    return out
