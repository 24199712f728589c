"""LinFusion's object patches under the newest ComfyUI loaders (0.38: Dynamic VRAM, non-dynamic
delegates, core multi-GPU deep clones).

Two facts of ComfyUI 0.38's `comfy/model_patcher.py` make a swapped-in module unsafe:

* `ModelPatcherDynamic` keeps backups of loaded tensors by attribute path (every module of
  16 KB or less is force-loaded with one), in a dict shared by every clone of the model, and
  restores them by path at times that ignore object patches: `unpatch_model` puts the object
  patches back first and restores the backups after; `load` starts by restoring whatever
  backups are left, after `patch_model` has applied the loading clone's object patches. A
  backup taken under `...attn1` while LinFusion sits there would be written into the model's
  own attention afterwards (an AttributeError for `to_q_`, LinFusion's values in `to_q`), and
  one taken under the model's own attention into LinFusion's layer.
  `settle_backups` restores such backups by path while the module they were taken from is
  still in place, and forgets them: through an injection whose eject runs before any object
  patch is undone (detach, unload, reload), and before each sampling run, before the load.
* `clone(disable_dynamic=True)` (the non-dynamic delegate that sampling switches to for hooked
  conditioning) and `deepclone_multigpu` (core "MultiGPU CFG Split", "Select Model Device")
  build another model from the loader and shallow-copy the object patches: one set of
  LinFusion layers would be loaded, LoRA-patched and run by two models (two devices, two
  threads). `LayerSets.on_clone` gives each model object its own layers, built like the
  first, and swaps them into the clone's object patches.

And 0.38's CrossAttention has a `comfy_attention` child that "config" patches replace by object
patch under `...attn1`: `ComfyLinFusionAttention` hands it through to the model's own attention.

Nothing here changes what the classic ModelPatcher does: its unpatch order is already safe,
and the settling runs for dynamic patchers only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import comfy.patcher_extension
import comfy.utils
import torch

from ..linfusion.attention import LinFusionAttention

UNET_PREFIX = "diffusion_model."  # the UNet's keys in a ModelPatcher (object patches, weight patches, backups)
INJECTION_KEY = "linfusion_backups"


def is_dynamic(patcher) -> bool:
    """Whether `patcher` is a ModelPatcherDynamic (0.38's Dynamic VRAM); older ComfyUIs have none."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def settle_backups(patcher, paths: Iterable[str], pick: Callable[[str, torch.nn.Module], bool]) -> int:
    """Restore, by path, every loader backup (weights and buffers) under the layers at `paths`
    whose current module passes `pick(path, module)`, and forget it, as ComfyUI's own
    `restore_loaded_backups` would. Returns how many were restored."""
    model = patcher.model
    prefixes = []
    for path in paths:
        try:
            current = comfy.utils.get_attr(model, UNET_PREFIX + path)
        except AttributeError:
            continue
        if pick(path, current):
            prefixes.append(UNET_PREFIX + path + ".")
    if not prefixes:
        return 0
    prefixes = tuple(prefixes)
    restored = 0
    for key in [k for k in patcher.backup if k.startswith(prefixes)]:
        bk = patcher.backup.pop(key)
        loaded = comfy.utils.get_attr(model, key)
        if bk.inplace_update:
            comfy.utils.copy_to_param(model, key, bk.weight)
        else:
            comfy.utils.set_attr_param(model, key, bk.weight)
        if loaded is not bk.weight and getattr(model, "model_loaded_weight_memory", 0):
            model.model_loaded_weight_memory = max(0, model.model_loaded_weight_memory
                                                   - loaded.numel() * loaded.element_size())
        restored += 1
    buffers = getattr(patcher, "backup_buffers", None) or {}
    for key in [k for k in buffers if k.startswith(prefixes)]:
        comfy.utils.set_attr(model, key, buffers.pop(key))
        restored += 1
    return restored


def backup_injection(paths: list[str]) -> comfy.patcher_extension.PatcherInjection:
    """An injection for the LinFusion clone: ComfyUI ejects it before it undoes any object patch
    (`detach`, `unpatch_model`, `partially_load`), so the eject settles the backups taken
    under LinFusion's layers while they are still in place."""

    def eject(patcher) -> None:
        if is_dynamic(patcher):
            settle_backups(patcher, paths, lambda _p, module: isinstance(module, LinFusionAttention))

    return comfy.patcher_extension.PatcherInjection(inject=lambda patcher: None, eject=eject)


def settle_before_load(patcher, paths: list[str]) -> int:
    """Before a dynamic patcher loads: backups taken under whatever sits at the layer paths now
    (the model's own attention, after a plain run) are restored there, so that `load` does not
    write them into LinFusion's layers once its object patches are applied."""
    if not is_dynamic(patcher):
        return 0
    return settle_backups(patcher, paths,
                          lambda path, module: module is not patcher.object_patches.get(UNET_PREFIX + path))


class LayerSets:
    """One set of LinFusion layers per ComfyUI model object. `build(patcher)` makes the layers for
    the model `patcher` wraps (path -> layer); the first set is the one Apply LinFusion built.
    Registered as an ON_CLONE callback: a clone on another model object (non-dynamic delegate,
    multi-GPU deep clone) gets that model's set in place of the shared objects."""

    def __init__(self, build: Callable, model, layers: dict[str, LinFusionAttention]) -> None:
        self.build = build
        self.per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary({model: layers})
        self.mine: weakref.WeakSet = weakref.WeakSet(layers.values())

    def on_clone(self, source, clone) -> None:
        if clone.model is source.model:
            return
        layers = self.per_model.get(clone.model)
        if layers is None:
            layers = self.build(clone)
            self.per_model[clone.model] = layers
            self.mine.update(layers.values())
        for path, layer in layers.items():
            key = UNET_PREFIX + path
            if clone.object_patches.get(key) in self.mine:
                clone.object_patches[key] = layer


class ComfyLinFusionAttention(LinFusionAttention):
    """LinFusionAttention as the pack installs it: `comfy_attention` (0.38's child of CrossAttention
    that "config" patches replace by object patch at `<attn1>.comfy_attention`) reads and writes
    the model's own attention's. Such a patch then lands where it would without LinFusion (the
    hybrid softmax path uses it), and ComfyUI restores it there, in either order of object
    patches. `bind` sets the model's attention (kept out of the module tree)."""

    def bind(self, original: torch.nn.Module) -> None:
        object.__setattr__(self, "_comfy_original", original)

    @property
    def comfy_attention(self) -> torch.nn.Module:
        # a property, not __getattr__: the layer's other attributes are looked up as before
        original = self.__dict__.get("_comfy_original")
        if original is None or not hasattr(original, "comfy_attention"):
            raise AttributeError("comfy_attention")
        return original.comfy_attention

    def __setattr__(self, name: str, value) -> None:
        original = self.__dict__.get("_comfy_original")
        if name == "comfy_attention" and original is not None:
            setattr(original, name, value)
        else:
            super().__setattr__(name, value)
