"""Text on the running node: what a download fetches and how much is left (issue 23).

The progress bar alone shows a fraction; ComfyUI's progress text (PromptServer.send_progress_text,
in 0.3.52 and 0.3.75 alike; the web UI writes it under the node's widgets) says what and how
much. Without a server (the pack used as a library) or outside a node's execution it does
nothing, and it never lets a display problem stop the download.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ComfyUI-LinFusion")

MB = 1_000_000


def download_text(name: str, done: int, total: int | None) -> str:
    """'Downloading <name>' and a second line: done of total MB, the percentage and what is left."""
    if total is None:
        return f"Downloading {name}\n{done / MB:.1f} MB so far"
    if done >= total:
        return f"Downloaded {name}\n{total / MB:.1f} MB"
    return (f"Downloading {name}\n{done / MB:.1f} of {total / MB:.1f} MB ({100 * done // max(total, 1)}%), "
            f"{(total - done) / MB:.1f} MB left")


def show_download(name: str, done: int, total: int | None) -> None:
    """Show download_text(name, done, total) on the node ComfyUI is executing, if any. Call it
    at most a few times a second (each call is one websocket message)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI process
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is None or server is None or not hasattr(server, "send_progress_text"):
        return
    try:
        server.send_progress_text(download_text(name, done, total), context.node_id)
    except Exception as exc:  # noqa: BLE001 - the display must never break the download
        log.debug("LinFusion: progress text not shown (%s)", exc)
