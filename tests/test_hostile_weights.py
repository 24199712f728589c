"""Hostile and careless weight inputs at the node's own entry point: crafted headers that must
be refused with bounded memory, non-finite or non-float tensors, broken configs, symlink
loops in the models folder, and the 'auto' download against a stand-in hub on 127.0.0.1
(user files kept, symbolic links, cut and stalled transfers, no partial files; the bounds,
hashes, token, cache and Cancel in test_hub_download.py).

Prompt-borne inputs (weights names outside the folders) are tested through the server in
test_hostile_server.py."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import helpers
import huggingface_hub.constants
import pytest
import torch
from helpers import apply, count_linfusion_layers, put_weights, raw_safetensors
from hub_standin import HubStandIn, point_at, sd15_hub
from safetensors.torch import save_file

SD15_REPO = "Yuanshi/LinFusion-1-5"


def _entry(i: int) -> dict:
    return {"dim_n": 320, "heads": 8, "module_name": f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1",
            "projection_mid_dim": None}


# -- crafted headers: refused before any per-layer work ----------------------------------------
def refused(lf, path, match: str) -> None:
    with pytest.raises(lf.LinFusionWeightsError, match=match):
        lf.load_weights(path)


def python_peak(fn) -> int:
    """Peak bytes of Python allocations while `fn` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_config_listing_many_layers_is_refused_with_bounded_memory(lf, tmp_path):
    """A 4 MB metadata config listing ~57k layers used to expand into 17 x 57k expected keys
    (26 s, +819 MB); it must be refused from the header's size alone."""
    text = json.dumps({"_class_name": "LinFusion", "modules_list": [_entry(i) for i in range(57_000)]})
    assert len(text) > 4_000_000
    f = tmp_path / "bomb.safetensors"
    raw_safetensors(f, 1, {"linfusion_config": text})
    peak = python_peak(lambda: refused(lf, f, r"has a \d+-byte safetensors header"))
    assert peak < 1 << 20, f"refusing a 4 MB header took {peak / 2**20:.1f} MiB of Python memory"


def test_config_json_with_too_many_layers_is_refused_before_expansion(lf, tmp_path):
    """Below the size cap, a layer count above the largest known layout (SDXL's 70) is refused
    before the 17-keys-per-layer expansion."""
    d = tmp_path / "many"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"modules_list": [_entry(i) for i in range(5000)]}))
    save_file({"0.to_q.weight": torch.zeros(2, 2)}, str(d / "diffusion_pytorch_model.safetensors"))
    assert lf.weights.MAX_MODULES == 70
    peak = python_peak(lambda: refused(lf, d, r"lists 5000 layers; no supported UNet has more than 70"))
    assert peak < 16 << 20


def test_header_with_300k_tiny_tensors_is_refused_before_reading_them(lf, tmp_path):
    f = tmp_path / "300k.safetensors"
    raw_safetensors(f, 300_000)
    with pytest.raises(lf.LinFusionWeightsError, match=r"has a \d+-byte safetensors header"):
        lf.load_weights(f)
    # below the header cap, the tensor count is checked before any tensor is read
    f = tmp_path / "20k.safetensors"
    raw_safetensors(f, 20_000)
    with pytest.raises(lf.LinFusionWeightsError, match=r"holds 20000 tensors; .* 17 per layer and at most 70"):
        lf.load_weights(f)


@pytest.mark.parametrize("bad, match", [
    ({"modules_list": [{"module_name": "a", "dim_n": 1e400, "heads": 8}]}, r"entry 0 is malformed"),
    ({"modules_list": [{"module_name": "a", "dim_n": 1 << 40, "heads": 8}]}, r"widths 1\.\.16384"),
    ({"modules_list": [{"module_name": ["a"], "dim_n": 320, "heads": 8}]}, r"entry 0 is malformed"),
    ({"modules_list": [{"module_name": "a", "dim_n": 320, "heads": 0}]}, r"does not split into 0 heads"),
])
def test_malformed_config_values_get_messages(lf, bad, match):
    with pytest.raises(lf.LinFusionWeightsError, match=match):
        lf.parse_config(bad)


def test_overflowing_number_in_config_json(lf, tmp_path):
    """`"dim_n": 1e400` parses to float infinity; int() of it used to escape as OverflowError."""
    d = tmp_path / "inf"
    d.mkdir()
    (d / "config.json").write_text('{"modules_list": [{"module_name": "a", "dim_n": 1e400, "heads": 8}]}')
    save_file({"0.to_q.weight": torch.zeros(2, 2)}, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(lf.LinFusionWeightsError, match=r"entry 0 is malformed: \{'module_name': 'a', 'dim_n': inf"):
        lf.load_weights(d)


def test_non_json_metadata_names_the_file(lf, tmp_path):
    f = tmp_path / "meta.safetensors"
    save_file({"0.to_q.weight": torch.zeros(2, 2)}, str(f), metadata={"linfusion_config": "{not json"})
    with pytest.raises(lf.LinFusionWeightsError, match=rf"{f}: its metadata 'linfusion_config' is not valid JSON"):
        lf.load_weights(f)


# -- values --------------------------------------------------------------------------------------
@pytest.fixture
def sd1_state(lf, sd15):
    mods = helpers.lf_modules(lf, "sd15", sd15.get_model_object("diffusion_model"))
    return mods, helpers.random_state(lf, mods)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_with_file_and_tensor(lf, tmp_path, sd1_state, value):
    mods, sd = sd1_state
    sd["5.to_v.weight"][3, 7] = value
    folder = helpers.write_official(tmp_path / "nan", lf, mods, sd)
    with pytest.raises(lf.LinFusionWeightsError) as e:
        lf.load_weights(folder)
    msg = str(e.value)
    assert str(folder / "diffusion_pytorch_model.safetensors") in msg
    assert "tensor 5.to_v.weight has 1 NaN or infinite values" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_float_weights_are_refused(lf, tmp_path, sd1_state, dtype):
    mods, sd = sd1_state
    sd["0.to_out.0.bias"] = torch.ones_like(sd["0.to_out.0.bias"], dtype=dtype)
    folder = helpers.write_official(tmp_path / "int", lf, mods, sd)
    with pytest.raises(lf.LinFusionWeightsError,
                       match=rf"tensor 0\.to_out\.0\.bias is {str(dtype).removeprefix('torch.')}; .*floating point"):
        lf.load_weights(folder)


# -- the models folder scan ------------------------------------------------------------------------
def test_symlink_loops_do_not_hang_the_scan(pack, lf, sd15, linfusion_dir):
    put_weights(lf, linfusion_dir, "sd15", sd15, name="real")
    (linfusion_dir / "loop").symlink_to(linfusion_dir, target_is_directory=True)  # to an ancestor
    (linfusion_dir / "a").mkdir()
    (linfusion_dir / "a" / "b").symlink_to(linfusion_dir / "a", target_is_directory=True)  # to itself
    deep = linfusion_dir.joinpath(*[f"d{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "too_deep.safetensors").write_bytes(b"")
    (linfusion_dir.joinpath(*[f"d{i}" for i in range(7)]) / "deep_enough.safetensors").write_bytes(b"")
    walks = []
    real_walk = os.walk

    def counting_walk(*a, **k):
        for item in real_walk(*a, **k):
            walks.append(item[0])
            yield item

    os.walk = counting_walk
    try:
        names = pack.nodes.weights_store.choices()
    finally:
        os.walk = real_walk
    assert names == ["auto", "d0/d1/d2/d3/d4/d5/d6/deep_enough.safetensors", "real"]
    assert len(walks) == 3 + 8  # root, a, real, and d0 .. d7 (MAX_DEPTH levels); d8 is not entered


# -- weights names: only entries of the list ----------------------------------------------------
def test_names_outside_the_list_are_refused_alike(pack, lf, sd15, linfusion_dir, tmp_path):
    """Absolute paths and `..` used to load (or list) whatever they named; refusals must not
    depend on what exists outside the folder."""
    outside = put_weights(lf, tmp_path / "elsewhere", "sd15", sd15, name="w")
    store = pack.nodes.weights_store
    messages = {}
    for name in (str(outside), str(outside / "diffusion_pytorch_model.safetensors"), "/etc", "/nonexistent/x",
                 "../elsewhere/w", "../no/such"):
        with pytest.raises(lf.LinFusionWeightsError) as e:
            store.resolve(name)
        messages[name] = str(e.value).replace(repr(name), "<name>")
    assert len(set(messages.values())) == 1, messages
    assert "passwd" not in messages["/etc"] and "paths outside these folders are never read" in messages["/etc"]
    with pytest.raises(lf.LinFusionWeightsError, match=r"must be the name of an entry in the list, got int 5"):
        store.resolve(5)
    # a link the user placed in the folder is an entry like any other
    (linfusion_dir / "linked").symlink_to(outside, target_is_directory=True)
    assert store.resolve("linked") == linfusion_dir / "linked"


# -- 'auto' download against the stand-in hub ---------------------------------------------------
@pytest.fixture
def hub(lf, sd15, linfusion_dir, monkeypatch, tmp_path):
    with sd15_hub(lf, sd15, monkeypatch, tmp_path) as h:
        yield h


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial"))


def test_auto_downloads_beside_user_files_and_deletes_nothing(lf, node_classes, sd15, linfusion_dir, hub):
    target = linfusion_dir / "LinFusion-1-5"
    (target / "my_notes").mkdir(parents=True)
    (target / "my_notes" / "readme.txt").write_text("mine")
    (target / "my_lora.safetensors").write_bytes(b"keep me")
    out = apply(node_classes, sd15, "auto")
    assert count_linfusion_layers(out) == 16
    assert (target / "my_notes" / "readme.txt").read_text() == "mine"
    assert (target / "my_lora.safetensors").read_bytes() == b"keep me"
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (target / name).read_bytes() == hub.files[f"{SD15_REPO}/{name}"]
    assert _leftovers(linfusion_dir) == []
    assert sorted(hub.served) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_auto_into_a_symlinked_folder(lf, node_classes, sd15, linfusion_dir, hub, tmp_path):
    store = tmp_path / "big_disk" / "lf15"
    store.mkdir(parents=True)
    (linfusion_dir / "LinFusion-1-5").symlink_to(store, target_is_directory=True)
    assert count_linfusion_layers(apply(node_classes, sd15, "auto")) == 16
    assert sorted(p.name for p in store.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (linfusion_dir / "LinFusion-1-5").is_symlink()
    assert _leftovers(linfusion_dir) == [] and not list(linfusion_dir.glob("*.partial"))


def test_auto_fetches_only_the_missing_file(lf, node_classes, sd15, linfusion_dir, hub):
    target = linfusion_dir / "LinFusion-1-5"
    target.mkdir()
    (target / "config.json").write_bytes(hub.files[f"{SD15_REPO}/config.json"])
    apply(node_classes, sd15, "auto")
    assert hub.served == ["diffusion_pytorch_model.safetensors"]


def test_connection_cut_half_way_leaves_nothing_and_the_next_run_works(lf, node_classes, sd15, linfusion_dir, hub):
    hub.mode["diffusion_pytorch_model.safetensors"] = "cut"
    size = len(hub.files[f"{SD15_REPO}/diffusion_pytorch_model.safetensors"])
    with pytest.raises(lf.LinFusionWeightsError,
                       match=rf"could not download diffusion_pytorch_model.safetensors of {SD15_REPO} from "
                             rf"{hub.url}/{SD15_REPO}/resolve/main/.*connection closed after {size // 2} of {size} "
                             r"bytes.*put both in"):
        apply(node_classes, sd15, "auto")
    assert list(linfusion_dir.iterdir()) == []
    assert not sd15.object_patches
    hub.mode.clear()
    assert count_linfusion_layers(apply(node_classes, sd15, "auto")) == 16


def test_missing_file_on_the_hub(lf, node_classes, sd15, linfusion_dir, hub):
    hub.files.pop(f"{SD15_REPO}/diffusion_pytorch_model.safetensors")
    with pytest.raises(lf.LinFusionWeightsError, match=r"HTTP 404 .*no such file in that repository"):
        apply(node_classes, sd15, "auto")
    assert list(linfusion_dir.iterdir()) == []


def test_unreachable_hub_fails_at_once(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch):
    point_at(monkeypatch, "http://127.0.0.1:9")  # discard port: connection refused
    t0 = time.monotonic()
    with pytest.raises(lf.LinFusionWeightsError, match=r"cannot connect .*Check the connection"):
        apply(node_classes, sd15, "auto")
    assert time.monotonic() - t0 < 5  # no retry loop (was 23 s)
    assert list(linfusion_dir.iterdir()) == []


def test_offline_switch_is_named_with_the_fix(lf, node_classes, sd15, linfusion_dir, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as read at import from that variable
    with pytest.raises(lf.LinFusionWeightsError, match=r"HF_HUB_OFFLINE=1 is set.*unset HF_HUB_OFFLINE"):
        apply(node_classes, sd15, "auto")
    assert hub.log == [] and list(linfusion_dir.iterdir()) == []


def test_stalled_connection_times_out(lf, node_classes, sd15, linfusion_dir, hub):
    hub.mode["diffusion_pytorch_model.safetensors"] = "stall"
    with pytest.raises(lf.LinFusionWeightsError, match=r"no data for 2 s after 0 bytes \(stalled connection"):
        apply(node_classes, sd15, "auto")
    assert list(linfusion_dir.iterdir()) == []


def test_download_reports_progress(lf, node_classes, sd15, linfusion_dir, hub):
    calls = []
    with helpers.progress_hook(lambda value, total, preview, node_id=None: calls.append((value, total))):
        apply(node_classes, sd15, "auto")
    kib = len(hub.files[f"{SD15_REPO}/diffusion_pytorch_model.safetensors"]) >> 10
    assert calls and calls[-1] == (kib, kib)
    assert [v for v, _ in calls] == sorted(v for v, _ in calls)


def test_standin_serves_like_the_hub():
    """The stand-in answers the resolve URL scheme the download code builds, and 404 otherwise."""
    import urllib.error
    import urllib.request

    with HubStandIn() as h:
        h.files["a/b/c.json"] = b"{}"
        assert urllib.request.urlopen(f"{h.url}/a/b/resolve/main/c.json").read() == b"{}"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{h.url}/a/b/resolve/main/d.json")
