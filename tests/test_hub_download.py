"""'auto' downloads through huggingface_hub's metadata, token and cache, with bounds (issues #22, #25).

Against the stand-in hub on 127.0.0.1 (tests/hub_standin.py: HEAD answers like the real hub,
LFS files redirected to a CDN on another origin). Every transfer has a bound known before its
first byte (the family's size table, the hub's metadata), is checked (size, SHA-256, the
weights' header and family) before anything moves into place, stops within a second on
Cancel also while silent, and a crawl is stopped by the minimum average rate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import comfy.model_management
import pytest
from helpers import apply, count_linfusion_layers
from hub_standin import COMMIT, HubStandIn, sd15_hub, use_standin
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

REPO = "Yuanshi/LinFusion-1-5"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"


@pytest.fixture
def hub(lf, sd15, linfusion_dir, monkeypatch, tmp_path):
    with sd15_hub(lf, sd15, monkeypatch, tmp_path) as h:
        yield h


@pytest.fixture
def store(pack):
    return pack.nodes.weights_store


def _auto_fails(lf, node_classes, sd15, match: str):
    with pytest.raises(lf.LinFusionWeightsError, match=match):
        apply(node_classes, sd15, "auto")


def test_standin_answers_metadata_like_the_hub(tmp_path, monkeypatch):
    """huggingface_hub's own get_hf_file_metadata reads from the stand-in what it reads from the
    hub: an LFS file's size and SHA-256 from X-Linked-Size / X-Linked-Etag on a 302 to another
    origin (not followed), a regular file's git blob hash from its ETag, the commit."""
    with HubStandIn() as h:
        use_standin(monkeypatch, h, tmp_path)
        data, cfg = os.urandom(3000), b'{"a": 1}'
        h.files.update({"o/r/x.safetensors": data, "o/r/c.json": cfg})
        meta = get_hf_file_metadata(hf_hub_url("o/r", "x.safetensors"))
        assert (meta.size, meta.etag, meta.commit_hash) == (3000, hashlib.sha256(data).hexdigest(), COMMIT)
        assert meta.location.startswith(h.cdn_url + "/xet-bridge/")
        meta = get_hf_file_metadata(hf_hub_url("o/r", "c.json"))
        assert (meta.size, meta.etag) == (len(cfg), hashlib.sha1(b"blob 8\0" + cfg).hexdigest())
        assert meta.location == f"{h.url}/o/r/resolve/main/c.json"
        # and hf_hub_download itself fills a cache from it, byte-exact
        assert open(hf_hub_download("o/r", "x.safetensors"), "rb").read() == data


def test_token_goes_to_the_hub_and_not_to_the_cdn(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch):
    """HF_TOKEN (as `hf auth login` would) is sent as huggingface_hub sends it, for a private or
    gated repository; the CDN's signed URL gets no token. The user agent names the pack."""
    monkeypatch.setenv("HF_TOKEN", "hf_standin_secret")
    assert count_linfusion_layers(apply(node_classes, sd15, "auto")) == 16
    to_hub = [r for r in hub.log if r.server == "hub" and "/resolve/" in r.path]
    to_cdn = [r for r in hub.log if r.server == "cdn"]
    assert {r.method for r in to_hub} == {"HEAD", "GET"} and [r.method for r in to_cdn] == ["GET"]
    assert all(r.headers.get("authorization") == "Bearer hf_standin_secret" for r in to_hub)
    assert all("authorization" not in r.headers for r in to_cdn)
    agents = {r.headers.get("user-agent", "") for r in to_hub + to_cdn}
    assert all("ComfyUI-LinFusion" in a for a in agents), agents


def test_files_in_the_hub_cache_are_used_without_any_request(lf, node_classes, sd15, linfusion_dir, hub,
                                                             monkeypatch):
    """Files a user already has in the Hugging Face cache (put there by huggingface_hub itself)
    are linked or copied into models/linfusion, checked against their hashes, with no request,
    also while offline."""
    cached = {name: hf_hub_download(REPO, name) for name in (CONFIG, WEIGHTS)}
    hub.log.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert count_linfusion_layers(apply(node_classes, sd15, "auto")) == 16
    assert hub.log == []
    target = linfusion_dir / "LinFusion-1-5"
    for name, path in cached.items():
        assert (target / name).read_bytes() == hub.files[f"{REPO}/{name}"]
        assert os.path.exists(path)  # the cache is left as it was
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS]


def test_a_damaged_cache_file_is_not_used(lf, node_classes, sd15, linfusion_dir, hub):
    hf_hub_download(REPO, CONFIG)
    blob = os.path.realpath(hf_hub_download(REPO, WEIGHTS))
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    hub.served.clear()
    apply(node_classes, sd15, "auto")
    assert (linfusion_dir / "LinFusion-1-5" / WEIGHTS).read_bytes() == hub.files[f"{REPO}/{WEIGHTS}"]
    assert hub.served == [WEIGHTS]


@pytest.mark.parametrize("name, header, match", [
    (WEIGHTS, "X-Linked-Etag", r"the SHA-256 of the bytes received is [0-9a-f]{64}, the hub announced 0{64}"),
    (CONFIG, "ETag", r"the content's git hash differs from the hub's \(1{40}\)"),
])
def test_content_other_than_the_hub_announced_is_refused(lf, node_classes, sd15, linfusion_dir, hub, name, header,
                                                         match):
    hub.meta[name] = {header: '"' + ("0" * 64 if header == "X-Linked-Etag" else "1" * 40) + '"'}
    _auto_fails(lf, node_classes, sd15, rf"could not download {name} of {REPO} .*{match}")
    assert list(linfusion_dir.iterdir()) == []


def test_more_bytes_than_announced_are_stopped_at_the_announced_size(lf, node_classes, sd15, linfusion_dir, hub):
    """A CDN that sends no length and streams on past the hub's X-Linked-Size (256 MiB more)."""
    hub.mode[WEIGHTS] = "more"
    size = len(hub.files[f"{REPO}/{WEIGHTS}"])
    _auto_fails(lf, node_classes, sd15, rf"the server sent more than {size} bytes, the hub announced: stopped there")
    assert list(linfusion_dir.iterdir()) == []
    assert hub.sent[WEIGHTS] < size + (32 << 20)  # stopped there, not at the end of the stream


def test_announced_sizes_over_the_bound_are_refused_before_the_first_byte(lf, node_classes, sd15, linfusion_dir, hub,
                                                                          store):
    """50 GB announced for the 198 MB weights: by the hub's metadata (no GET at all), or, where
    the metadata has no size, by the transfer's Content-Length (nothing written)."""
    hub.meta[WEIGHTS] = {"X-Linked-Size": "50000000000"}
    _auto_fails(lf, node_classes, sd15, rf"the hub announces 50000000000 bytes; {WEIGHTS} of {REPO} has at most "
                                        r"\d+: refused before the first byte")
    assert hub.served == [] and list(linfusion_dir.iterdir()) == []
    limit = store.size_limit(lf.FAMILIES["sd1"], WEIGHTS)
    assert 198_489_000 < limit < 203_000_000  # the official file: 198.49 MB
    hub.meta[WEIGHTS] = {"X-Linked-Size": None, "X-Linked-Etag": None}
    hub.length[WEIGHTS] = 50_000_000_000
    _auto_fails(lf, node_classes, sd15, rf"the server announces 50000000000 bytes, more than the {limit} expected of "
                                        "this file: refused before the first byte")
    assert list(linfusion_dir.iterdir()) == []


@pytest.mark.parametrize("length", ["announced", "unannounced"])
def test_config_json_is_bounded_before_it_is_written(lf, node_classes, sd15, linfusion_dir, hub, length):
    """A 4 MiB config.json (the official ones have 2-12 kB; the loader's bound is 1 MiB): refused
    from its announced size before a byte is fetched, or stopped at 1 MiB when nothing announces
    one. Nothing is installed (it used to be, and every later 'auto' run failed)."""
    hub.files[f"{REPO}/{CONFIG}"] = b" " * (4 << 20)
    if length == "announced":
        _auto_fails(lf, node_classes, sd15, rf"the hub announces {4 << 20} bytes; {CONFIG} of {REPO} has at most "
                                            rf"{1 << 20}: refused before the first byte")
        assert hub.served == []
    else:
        hub.meta[CONFIG] = {"Content-Length": None, "ETag": None}
        hub.mode[CONFIG] = "more"
        _auto_fails(lf, node_classes, sd15, rf"the server sent more than {1 << 20} bytes, the most this file can have")
        assert hub.sent[CONFIG] < (4 << 20) + (32 << 20)
    assert list(linfusion_dir.iterdir()) == []


def test_a_trickle_is_stopped_by_the_minimum_rate(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch):
    """1 byte every 0.3 s never trips the stall limit (2 s here); the average rate rule does, once
    the transfer has run for the stall limit."""
    monkeypatch.setenv("LINFUSION_DOWNLOAD_MIN_RATE", "1")
    hub.mode[WEIGHTS] = "trickle"
    t0 = time.monotonic()
    _auto_fails(lf, node_classes, sd15, r"\d+ bytes in \d s, an average of 0\.00 KiB/s, below the minimum of 1 KiB/s "
                                        r"\(LINFUSION_DOWNLOAD_MIN_RATE sets it")
    assert time.monotonic() - t0 < 5
    assert list(linfusion_dir.iterdir()) == []


@pytest.mark.parametrize("mode", ["slow", "stall", "silent"])
def test_cancel_ends_a_download_within_a_second(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch, mode):
    """Cancel (ComfyUI's /interrupt sets this flag) ends a download within a second while bytes
    arrive ("slow"), and while the connection is silent: after its headers ("stall") or before
    any answer ("silent"); the stall limit is 20 s."""
    monkeypatch.setenv("LINFUSION_DOWNLOAD_TIMEOUT", "20")
    hub.mode[WEIGHTS] = mode
    timer = threading.Timer(0.5, comfy.model_management.interrupt_current_processing, (True,))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            apply(node_classes, sd15, "auto")
    finally:
        timer.cancel()
        comfy.model_management.interrupt_current_processing(False)
    assert time.monotonic() - t0 < 0.5 + 1.0
    assert list(linfusion_dir.iterdir()) == [] and not sd15.object_patches


def test_stale_staging_folders_of_ended_processes_are_removed(lf, node_classes, sd15, linfusion_dir, hub, store):
    """A server killed while downloading leaves a staging folder; the next download into that
    folder removes it. Kept: a live process's, one without the pack's owner file, one holding a
    file the pack does not write, and the user's files."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    target = linfusion_dir / "LinFusion-1-5"
    target.mkdir()
    host = socket.gethostname()

    def staging(name, owner, files):
        d = target / f".linfusion-download-{name}"
        d.mkdir()
        if owner is not None:
            (d / ".owner").write_text(json.dumps(owner))
        for f in files:
            (d / f).write_bytes(b"partial")
        return d

    dead = staging("dead", {"pid": ended.pid, "host": host, "start": None}, [WEIGHTS])
    live = staging("live", store._owner(), [WEIGHTS])
    other_host = staging("otherhost", {"pid": ended.pid, "host": host + "-elsewhere", "start": None}, [CONFIG])
    no_owner = staging("noowner", None, [WEIGHTS])
    mixed = staging("mixed", {"pid": ended.pid, "host": host, "start": None}, [WEIGHTS, "my_notes.txt"])
    (target / "notes.txt").write_text("mine")
    assert count_linfusion_layers(apply(node_classes, sd15, "auto")) == 16
    assert not dead.exists()
    for kept in (live, other_host, no_owner, mixed):
        assert kept.is_dir() and len(list(kept.iterdir())) >= 1
    assert (mixed / "my_notes.txt").read_bytes() == b"partial"
    assert (target / "notes.txt").read_text() == "mine"


def test_a_full_disk_names_the_folder_and_the_space_needed(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch,
                                                           pack):
    """Too little free space is found before the download; a disk that fills up during it (a
    real ENOSPC from the kernel: /dev/full) gives the same kind of message, nothing left."""
    target = linfusion_dir / "LinFusion-1-5"
    size = sum(len(v) for v in hub.files.values())
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    _auto_fails(lf, node_classes, sd15, rf"needs {size / 1e6:.1f} MB for the weights of SD1\.x in {target}, and the "
                                        r"disk holding it has 0\.0 MB free: free space there")
    assert hub.served == [] and list(linfusion_dir.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(pack.nodes.hub_download, "_create", lambda path: open("/dev/full", "wb"))
    _auto_fails(lf, node_classes, sd15, rf"needs {len(hub.files[f'{REPO}/{CONFIG}']) / 1e6:.1f} MB for the weights "
                                        rf"of SD1\.x in {target}, and the disk holding it has [\d.]+ MB free")
    assert list(linfusion_dir.iterdir()) == []


@pytest.mark.parametrize("kind, match", [
    ("file", r"that name is a file, not a folder"),
    ("dangling", r"that name is a symbolic link to \S+nowhere, which does not exist"),
    ("loop", r"that name is a symbolic link that loops back on itself"),
])
def test_a_target_that_is_no_folder_gets_a_message(lf, node_classes, sd15, linfusion_dir, hub, tmp_path, kind, match):
    target = linfusion_dir / "LinFusion-1-5"
    if kind == "file":
        target.write_text("not a folder")
    elif kind == "dangling":
        target.symlink_to(tmp_path / "nowhere")
    else:
        target.symlink_to(target)
    _auto_fails(lf, node_classes, sd15, rf"keeps the weights of SD1\.x in the folder {target}, but {match}: rename or "
                                        "remove it")
    assert hub.log == [] and [p.name for p in linfusion_dir.iterdir()] == ["LinFusion-1-5"]
    assert target.is_symlink() == (kind != "file")
