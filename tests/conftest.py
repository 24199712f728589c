"""Test harness: a real ComfyUI imported as a library on CPU, this pack loaded the way
ComfyUI loads custom nodes, small models with the exact SD1.5 / SD2.1 / SDXL layouts, and
official-format LinFusion weights made with random values.

ComfyUI comes from $COMFYUI_PATH, else from the copy scripts/dev_setup.sh made
(scripts/comfy_env.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub, and fail fast if code tries
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
import comfy_env  # noqa: E402

# CPU mode, set before comfy.model_management is imported; LINFUSION_TEST_GPU=1 (scripts/gpu_check.py,
# for the `cuda` tests only) lets ComfyUI use the GPU.
COMFYUI = comfy_env.setup(cpu=os.environ.get("LINFUSION_TEST_GPU") != "1")
import comfy.model_management  # noqa: E402,F401
import folder_paths  # noqa: E402
import helpers  # noqa: E402  (tests/helpers.py: model and weight builders)
import hybrid_cases  # noqa: E402
import nodes  # noqa: E402

_loaded = asyncio.run(nodes.load_custom_node(str(REPO)))
if not _loaded:
    raise RuntimeError(f"ComfyUI failed to load the pack from {REPO}: see the log above")


@pytest.fixture(scope="session")
def pack():
    """The pack as ComfyUI imported it (module key: its path). Use its classes, not a second import."""
    return sys.modules[str(REPO)]


@pytest.fixture(scope="session")
def lf(pack):
    """The pack's `linfusion` package (same class identities as the nodes use)."""
    return pack.linfusion


@pytest.fixture(scope="session")
def node_classes():
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture
def linfusion_dir(tmp_path, monkeypatch):
    """An empty models/linfusion folder registered with folder_paths for this test."""
    d = tmp_path / "linfusion"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "linfusion",
                        ([str(d)], folder_paths.folder_names_and_paths["linfusion"][1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return d


@pytest.fixture(params=["sd15", "sd21", "sdxl"])
def small(request):
    """(family key, ModelPatcher) of a small model with the real layout of that family."""
    return request.param, helpers.small_model(request.param)


@pytest.fixture
def sd15():
    return helpers.small_model("sd15")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def never_samples(monkeypatch):
    """Fails the test if anything reaches sampling or the VAE: the checks must come first."""
    import comfy.sample
    import comfy.sd

    def boom(*_a, **_k):
        raise AssertionError("sampling or VAE work started before the inputs were checked")

    monkeypatch.setattr(comfy.sample, "sample_custom", boom)
    for name in ("encode", "decode", "encode_tiled", "decode_tiled"):
        monkeypatch.setattr(comfy.sd.VAE, name, boom)
    return boom


@pytest.fixture
def hybrid_case(lf, node_classes, linfusion_dir):
    """(model, pristine, lora, loraed): a small SD1.5 model with LinFusion weights for 'auto' in
    linfusion_dir, its attention weights at hybrid_cases.PATH, a LoRA on them, and the weights with
    the LoRA added (tests/hybrid_cases.py)."""
    model = helpers.small_model("sd15")
    helpers.put_weights(lf, linfusion_dir, "sd15", model)
    pristine = hybrid_cases.pristine_attn_weights(model)
    lora = hybrid_cases.lora_for(model)
    loraed = hybrid_cases.with_lora(pristine, lora)
    yield model, pristine, lora, loraed
    comfy.model_management.unload_all_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Fixtures that start a server process, a browser, install from the package registries, or build
# full-size stand-in files.
HEAVY_FIXTURES = {"comfy_server", "model_dirs", "sd15_checkpoint", "wf", "object_info", "install_tools"}


def pytest_collection_modifyitems(config, items):
    """Mark `server` every test that needs a heavy fixture or a browser: the version matrix runs
    the rest (and the `matrix` tests) on the older ComfyUI (.ci/run). No CUDA: `cuda` tests skip."""
    cuda = torch.cuda.is_available()
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ == "test_browser":
            item.add_marker(pytest.mark.server)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (scripts/gpu_check.sh)"))


# Server fixtures (a real ComfyUI server process with this pack) live in their own module.
pytest_plugins = ["server_fixtures"]
