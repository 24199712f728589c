"""Distilling LinFusion weights: small models with the real layouts, real ComfyUI, synthetic data.

The training loop, resume and the loader round trip run on the small SD1.5 layout
(model_channels 32, 8x8 latents); the command line runs its whole data pipeline on small
models with stand-in VAE/text encoders (everything but ComfyUI's checkpoint reader), and once
on the random full-size SD1.5 checkpoint for one step at 64x64 px.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models as sm
import helpers
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def D(lf):
    """The pack's linfusion.distill (same class identities as the pack's other modules)."""
    return importlib.import_module(".distill", lf.__name__)


@pytest.fixture(scope="module")
def CLI(lf):
    """The distillation command line's pure part (linfusion/distill_cli.py)."""
    return importlib.import_module(".distill_cli", lf.__name__)


@pytest.fixture(scope="module")
def READ(pack):
    """The command line's ComfyUI checkpoint reader (nodes/distill_model.py)."""
    return importlib.import_module(".nodes.distill_model", pack.__name__)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def comfy_forward(unet, x, t, cond):
    return unet(x, t, context=cond["context"], y=cond.get("y"), transformer_options={})


def dataset(D, kind: str, n: int = 4, hw: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(4, hw, hw, generator=g) for _ in range(n)]
    conds = []
    for _ in range(n):
        c = {"context": torch.randn(1, 77, helpers.CONTEXT[kind], generator=g)}
        if kind == "sdxl":
            c["y"] = torch.randn(1, 2816, generator=g)
        conds.append(c)
    return D.TensorDataset(lat, conds)


def prediction(kind: str) -> str:
    return "v" if kind == "sd21" else "eps"


def smooth_teacher(unet, scale: float = 0.1) -> None:
    """Random weights give self-attention far sharper than a trained model's; a linear layer needs
    thousands of steps to imitate that. Scaling the queries makes the attention maps smooth,
    the regime where 100 steps must show the student learning."""
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name.endswith(".attn1"):
                m.to_q.weight.mul_(scale)


def snapshot(unet):
    return ({k: v.clone() for k, v in unet.state_dict().items()},
            {n: m for n, m in unet.named_modules() if n.endswith(".attn1")},
            {n: p.requires_grad for n, p in unet.named_parameters()})


def assert_unchanged(unet, snap) -> None:
    sd, attn1, flags = snap
    now = unet.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: m for n, m in unet.named_modules() if n.endswith(".attn1")} == attn1
    assert all(type(m).__name__ != "LinFusionAttention" for m in attn1.values())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert all(p.grad is None for p in unet.parameters())


# -- the training loop ------------------------------------------------------------------------------
@pytest.mark.pure  # the training loop of linfusion/distill.py alone
def test_100_steps_bring_the_student_to_the_teacher(D, capsys):
    model = helpers.small_model("sd15")
    unet = model.model.diffusion_model
    smooth_teacher(unet)
    snap = snapshot(unet)
    data = dataset(D, "sd15")
    # Distillation terms only: a random teacher is no denoiser, so the recipe's noise term would
    # pull the student away from it (the default weights are tested in the CLI tests).
    cfg = D.DistillConfig(lr=5e-4, batch_size=2, noise_weight=0.0)
    d = D.Distiller(unet, cfg, forward=comfy_forward)
    lat, cond = data.batch(range(len(data)))
    noise, t = d.draw(10**6, lat)  # a fixed evaluation batch, never drawn in training
    teacher_before = d.teacher_predict(*d.noise(lat, noise, t)[:1], t, cond)
    before = d.evaluate(lat, cond, noise, t)
    start = time.perf_counter()
    d.fit(data, 100)
    seconds = time.perf_counter() - start
    after = d.evaluate(lat, cond, noise, t)
    distill = {k: 0.5 * v["output"] + 0.5 * v["feature"] for k, v in (("before", before), ("after", after))}
    with capsys.disabled():
        print(f"\n100 distillation steps ({seconds:.1f} s): distillation loss {distill['before']:.5f} -> "
              f"{distill['after']:.5f} (output {before['output']:.5f} -> {after['output']:.5f}, attn1 "
              f"{before['feature']:.5f} -> {after['feature']:.5f}); relative error of the noise prediction "
              f"{before['rel_error']:.4f} -> {after['rel_error']:.4f}")
    assert d.step == 100
    assert distill["after"] < 0.5 * distill["before"]
    assert after["feature"] < 0.6 * before["feature"] and after["output"] < 0.5 * before["output"]
    assert after["rel_error"] <= 0.5 * before["rel_error"]
    # the teacher: same weights, modules, flags and output as before training
    assert_unchanged(unet, snap)
    assert torch.equal(d.teacher_predict(*d.noise(lat, noise, t)[:1], t, cond), teacher_before)
    # and only LinFusion parameters were given to the optimizer
    opt_params = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in d.layers.parameters()}
    assert not opt_params & {id(p) for p in unet.parameters()}


def test_student_starts_from_the_models_own_projections(D, lf):
    unet = helpers.small_model("sd15").model.diffusion_model
    d = D.Distiller(unet, forward=comfy_forward)
    assert len(d.layers) == 16 and [s.name for s in d.specs] == [s.name for s in lf.FAMILIES["sd1"].modules()]
    for path, layer in zip(d.paths, d.layers):
        attn = unet.get_submodule(path)
        for name in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(layer, name).weight, getattr(attn, name).weight)
        assert torch.equal(layer.to_out[0].weight, attn.to_out[0].weight)
        assert torch.equal(layer.to_out[0].bias, attn.to_out[0].bias)
        for proj in (layer.to_q_, layer.to_k_):
            assert proj[3].weight.abs().max() == 0 and proj[3].bias.abs().max() == 0
            assert proj[0].weight.abs().max() > 0  # the rest is initialised, not zero
        x = torch.randn(2, 16, layer.dim)
        assert torch.equal(layer.to_q(x + layer.to_q_(x)), attn.to_q(x))  # q = to_q(x) at the start


def test_start_from_released_weights(D, lf, tmp_path):
    unet = helpers.small_model("sd21").model.diffusion_model
    mods = helpers.lf_modules(lf, "sd21", unet)
    state = helpers.random_state(lf, mods, seed=3)
    helpers.write_official(tmp_path / "w", lf, mods, state)
    d = D.Distiller(unet, D.DistillConfig(prediction="v"), init_weights=lf.load_weights(tmp_path / "w"),
                    forward=comfy_forward)
    got = d.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], v.float()) and got[k].dtype == torch.float32 for k, v in state.items())
    assert [s.heads for s in d.specs] == [s.heads for s in mods]


def test_gradient_checkpointing_gives_the_same_steps(D):
    unet = helpers.small_model("sd15").model.diffusion_model
    snap = snapshot(unet)
    data = dataset(D, "sd15", n=2)
    states = []
    for ckpt in (False, True):
        d = D.Distiller(unet, D.DistillConfig(lr=1e-3, batch_size=2, gradient_checkpointing=ckpt),
                        forward=comfy_forward)
        losses = [d.train_step(*data.batch([0, 1])) for _ in range(2)]
        states.append((d.state_dict(), losses))
    (a, la), (b, lb) = states
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert la[0]["total"] == pytest.approx(lb[0]["total"], rel=1e-6)
    assert_unchanged(unet, snap)
    # no forward overrides are left on the model
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_student_context_restores_on_errors(D):
    unet = helpers.small_model("sd15").model.diffusion_model
    snap = snapshot(unet)
    d = D.Distiller(unet, D.DistillConfig(gradient_checkpointing=True), forward=comfy_forward)
    with pytest.raises(RuntimeError, match="boom"), d.student():
        assert type(unet.get_submodule(d.paths[0])).__name__ == "_StudentSlot"
        raise RuntimeError("boom")
    assert_unchanged(unet, snap)
    assert not any("forward" in m.__dict__ for m in unet.modules())


# -- writing and reading back ----------------------------------------------------------------------------
def unet_output(model, x, t, cond):
    unet = model.model.diffusion_model
    with torch.no_grad():
        return comfy_forward(unet, x, t, cond)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_saved_weights_load_through_the_pack(D, lf, node_classes, linfusion_dir, kind):
    model = helpers.small_model(kind)
    unet = model.model.diffusion_model
    data = dataset(D, kind, n=2)
    d = D.Distiller(unet, D.DistillConfig(lr=1e-3, batch_size=2, prediction=prediction(kind)), forward=comfy_forward)
    d.fit(data, 1)
    lat, cond = data.batch([0, 1])
    t = torch.tensor([999.0, 400.0])
    x = d.noise(lat, torch.randn_like(lat), t.long())[0]
    expected = d.student_predict(x, t, cond)

    d.save_weights(linfusion_dir / "mine-fp32", dtype="fp32")
    d.save_weights(linfusion_dir / "mine")  # default: fp16 like the releases
    loaded = lf.load_weights(linfusion_dir / "mine")
    assert loaded.family.key == helpers.LF_FAMILY[kind] and loaded.modules == d.specs
    assert {v.dtype for v in loaded.state_dict.values()} == {torch.float16}
    assert json.loads((linfusion_dir / "mine" / "config.json").read_text())["_class_name"] == "LinFusion"

    results = {}
    for name in ("mine-fp32", "mine"):
        out = node_classes["ApplyLinFusion"].execute(model, name, 0)
        patched = helpers.first_output(out)
        comfy.model_management.load_models_gpu([patched])
        try:
            results[name] = unet_output(patched, x, t, cond)
        finally:
            comfy.model_management.unload_all_models()
    err32 = (results["mine-fp32"] - expected).abs().max().item()
    err16 = (results["mine"] - expected).abs().max().item()
    print(f"\n{kind}: pack loader vs in-memory student, max abs error fp32 {err32:.2e}, fp16 file {err16:.2e}")
    assert err32 < 1e-6
    assert err16 < 2e-2 * expected.abs().max().item()
    # the plain model is the teacher again, and its prediction differs from the student's
    assert (unet_output(model, x, t, cond) - expected).abs().max() > 1e-4


def test_resume_matches_an_uninterrupted_run(D, lf, tmp_path):
    unet = helpers.small_model("sd15").model.diffusion_model
    data = dataset(D, "sd15", n=3)  # odd size: batches straddle epochs
    cfg = D.DistillConfig(lr=1e-3, batch_size=2, seed=7)
    full = D.Distiller(unet, cfg, forward=comfy_forward)
    full.fit(data, 6, checkpoint_dir=tmp_path / "a", save_every=3)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-000003", "step-000006"]

    ck = tmp_path / "a" / "step-000003"
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                    "training_state.json", "training_state.safetensors"]
    assert lf.load_weights(ck).modules == full.specs  # a checkpoint is also usable weights
    assert D.latest_checkpoint(tmp_path / "a").name == "step-000006"

    resumed = D.Distiller(unet, cfg, forward=comfy_forward)
    resumed.load_checkpoint(ck)
    assert resumed.step == 3
    resumed.fit(data, 6)
    assert resumed.step == 6
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])

    # continuing with settings that change the run's draws is refused
    other = D.Distiller(unet, D.DistillConfig(lr=1e-3, batch_size=2, seed=8), forward=comfy_forward)
    with pytest.raises(D.DistillError, match="seed"):
        other.load_checkpoint(ck)
    with pytest.raises(D.DistillError, match="not a distillation checkpoint"):
        other.load_checkpoint(tmp_path)


def test_unsupported_model_is_refused(D, lf):
    cfg = dict(helpers.LAYOUTS["sd15"][1], model_channels=32, transformer_depth=[1] * 8,
               transformer_depth_output=[1] * 12)  # attention at all four levels: no known layout
    with torch.device("meta"):
        model = comfy.model_base.BaseModel(sm.SD15(cfg))
    with pytest.raises(lf.IncompatibleModelError, match=r"unsupported UNet.*SD1\.x, SD2\.x and SDXL"):
        D.Distiller(model.diffusion_model, forward=comfy_forward, device="cpu")


# -- the command line -------------------------------------------------------------------------------------
class StandInVAE:
    """ComfyUI's VAE interface (encode: (B, H, W, 3) in [0, 1] -> raw latents) in a few operations."""

    first_stage_model = object()

    def __init__(self, calls: list) -> None:
        self.mix = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
        self.calls = calls

    def encode(self, pixels):
        self.calls.append(("vae", tuple(pixels.shape)))
        x = F.avg_pool2d(pixels.movedim(-1, 1) * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.mix, x) * 5


class StandInCLIP:
    """ComfyUI's CLIP interface: tokenize + encode_from_tokens(return_pooled=True)."""

    def __init__(self, dim: int, calls: list) -> None:
        self.dim, self.calls = dim, calls

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls.append(("clip", tokens))
        g = torch.Generator().manual_seed(int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16))
        return torch.randn(1, 77, self.dim, generator=g), torch.randn(1, 1280, generator=g)


def small_loader(READ, kind="sd15", calls=None, model=None):
    """load_model for run(): a small model of `kind` through the real ComfyUI glue (models_from_comfy)."""
    calls = [] if calls is None else calls

    def load(checkpoint, device, comfyui=None):
        patcher = model or helpers.small_model(kind)
        return READ.models_from_comfy(patcher, StandInCLIP(helpers.CONTEXT[kind], calls), StandInVAE(calls),
                                      identity=f"small-{kind}", device=torch.device("cpu"), source=str(checkpoint))

    return load


def make_images(folder: Path, n: int, size=(80, 64), captions=True) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        w, h = size
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8)
        p = folder / f"img{i}.png"
        Image.frombytes("RGB", (w, h), px.numpy().tobytes()).save(p)
        if captions:
            p.with_suffix(".txt").write_text(f"a synthetic picture number {i}\n")
        paths.append(p)
    return paths


def cli_args(CLI, data, out, *extra):
    return CLI.build_parser().parse_args(["--checkpoint", "model.safetensors", "--data", str(data), "--out", str(out),
                                          "--resolution", "64", "--quiet", *extra])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cli_pipeline_trains_saves_and_resumes(D, CLI, READ, lf, tmp_path, kind):
    data, out = tmp_path / "data", tmp_path / "out"
    make_images(data, 3)
    calls: list = []
    model = helpers.small_model(kind)
    load = small_loader(READ, kind, calls, model)
    steps = 2 if kind == "sd15" else 1  # SDXL's 70 layers: one step shows its conditioning works
    args = cli_args(CLI, data, out, "--steps", str(steps), "--save-every", "1", "--lr", "1e-3")
    assert CLI.run(args, load_model=load) == out
    # encoded once each: 3 images through the VAE, 3 captions through the text encoder
    assert sorted(c[0] for c in calls) == ["clip"] * 3 + ["vae"] * 3
    assert all(c[1] == (1, 64, 64, 3) for c in calls if c[0] == "vae")
    caches = list((out / ".cache").glob("latents-*.safetensors"))
    assert len(caches) == 1
    cache = CLI.LatentCache(caches[0])
    lat, cond = cache.batch([0, 2])
    assert lat.shape == (2, 4, 8, 8) and cond["context"].shape == (2, 77, helpers.CONTEXT[kind])
    if kind == "sdxl":
        assert cond["y"].shape == (2, 2816)  # pooled text + size embeddings from ComfyUI's SDXL encode_adm
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{i:06d}" for i in range(1, steps + 1)]
    w = lf.load_weights(out)
    assert w.family.key == helpers.LF_FAMILY[kind]
    assert sorted(p.name for p in out.iterdir()) == [".cache", "checkpoints", "config.json",
                                                     "diffusion_pytorch_model.safetensors"]
    if kind != "sd15":
        return

    # the same command again is refused; --resume continues from step 2 without re-encoding
    with pytest.raises(D.DistillError, match="already holds a run"):
        CLI.run(args, load_model=load)
    calls.clear()
    CLI.run(cli_args(CLI, data, out, "--steps", "3", "--save-every", "1", "--lr", "1e-3", "--resume"),
            load_model=load)
    assert calls == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-000003"
    # and it matches a run of 3 steps in one go
    once = tmp_path / "once"
    CLI.run(cli_args(CLI, data, once, "--steps", "3", "--save-every", "0", "--lr", "1e-3", "--save-dtype", "fp32"),
            load_model=load)
    a = lf.load_weights(once).state_dict
    b = load_file(str(out / "checkpoints" / "step-000003" / D.STATE_TENSORS))
    assert all(torch.equal(a[k], b[f"param.{k}"]) for k in a)


def test_cli_data_errors_write_nothing(D, CLI, READ, tmp_path):
    load = small_loader(READ)
    out = tmp_path / "out"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(D.DistillError, match=r"holds no images.*cat\.png \+ cat\.txt"):
        CLI.run(cli_args(CLI, empty, out), load_model=load)
    assert not out.exists()  # nothing written

    nocap = tmp_path / "nocap"
    make_images(nocap, 3)
    (nocap / "img1.txt").unlink()
    with pytest.raises(D.DistillError, match=r"1 of 3 images .* no caption file: img1\.png"):
        CLI.run(cli_args(CLI, nocap, out), load_model=load)
    assert not out.exists()  # nothing written

    broken = tmp_path / "broken"
    make_images(broken, 2)
    (broken / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    truncated = broken / "img2.png"
    make_images(tmp_path / "tmpimg", 1, size=(64, 64))
    truncated.write_bytes((tmp_path / "tmpimg" / "img0.png").read_bytes()[:200])
    truncated.with_suffix(".txt").write_text("cut short")
    with pytest.raises(D.DistillError, match=r"2 image\(s\) cannot be read: .*img1\.png.*img2\.png"):
        CLI.run(cli_args(CLI, broken, out), load_model=load)
    assert not out.exists()  # nothing written

    argv = ["--checkpoint", "x.safetensors", "--data", str(empty), "--out", str(out)]
    assert CLI.main(argv, READ.load_with_comfyui) == 2
    assert not out.exists()  # nothing written


def test_cli_unsupported_checkpoints_write_nothing(D, CLI, READ, lf, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    make_images(data, 1)
    cfg = dict(helpers.LAYOUTS["sd15"][1], model_channels=32, transformer_depth=[1] * 8,
               transformer_depth_output=[1] * 12)
    base = comfy.model_base.BaseModel(sm.SD15(cfg))
    odd = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(lf.IncompatibleModelError, match=r"unsupported UNet.*supports SD1\.x, SD2\.x and SDXL"):
        CLI.run(cli_args(CLI, data, out), load_model=small_loader(READ, model=odd))
    assert not out.exists()  # nothing written

    # a file ComfyUI cannot read as a checkpoint, through the real loader
    junk = tmp_path / "junk.safetensors"
    save_file({"some.weight": torch.zeros(3, 3)}, str(junk))
    rc = CLI.main(["--checkpoint", str(junk), "--data", str(data), "--out", str(out), "--quiet", "--device", "cpu"],
                  READ.load_with_comfyui)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read junk.safetensors as a model checkpoint" in err and "SD1.x, SD2.x or SDXL" in err
    assert not out.exists()  # nothing written
    # a pickled checkpoint is never opened
    (tmp_path / "m.ckpt").write_bytes(b"x")
    with pytest.raises(D.DistillError, match="only .safetensors"):
        READ.load_with_comfyui(tmp_path / "m.ckpt")
    assert not out.exists()  # nothing written


def test_full_size_checkpoint_through_comfyui(CLI, READ, lf, tmp_path):
    """The real path: ComfyUI reads a full SD1.5 checkpoint (random weights), its VAE and CLIP
    encode the data, one step at 64x64 px (about 10 s of the 860M-parameter UNet on 2 cores),
    weights the pack loads."""
    checkpoints = pytest.importorskip("checkpoints")
    ckpt = checkpoints.sd15_checkpoint()
    data, out = tmp_path / "data", tmp_path / "out"
    make_images(data, 2)
    torch.set_num_threads(2)
    try:
        start = time.perf_counter()
        rc = CLI.main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
                       "--resolution", "64", "--save-every", "0", "--device", "cpu", "--quiet"], READ.load_with_comfyui)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(1)
        comfy.model_management.unload_all_models()
    print(f"\nfull-size SD1.5 checkpoint: load + encode + 1 step at 64 px in {seconds:.1f} s")
    assert rc == 0
    w = lf.load_weights(out)
    assert w.family.key == "sd1" and len(w.modules) == 16 and [m.heads for m in w.modules] == [8] * 16
    assert {m.dim for m in w.modules} == {320, 640, 1280}
    assert all(torch.isfinite(v.float()).all() for v in w.state_dict.values())


def test_command_line_entry_and_pure_training_module():
    """`python scripts/distill.py --help` works; linfusion.distill itself imports no ComfyUI."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "scripts/distill.py", "--help"], cwd=repo, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert "--checkpoint" in r.stdout and "--resume" in r.stdout and "usage: python scripts/distill.py" in r.stdout
    code = ("import sys, linfusion.distill\n"
            "print('comfy imported:', any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "comfy imported: False" in r.stdout


def test_bf16_autocast_on_cpu(D):
    unet = helpers.small_model("sd15").model.diffusion_model
    data = dataset(D, "sd15", n=2)
    d = D.Distiller(unet, D.DistillConfig(precision="bf16", batch_size=2), forward=comfy_forward)
    assert d.autocast_dtype == torch.bfloat16 and d.scaler is None
    before = {k: v.clone() for k, v in d.state_dict().items()}
    terms = d.train_step(*data.batch([0, 1]))
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    after = d.state_dict()
    assert {v.dtype for v in after.values()} == {torch.float32}  # fp32 master weights
    assert any(not torch.equal(before[k], after[k]) for k in after)
    with pytest.raises(D.DistillError, match="fp16 mixed precision needs a CUDA device"):
        D.Distiller(unet, D.DistillConfig(precision="fp16"), forward=comfy_forward)
