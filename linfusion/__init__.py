"""LinFusion (arXiv 2409.02097) in pure PyTorch: linear attention, weights, model matching.

Never imports ComfyUI; the ComfyUI glue lives in the pack's `nodes/` package.
"""

from .attention import LinFusionAttention, apply_summary, kv_summary, linear_attention
from .families import FAMILIES, Family, ModuleSpec, diffusers_to_ldm, match_family
from .patching import (
    IncompatibleModelError,
    Replacement,
    build_replacements,
    model_family,
    operations_like,
    plan_replacements,
    self_attention_layers,
)
from .weights import LinFusionWeights, LinFusionWeightsError, load_weights, parse_config, save_weights

__all__ = [
    "FAMILIES", "Family", "IncompatibleModelError", "LinFusionAttention", "LinFusionWeights",
    "LinFusionWeightsError", "ModuleSpec", "Replacement", "apply_summary", "build_replacements",
    "diffusers_to_ldm", "kv_summary", "linear_attention", "load_weights", "match_family", "model_family",
    "operations_like", "parse_config", "plan_replacements", "save_weights", "self_attention_layers",
]
