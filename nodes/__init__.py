"""ComfyUI glue for LinFusion: node classes and the extension that registers them."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import weights_store
from .apply import ApplyLinFusion
from .highres import NODES as HIGHRES_NODES
from .multigpu import LinFusionMultiGPU

weights_store.register_folder()

NODES: list[type[io.ComfyNode]] = [ApplyLinFusion, *HIGHRES_NODES, LinFusionMultiGPU]


class LinFusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LinFusionExtension:
    return LinFusionExtension()
