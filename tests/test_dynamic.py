"""The newest ComfyUI's loaders (0.38.1, repository Comfy-Org/ComfyUI) against LinFusion's object
patches, emulated on CPU on the ComfyUIs we can install (0.3.75, 0.3.52).

`DynamicPatcher` is this ComfyUI's real ModelPatcher with the loading methods of 0.38's
`ModelPatcherDynamic` (comfy/model_patcher.py) reproduced in the order upstream runs them:
backups kept by attribute path in a dict every clone shares, small modules force-loaded with a
backup, `load` starting by restoring what backups are left, `unpatch_model` putting the object
patches back before the backups, `partially_load` = unpatch, patch_model, load; `clone` that
can rebuild the model from the loader (`cached_patcher_init`), the non-dynamic delegate, and
`deepclone_multigpu`. What upstream does with VRAM (the aimdo vbar, pinned host buffers) has no
CPU meaning and is left out; the real `load_models_gpu` of this ComfyUI drives the loads (its
clone detach and `partially_load` are those of 0.38). Every test name contains `dynamic`.

The rule checked after every sequence: the plain model's output is bit-identical to a model
that never saw LinFusion, and the LinFusion model's to a fresh Apply LinFusion (references: each
model built for itself and loaded by this ComfyUI's classic ModelPatcher, which on CPU gives the
same bits as the emulated dynamic loading). Each test says what it gave before the fix.
"""

from __future__ import annotations

import collections
import threading
import types

import comfy.float
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import helpers
import pytest
import torch
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

pytestmark = pytest.mark.usefixtures("one_thread")

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])
SMALL = 16 * 1024  # 0.38 ModelPatcherDynamic.load: modules of at most 16 KB are force-loaded
ON_CLONE = comfy.patcher_extension.CallbacksMP.ON_CLONE
ATTN1 = "input_blocks.1.1.transformer_blocks.0.attn1"  # a first-level self-attention layer
REFERENCES: dict = {}  # (model kind, hybrid tokens, LoRA) -> output of a model built for it alone


def override_of(p) -> tuple:
    """0.38 ModelPatcher.get_clone_model_override: the model and its backup containers."""
    return p.model, (p.backup, getattr(p, "backup_buffers", {}), p.object_patches_backup, getattr(p, "pinned", set()))


class DynamicPatcher(comfy.model_patcher.ModelPatcher):
    """0.38's ModelPatcherDynamic loading logic on this ComfyUI's ModelPatcher (see the module
    docstring). Methods cite the upstream function they reproduce."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backup_buffers = {}
        self.cached_patcher_init = None
        self.non_dynamic_delegate_model = None

    def is_dynamic(self):
        return True

    def get_clone_model_override(self):
        return override_of(self)

    def restore_loaded_backups(self):
        """ModelPatcherDynamic.restore_loaded_backups: every backup written back BY PATH."""
        restored = self.model.model_loaded_weight_memory
        for key in list(self.backup):
            comfy.utils.set_attr_param(self.model, key, self.backup.pop(key).weight)
        for key in list(self.backup_buffers):
            comfy.utils.set_attr(self.model, key, self.backup_buffers.pop(key))
        self.model.model_loaded_weight_memory = 0
        return restored

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                               force_cast=False):
        """ModelPatcher.patch_weight_to_device of 0.38 (force_cast: a copy even without patches;
        the backup is keyed by the attribute path)."""
        weight, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
        if key not in self.patches and not force_cast:
            return weight
        if key not in self.backup and not return_weight:
            self.backup[key] = Backup(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp = comfy.model_management.cast_to_device(weight, device_to, torch.float32 if key in self.patches else None,
                                                     copy=True)
        if key in self.patches:
            temp = comfy.lora.calculate_weight(self.patches[key], temp, key)
            temp = comfy.float.stochastic_rounding(temp, weight.dtype,
                                                   seed=comfy.model_patcher.string_to_seed(key))
        if return_weight:
            return temp
        comfy.utils.set_attr_param(self.model, key, temp)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, dirty=False):
        """ModelPatcherDynamic.load: restore what backups are left, then per module: ComfyUI ops
        layers over 16 KB keep their weights and get the LoRA as a per-cast function (0.38:
        weight_lowvram_function; here this ComfyUI's weight_function, applied the same way per
        cast), smaller ones are force-loaded through patch_weight_to_device with a backup by
        path; other layers' parameters and all buffers are cast with a backup by path."""
        self.restore_loaded_backups()
        with self.use_ejected():
            self.unpatch_hooks()
            for n, m in self.model.named_modules():
                params = dict(m.named_parameters(recurse=False))
                if any(name not in params for name, _ in m.named_parameters()):
                    continue  # not a leaf: ComfyUI skips these too
                if hasattr(m, "comfy_cast_weights"):
                    m.comfy_cast_weights = True
                    if comfy.model_management.module_size(m) > SMALL:
                        for p in ("weight", "bias"):
                            key = f"{n}.{p}"
                            setattr(m, f"{p}_function", [comfy.model_patcher.LowVramPatch(key, self.patches)]
                                    if key in self.patches else [])
                        continue
                    for p in params:
                        key = f"{n}.{p}"
                        if key in self.backup:
                            comfy.utils.set_attr_param(self.model, key, self.backup[key].weight)
                        self.patch_weight_to_device(key, device_to=device_to, force_cast=True)
                        self.model.model_loaded_weight_memory += params[p].numel() * params[p].element_size()
                else:
                    for p, w in params.items():
                        key = f"{n}.{p}"
                        if key not in self.backup:
                            self.backup[key] = Backup(w, False)
                        comfy.utils.set_attr_param(self.model, key, w.to(device=device_to))
            for key, buf in self.model.named_buffers(recurse=True):
                self.backup_buffers.setdefault(key, buf)
                comfy.utils.set_attr(self.model, key, buf.to(device=device_to))
            self.model.device = device_to
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    def unpatch_hooks(self, whitelist_keys_set=None):
        """ModelPatcherDynamic.unpatch_hooks: nothing (hooks go to the non-dynamic delegate)."""

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        """ModelPatcherDynamic.partially_unload: no vbar on a CPU, so the backups go back (by path)."""
        return self.restore_loaded_backups()

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        """ModelPatcherDynamic.unpatch_model: object patches restored first (the base class with
        unpatch_weights=False), the loaded backups after."""
        super().unpatch_model(device_to=None, unpatch_weights=False)
        if unpatch_weights:
            self.partially_unload(None, 1e32)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        """ModelPatcherDynamic.partially_load: unpatch (weights kept), patch_model, load."""
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            dirty = self.model.current_weight_patches_uuid not in (None, self.patches_uuid)
            self.unpatch_model(self.offload_device, unpatch_weights=False)
            self.patch_model(load_weights=False)
            try:
                self.load(device_to, dirty=dirty)
            except Exception:
                self.detach()
                raise
            return None

    def clone(self, disable_dynamic=False, model_override=None):
        """ModelPatcher.clone of 0.38: with disable_dynamic, a classic ModelPatcher on a model the
        loader builds again; with model_override, that model and its backup containers; the
        object patches shallow-copied; ON_CLONE callbacks last. The copies of this ComfyUI's
        clone are taken as they are (ON_CLONE held back until the model is swapped)."""
        cls = comfy.model_patcher.ModelPatcher if disable_dynamic else type(self)
        if disable_dynamic and model_override is None:
            model_override = override_of(self.cached_patcher_init[0](*self.cached_patcher_init[1],
                                                                     disable_dynamic=True))
        on_clone, self.callbacks[ON_CLONE] = self.callbacks.get(ON_CLONE, {}), {}
        try:
            n = comfy.model_patcher.ModelPatcher.clone(self)
        finally:
            self.callbacks[ON_CLONE] = on_clone
        n.callbacks[ON_CLONE] = {k: list(v) for k, v in on_clone.items()}
        n.__class__ = cls
        if model_override is not None:
            n.model = model_override[0]
            n.backup, n.backup_buffers, n.object_patches_backup, n.pinned = model_override[1]
        n.cached_patcher_init = self.cached_patcher_init
        n.non_dynamic_delegate_model = None
        for callback in self.get_all_callbacks(ON_CLONE):
            callback(self, n)
        return n

    def get_non_dynamic_delegate(self):
        """ModelPatcherDynamic.get_non_dynamic_delegate, used by samplers.py CFGGuider.inner_set_conds
        when a cond carries hooks."""
        n = self.clone(disable_dynamic=True, model_override=self.non_dynamic_delegate_model)
        self.non_dynamic_delegate_model = override_of(n)
        return n

    def deepclone_multigpu(self, new_load_device=None):
        """ModelPatcher.deepclone_multigpu (core "MultiGPU CFG Split" / "Select Model Device"): this
        model and its clones unloaded, a fresh model from the loader with empty backups, the
        object patches shallow-copied by clone."""
        for i in reversed(range(len(comfy.model_management.current_loaded_models))):
            loaded = comfy.model_management.current_loaded_models[i]
            if loaded.model is not None and loaded.model.is_clone(self):
                comfy.model_management.current_loaded_models.pop(i).model_unload()
        fresh = self.cached_patcher_init[0](*self.cached_patcher_init[1])
        n = self.clone(model_override=(fresh.model, ({}, {}, {}, set())))
        n.hook_backup = {}
        if new_load_device is not None:
            n.load_device = new_load_device
        return n


def loader(seed: int = 0, disable_dynamic: bool = False):
    """A small SD1.5-layout model as a core loader would return it: dynamic unless disabled, with
    the factory it came from in `cached_patcher_init` (0.38 sets it in comfy/sd.py)."""
    model = helpers.base_model("sd15", helpers.LAYOUTS["sd15"][2])
    helpers.fill_random(model, seed)
    cls = comfy.model_patcher.ModelPatcher if disable_dynamic else DynamicPatcher
    p = cls(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    p.cached_patcher_init = (loader, (seed,))
    return p


def lora(patcher, scale: float = 0.3, seed: int = 5) -> dict:
    """A diff patch on to_q, to_k, to_v and to_out.0 of every self-attention layer."""
    g = torch.Generator().manual_seed(seed)
    unet = patcher.model.diffusion_model
    keys = [f"diffusion_model.{n}.{t}" for n, m in unet.named_modules() if n.endswith(".attn1")
            for t in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")]
    shapes = {k: unet.get_parameter(k[len("diffusion_model."):]).shape for k in keys}
    return {k: ("diff", (scale * torch.randn(s, generator=g) / s[-1] ** 0.5,)) for k, s in shapes.items()}


def with_lora(patcher, patches):
    m = patcher.clone()
    assert len(m.add_patches(patches, 1.0)) == len(patches)
    return m


def sample(patcher, backups: set | None = None):
    """ComfyUI sampling; `backups` receives the loader's backup keys while the model is loaded."""
    def callback(step, *_):
        if step == 0 and backups is not None:
            backups.update(patcher.backup)

    return helpers.sample(patcher, "sd15", latent_hw=(8, 8), steps=2, callback=callback)


def unet_state(patcher) -> dict:
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


@pytest.fixture
def fresh(lf, node_classes, linfusion_dir):
    """Reference outputs, each from a model built for it alone and loaded by this ComfyUI's own
    (classic) ModelPatcher: plain, fresh Apply LinFusion (hybrid at 0 or 16 tokens), either with
    the LoRA of `lora`. Also writes the LinFusion weights (the same random values every time,
    so the outputs are cached)."""
    helpers.put_weights(lf, linfusion_dir, "sd15", loader())

    def ref(kind: str, hybrid: int = 0, lora_on: bool = False):
        key = (kind, hybrid, lora_on)
        if key not in REFERENCES:
            m = loader(disable_dynamic=True)
            if kind == "lf":
                m = helpers.apply(node_classes, m, "auto", hybrid)
            REFERENCES[key] = sample(with_lora(m, lora(m)) if lora_on else m)
            comfy.model_management.unload_all_models()
        return REFERENCES[key]

    return ref


@pytest.fixture(autouse=True)
def _unloaded():
    comfy.model_management.unload_all_models()
    yield
    try:
        comfy.model_management.unload_all_models()
    finally:  # a test that broke a model must not break the next one's start
        comfy.model_management.current_loaded_models.clear()


def test_dynamic_emulation_really_keys_backups_by_path(fresh):
    """The emulation records what upstream records: after a plain load, small ComfyUI ops layers
    and their backups by path; the plain model restored bit-identically on unload."""
    fresh("plain")
    base = loader()
    before = unet_state(base)
    keys = set()
    out = sample(base, keys)
    assert f"diffusion_model.{ATTN1}.to_q.weight" in keys  # 32 x 32 fp32: 4 KB, force-loaded
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in keys  # 64 KB: per cast
    comfy.model_management.unload_all_models()
    assert base.backup == {} and all(torch.equal(before[k], v) for k, v in unet_state(base).items())
    assert torch.equal(out, fresh("plain"))


@pytest.mark.parametrize("hybrid", [0, 16], ids=["linfusion", "hybrid"])
def test_dynamic_plain_after_linfusion_and_unload_is_the_plain_model(node_classes, fresh, hybrid):
    """Risk 1 (ModelPatcherDynamic.unpatch_model / load restore the backups by path after the
    object patches are gone): LinFusion run, plain run, LinFusion again, full unload, plain again.
    Without the fix the plain run raises AttributeError (`...attn1.to_q_.1.weight` has no module
    on the model's own attention) and LinFusion's small to_q lands in the plain model."""
    fresh("lf", hybrid), fresh("plain")  # references first: building them unloads every model
    base = loader()
    before = unet_state(base)
    patched = helpers.apply(node_classes, base, "auto", hybrid)
    backups = set()
    assert torch.equal(sample(patched, backups), fresh("lf", hybrid))
    assert any(".attn1.to_q_.1." in k for k in backups)  # LinFusion's LayerNorms are force-loaded
    assert torch.equal(sample(base), fresh("plain"))
    assert torch.equal(sample(patched), fresh("lf", hybrid))
    comfy.model_management.unload_all_models()
    assert base.backup == {} and base.object_patches_backup == {}
    assert all(torch.equal(before[k], v) for k, v in unet_state(base).items())
    assert torch.equal(sample(base), fresh("plain"))
    base.partially_unload(base.offload_device, 1 << 40)  # memory pressure while plain is loaded
    assert torch.equal(sample(patched), fresh("lf", hybrid))
    patched.partially_unload(base.offload_device, 1 << 40)  # memory pressure while LinFusion is loaded
    assert torch.equal(sample(base), fresh("plain"))


def test_dynamic_linfusion_after_plain_is_a_fresh_apply(node_classes, fresh):
    """Risk 1, the other way (ModelPatcherDynamic.load restores the backups left by the plain run
    after patch_model put LinFusion in place): without the fix the model's own to_q/to_k/to_v/
    to_out weights are written into LinFusion's layers."""
    fresh("lf"), fresh("plain")
    base = loader()
    patched = helpers.apply(node_classes, base, "auto")
    assert torch.equal(sample(base), fresh("plain"))
    assert torch.equal(sample(patched), fresh("lf"))
    assert torch.equal(sample(base), fresh("plain"))


@pytest.mark.parametrize("hybrid", [0, 16], ids=["linfusion", "hybrid"])
def test_dynamic_lora_added_and_removed(node_classes, fresh, hybrid):
    """LoRA on to_q/to_k/to_v/to_out.0 of every attn1, before and after Apply, removed again: each
    run equals the same model built fresh. Under Dynamic VRAM a LoRA lives in force-loaded copies
    (small layers) and in per-cast functions (larger ones), both exercised here."""
    for ref in [("lf", hybrid, True), ("plain",), ("lf", hybrid), ("plain", 0, True)]:
        fresh(*ref)
    base = loader()
    patches = lora(base)
    patched = helpers.apply(node_classes, base, "auto", hybrid)
    lora_after = with_lora(patched, patches)
    lora_before = helpers.apply(node_classes, with_lora(base, patches), "auto", hybrid)
    plain_lora = with_lora(base, patches)
    for model, ref in [(lora_after, ("lf", hybrid, True)), (base, ("plain",)), (patched, ("lf", hybrid)),
                       (plain_lora, ("plain", 0, True)), (lora_before, ("lf", hybrid, True)),
                       (patched, ("lf", hybrid)), (base, ("plain",))]:
        assert torch.equal(sample(model), fresh(*ref)), ref


def test_dynamic_hooked_conds_delegate_has_its_own_layers(node_classes, fresh):
    """Risk 3 (samplers.py CFGGuider.inner_set_conds switches a dynamic patcher to
    get_non_dynamic_delegate() when a cond carries hooks; the delegate is a classic ModelPatcher
    on a model the loader builds again, with the object patches shallow-copied). Without the fix
    both models load, LoRA-patch and run the same LinFusion layer objects: the second load patches
    the first one's patched weights (the LoRA twice)."""
    fresh("lf", 0, True), fresh("plain")
    base = loader()
    patched = with_lora(helpers.apply(node_classes, base, "auto"), lora(base))
    assert torch.equal(sample(patched), fresh("lf", 0, True))
    delegate = patched.get_non_dynamic_delegate()
    assert not isinstance(delegate, DynamicPatcher) and delegate.model is not patched.model
    assert torch.equal(sample(delegate), fresh("lf", 0, True))
    assert torch.equal(sample(patched), fresh("lf", 0, True))
    key = f"diffusion_model.{ATTN1}"
    assert delegate.object_patches[key] is not patched.object_patches[key]
    again = patched.get_non_dynamic_delegate()  # the delegate's model is reused: so are its layers
    assert again.model is delegate.model and again.object_patches[key] is delegate.object_patches[key]
    assert torch.equal(sample(again), fresh("lf", 0, True))
    assert torch.equal(sample(base), fresh("plain"))


@pytest.mark.parametrize("hybrid", [0, 16], ids=["linfusion", "hybrid"])
def test_dynamic_multigpu_deepclone_has_its_own_layers(pack, node_classes, fresh, hybrid):
    """Risk 2 (ModelPatcher.deepclone_multigpu: a model from the loader, object patches
    shallow-copied; nodes_multigpu runs it from another thread). Each model gets its own layers,
    the hybrid softmax path bound to its own attention; both models run at once from two
    threads and give the single-thread results. Without the fix the second load patches the
    first one's LoRA'd weights again."""
    fresh("lf", hybrid, True), fresh("plain")
    base = loader()
    patched = with_lora(helpers.apply(node_classes, base, "auto", hybrid), lora(base))
    clone = patched.deepclone_multigpu()
    assert clone.model is not patched.model
    assert torch.equal(sample(patched), fresh("lf", hybrid, True))
    assert torch.equal(sample(clone), fresh("lf", hybrid, True))
    assert torch.equal(sample(patched), fresh("lf", hybrid, True))
    key = f"diffusion_model.{ATTN1}"
    mine, theirs = patched.object_patches[key], clone.object_patches[key]
    assert theirs is not mine
    if hybrid:
        original = pack.nodes.apply.original_layer
        assert theirs.softmax_attn is original(clone, ATTN1) is not mine.softmax_attn is original(patched, ATTN1)
    comfy.model_management.load_models_gpu([patched, clone])
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        alone = [m.model.diffusion_model(x, t, ctx) for m in (patched, clone)]
        outs = [None, None]

        def run(i, m):
            with torch.no_grad():
                for _ in range(3):
                    outs[i] = m.model.diffusion_model(x, t, ctx)

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((patched, clone))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert torch.equal(alone[0], alone[1]) and all(torch.equal(o, alone[0]) for o in outs)
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(base), fresh("plain"))


# -- point 5: what the newest ComfyUI passes and builds around the layers ----------------------------
def test_dynamic_memory_estimates_take_the_newest_keywords(lf, pack, node_classes, fresh):
    """0.38's ModelPatcher.memory_required calls `model.memory_required(input_shape=...)`; newer
    memory helpers add `cond_shapes=` and `memory_efficient_attention=`. Apply LinFusion's estimate
    and the low-memory one (nodes/lowmem.py low_memory_estimate, the High-Res sampler's) take them
    all; before the fix the low-memory one raised TypeError on `memory_efficient_attention`."""
    fresh("lf")
    m = helpers.apply(node_classes, loader(), "auto").clone()
    m.add_wrapper(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, pack.nodes.lowmem.low_memory_estimate())
    shape = [2, 4, 64, 64]
    seen = []

    def callback(step, *_):
        if step == 0:
            base = m.model
            seen.extend([base.memory_required(input_shape=shape),
                         base.memory_required(shape, cond_shapes={"c_crossattn": [(2, 77, 768)]},
                                              memory_efficient_attention=True, extra=1)])

    helpers.sample(m, "sd15", latent_hw=(8, 8), steps=2, callback=callback)
    expected = lf.memory.low_memory_inference_bytes([1, 4, 64, 64], 4, True)  # one latent per evaluation, fp32
    assert seen == [expected, expected] and expected > 0
    assert "memory_required" not in vars(m.model)


def newest_forward(unet, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
    """UNetModel._forward as 0.38.1 runs it (comfy/ldm/modules/diffusionmodules/openaimodel.py), for
    the SD layouts: what differs from our ComfyUIs is `middle_block_after_patch` after the middle
    block and the skip concatenation done only while an output patch left `hsp` set."""
    oai = comfy.ldm.modules.diffusionmodules.openaimodel
    to = {} if transformer_options is None else transformer_options
    to["original_shape"], to["transformer_index"] = list(x.shape), 0
    patches = to.get("patches", {})
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    for p in patches.get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    hs, h = [], x
    for i, block in enumerate(unet.input_blocks):
        to["block"] = ("input", i)
        h = oai.apply_control(oai.forward_timestep_embed(block, h, emb, context, to), control, "input")
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)
    to["block"] = ("middle", 0)
    h = oai.apply_control(oai.forward_timestep_embed(unet.middle_block, h, emb, context, to), control, "middle")
    for p in patches.get("middle_block_after_patch", []):
        h = p({"h": h, "x": x, "emb": emb, "context": context, "y": y, "timesteps": timesteps,
               "transformer_options": to})["h"]
    for i, block in enumerate(unet.output_blocks):
        to["block"] = ("output", i)
        hsp = oai.apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", []):
            h, hsp = p(h, hsp, to)
        if hsp is not None:
            h = torch.cat([h, hsp], dim=1)
        h = oai.forward_timestep_embed(block, h, emb, context, to, hs[-1].shape if hs else None)
    return unet.out(h.type(x.dtype))


@pytest.mark.parametrize("consumed", [False, True], ids=["middle-patch", "skip-consumed"])
def test_dynamic_newest_unet_forward_keeps_the_low_memory_bands(lf, pack, monkeypatch, consumed):
    """The High-Res sampler's low-memory UNet (nodes/lowmem.py) under the newest forward, with a
    middle_block_after_patch and (skip-consumed) an output patch of another node that takes the
    skip itself and hands on `hsp=None`, as 0.38's forward allows. The banded ResBlocks still run
    (forward_timestep_embed_patch handlers only see non-timestep layers: ResBlocks, transformers
    and upsamplers never reach them) and the output equals the same forward without low memory;
    before the fix the skip-consumed case raised AttributeError in SkipConcat."""
    lm, bd = lf.lowmem, lf.banded
    unet = helpers.linfusion_unet(lf, "sd15")
    monkeypatch.setattr(unet, "_forward", types.MethodType(newest_forward, unet))
    x, t, ctx, y = helpers.unet_inputs("sd15")
    middle = lambda args: {"h": args["h"] * 0.5}  # noqa: E731
    consume = lambda h, hsp, to: (torch.cat([h, hsp], dim=1), None)  # noqa: E731
    patches = {"middle_block_after_patch": [middle], **({"output_block_patch": [consume]} if consumed else {})}
    with torch.no_grad():
        ref = unet(x, t, ctx, y, transformer_options={"patches": patches})
        banded, deferred = [], []
        for name, calls in (("chunked_norm_act_conv", banded), ("split_input_resblock", deferred)):
            own = getattr(bd, name)
            monkeypatch.setattr(bd, name, lambda *a, _own=own, _calls=calls, **k: _calls.append(1) or _own(*a, **k))
        monkeypatch.setattr(bd, "BAND_BYTES", 1)
        mo = {"transformer_options": {"patches": patches}}
        with pack.nodes.lowmem.low_memory_unet(unet, mo, lm.LowMemory(min_chunk_bytes=0), park_device=None):
            out = unet(x, t, ctx, y, transformer_options=mo["transformer_options"])
    n_blocks = len(bd.top_level_resblocks(unet, 2))
    # every ResBlock of the two top levels banded (2 norm-act-convs each, 1 inside a deferred one)
    # and the out head; the 6 decoder blocks there take their skip in bands unless it was consumed
    assert (len(banded), len(deferred)) == ((2 * n_blocks + 1, 0) if consumed else (2 * n_blocks - 6 + 1, 6))
    assert (out - ref).abs().max() <= helpers.LOWMEM_TOL


class ComfyAttention(torch.nn.Module):
    """Stand-in for 0.38's `comfy_attention` child of CrossAttention (comfy/ldm/modules/attention.py
    ComfyAttention: no parameters, a `config` and a `function`)."""

    def __init__(self, config=None):
        super().__init__()
        self.config, self.function = config, None


def config_patch(patcher, config: str) -> int:
    """What 0.38's ModelPatcher.add_patches does with a ("config", ...) patch on
    `<attn1>.comfy_attention.config`: look the module up with get_model_object (skipped on
    AttributeError) and object-patch it with a configured copy. Returns how many were patched."""
    n = 0
    for name in [n for n, _ in patcher.model.diffusion_model.named_modules() if n.endswith(".attn1")]:
        key = f"diffusion_model.{name}.comfy_attention"
        try:
            patcher.get_model_object(key)
        except AttributeError:
            continue
        patcher.add_object_patch(key, ComfyAttention(config))
        n += 1
    return n


def test_dynamic_config_patches_on_comfy_attention(node_classes, fresh):
    """0.38's CrossAttention has a `comfy_attention` child that "config" patches replace by object
    patch. Before and after Apply LinFusion, such a patch must neither break loading (before the
    fix: AttributeError, LinFusion's layer had no such attribute) nor stay on the model's own
    attention after unloading."""
    fresh("lf"), fresh("plain")
    base = loader()
    unet = base.model.diffusion_model
    own = {n: m for n, m in unet.named_modules() if n.endswith(".attn1")}
    for m in own.values():
        m.comfy_attention = ComfyAttention()
    children = {n: m.comfy_attention for n, m in own.items()}
    before = unet_state(base)
    after = helpers.apply(node_classes, base, "auto").clone()
    assert config_patch(after, "after") == 16
    configured = base.clone()
    assert config_patch(configured, "before") == 16
    first = helpers.apply(node_classes, configured, "auto")
    for model, ref in [(after, "lf"), (base, "plain"), (first, "lf"), (configured, "plain"), (after, "lf")]:
        assert torch.equal(sample(model), fresh(ref)), ref
    comfy.model_management.unload_all_models()
    assert all(own[n].comfy_attention is c and c.config is None for n, c in children.items())
    assert all(torch.equal(before[k], v) for k, v in unet_state(base).items())
