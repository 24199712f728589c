"""Official-format weights: loading, validation, mapping onto the full-size UNet layouts."""

from __future__ import annotations

import json
import pickle

import comfy.utils
import helpers
import pytest
import torch
from safetensors.torch import save_file

FULL = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}


@pytest.fixture(scope="module")
def meta_unets():
    """Full-size SD1.5 / SD2.1 / SDXL UNets on the meta device (names and shapes only)."""
    return {k: helpers.base_model(k, meta=True).diffusion_model for k in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="module")
def official(tmp_path_factory, lf):
    """Full-size official-format folders for the three families (zeros: only layout matters)."""
    out = {}
    for key, fam in lf.FAMILIES.items():
        mods = fam.modules()
        sd = {f"{i}.{k}": torch.zeros(s, dtype=torch.float16)
              for i, m in enumerate(mods) for k, s in lf.weights.module_shapes(m).items()}
        out[key] = helpers.write_official(tmp_path_factory.mktemp(key) / fam.folder_name, lf, mods, sd)
    return out


def test_mapping_matches_comfyui(lf, meta_unets):
    """Our diffusers -> LDM names agree with ComfyUI's own unet_to_diffusers, and the layer
    lists are exactly the attn1 layers of each full-size architecture."""
    for key, fam in lf.FAMILIES.items():
        unet = meta_unets[FULL[key]]
        comfy_map = comfy.utils.unet_to_diffusers(helpers.LAYOUTS[FULL[key]][1])
        oracle = {d[: -len(".to_q.weight")]: c[: -len(".to_q.weight")]
                  for d, c in comfy_map.items() if d.endswith("attn1.to_q.weight")}
        ours = {m.name: lf.diffusers_to_ldm(m.name) for m in fam.modules()}
        assert ours == oracle
        assert set(ours.values()) == set(lf.self_attention_layers(unet))
        assert lf.model_family(unet) is fam


@pytest.mark.parametrize("key", ["sd1", "sd2", "sdxl"])
def test_official_folder_loads_and_covers_every_attn1(lf, official, meta_unets, key):
    folder = official[key]
    size_mb = (folder / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    assert round(size_mb, 2) == {"sd1": 198.49, "sd2": 198.49, "sdxl": 871.07}[key]  # the hub files' sizes
    w = lf.load_weights(folder)
    assert w.family is lf.FAMILIES[key]
    assert len(w.modules) == {"sd1": 16, "sd2": 16, "sdxl": 70}[key]
    plan = lf.plan_replacements(w, meta_unets[FULL[key]])
    assert sorted(r.path for r in plan) == sorted(lf.self_attention_layers(meta_unets[FULL[key]]))
    for other, unet in meta_unets.items():
        if other != FULL[key]:
            with pytest.raises(lf.IncompatibleModelError, match=lf.FAMILIES[key].label.replace(".", r"\.")):
                lf.plan_replacements(w, unet)


def test_early_config_form(lf, tmp_path, meta_unets):
    mods = lf.FAMILIES["sd2"].modules()
    state = helpers.random_state(lf, mods[:1])  # shapes checked only for what exists
    sd = {f"{i}.{k}": torch.zeros(s, dtype=torch.float16) for i, m in enumerate(mods)
          for k, s in lf.weights.module_shapes(m).items()}
    sd.update(state)
    folder = helpers.write_official(tmp_path / "early", lf, mods, sd, early_config=True)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "StableMamba"
    w = lf.load_weights(folder)
    assert w.modules == mods and w.family is lf.FAMILIES["sd2"]
    assert len(lf.plan_replacements(w, meta_unets["sd21"])) == 16


def test_bare_file_infers_layout_and_takes_heads_from_model(lf, official, tmp_path, meta_unets):
    src = official["sd1"] / "diffusion_pytorch_model.safetensors"
    bare = tmp_path / "loose" / "my_linfusion.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(src.read_bytes())
    w = lf.load_weights(bare)
    assert [m.heads for m in w.modules] == [None] * 16
    plan21 = lf.plan_replacements(w, meta_unets["sd21"])  # SD1/SD2 shapes agree; heads from the model
    assert [r.spec.heads for r in plan21][:3] == [5, 5, 10]
    with pytest.raises(lf.IncompatibleModelError):
        lf.plan_replacements(w, meta_unets["sdxl"])


def test_metadata_config_and_save_round_trip(lf, small, tmp_path):
    kind, model = small
    unet = model.get_model_object("diffusion_model")
    mods = helpers.lf_modules(lf, kind, unet)
    state = helpers.random_state(lf, mods, dtype=torch.float32)
    out = lf.save_weights(tmp_path / "saved", mods, state, dtype=None)
    w = lf.load_weights(out)
    assert w.modules == mods
    assert all(torch.equal(w.state_dict[k], state[k]) for k in state)
    assert not list(out.glob("*.part"))  # nothing half-written left behind
    # the same config in the file's own metadata makes a single file self-describing
    single = tmp_path / "single.safetensors"
    save_file(w.state_dict, str(single), metadata={"format": "pt",
                                                    "linfusion_config": json.dumps(lf.weights.make_config(mods))})
    assert lf.load_weights(single).modules == mods


def test_truncated_file_is_refused(lf, official, tmp_path):
    data = (official["sd1"] / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_bytes((official["sd1"] / "config.json").read_bytes())
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(lf.LinFusionWeightsError, match="damaged or truncated"):
        lf.load_weights(bad)


def test_missing_keys_and_wrong_shapes_are_refused(lf, tmp_path):
    mods = lf.FAMILIES["sd1"].modules()
    full = {f"{i}.{k}": torch.zeros(s, dtype=torch.float16) for i, m in enumerate(mods)
            for k, s in lf.weights.module_shapes(m).items()}
    missing = dict(full)
    del missing["3.to_k_.3.bias"]
    helpers.write_official(tmp_path / "missing", lf, mods, missing)
    with pytest.raises(lf.LinFusionWeightsError, match=r"1 missing \(e\.g\. 3\.to_k_\.3\.bias\)"):
        lf.load_weights(tmp_path / "missing")
    wrong = dict(full)
    wrong["0.to_q.weight"] = torch.zeros(320, 321, dtype=torch.float16)
    helpers.write_official(tmp_path / "wrong", lf, mods, wrong)
    with pytest.raises(lf.LinFusionWeightsError, match=r"0\.to_q\.weight has shape \(320, 321\)"):
        lf.load_weights(tmp_path / "wrong")


class _Trap:
    """Unpickling this writes a marker file: proves a loader never unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_are_refused_unopened(lf, tmp_path, suffix):
    marker = tmp_path / "unpickled"
    f = tmp_path / f"linfusion{suffix}"
    f.write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(lf.LinFusionWeightsError, match="pickled checkpoints"):
        lf.load_weights(f)
    assert not marker.exists()


def test_not_a_config(lf, tmp_path, official):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(
        (official["sd1"] / "diffusion_pytorch_model.safetensors").read_bytes())
    (d / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(lf.LinFusionWeightsError, match="modules_list"):
        lf.load_weights(d)


def test_wrong_family_message_names_what_differs(lf, official, meta_unets):
    """SD1.x and SD2.x have the same layers and widths: the message must show the heads, not
    two identical layer descriptions that read as a contradiction."""
    cases = {
        ("sd2", "sd15"): r"input_blocks\.1\.1\.transformer_blocks\.0\.attn1 has 8 heads in the model, 5 in the weights",
        ("sd1", "sd21"): r"has 5 heads in the model, 8 in the weights",
        ("sdxl", "sd15"): r"the weights have 70 layers, the model 16",
    }
    for (key, model), difference in cases.items():
        with pytest.raises(lf.IncompatibleModelError, match=difference):
            lf.plan_replacements(lf.load_weights(official[key]), meta_unets[model])
