"""The first 'auto' download says on the node what it fetches and how much is left
(nodes/progress_text.py, called from nodes/weights_store.py's progress callback): ComfyUI's
PromptServer.send_progress_text(text, node_id) (server.py, in 0.3.52 and 0.3.75), for the node
ComfyUI is executing (comfy_execution/utils.py get_executing_context, set by execution.py's
CurrentNodeContext)."""

from __future__ import annotations

import sys
import types

import pytest
from comfy_execution.utils import CurrentNodeContext


class Sent:
    """Stands in for the PromptServer: records what send_progress_text would put on the wire."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((text, node_id))


@pytest.fixture
def sent(monkeypatch):
    """ComfyUI's `server` module as the running server presents it (PromptServer.instance); the
    real module cannot be imported beside the test session's ComfyUI-as-a-library."""
    s = Sent()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=s)))
    return s


def test_download_text_names_the_file_and_what_is_left(pack):
    text = pack.nodes.progress_text.download_text
    assert text("Yuanshi/LinFusion-XL/w.safetensors", 123_456_789, 871_000_000) == (
        "Downloading Yuanshi/LinFusion-XL/w.safetensors\n123.5 of 871.0 MB (14%), 747.5 MB left")
    assert text("a/b", 871_000_000, 871_000_000) == "Downloaded a/b\n871.0 MB"
    assert text("a/b", 2_000_000, None) == "Downloading a/b\n2.0 MB so far"


def test_progress_callback_shows_the_text_on_the_executing_node(pack, sent):
    ws = pack.nodes.weights_store
    total = 10 << 20
    with CurrentNodeContext("prompt", "7"):
        progress = ws._progress_bar("Yuanshi/LinFusion-1-5/diffusion_pytorch_model.safetensors")
        for done in range(1 << 20, total + 1, 1 << 20):  # ten chunks within 0.25 s: first and last shown
            progress(done, total)
    assert [node for _, node in sent.texts] == ["7", "7"]
    assert sent.texts[0][0].startswith("Downloading Yuanshi/LinFusion-1-5/diffusion_pytorch_model.safetensors\n")
    assert sent.texts[0][0].endswith("(10%), 9.4 MB left")
    assert sent.texts[-1][0] == "Downloaded Yuanshi/LinFusion-1-5/diffusion_pytorch_model.safetensors\n10.5 MB"
    sent.texts.clear()
    progress = ws._progress_bar("x")  # outside a node's execution (the pack as a library): nothing sent
    progress(total, total)
    assert sent.texts == []
