"""Weights that do not fit the model are refused from their header alone (issue #25 item 7).

A file whose header is well-formed but whose layers (count, widths, heads) are not the
model's used to be read in full before `plan_replacements` refused it, and stayed in the
weights cache afterwards: a sparse 537 MB file (no data on disk) claiming one 4096-wide layer
cost +596 MB at peak and kept 486 MB. Now Apply LinFusion compares the header with the model
before any tensor is read, and caches nothing it refused.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers import apply, put_weights


def _sparse_one_wide_layer(lf, path, dim: int = 4096) -> int:
    """A float32 safetensors file with one LinFusion layer `dim` wide, its config in its metadata
    and its data region a hole (no bytes on disk). Returns the size of the data region."""
    spec = lf.ModuleSpec("down_blocks.0.attentions.0.transformer_blocks.0.attn1", dim, 8, dim)
    header, offset = {}, 0
    for key, shape in lf.weights.module_shapes(spec).items():
        n = 4 * math.prod(shape)
        header[f"0.{key}"] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "linfusion_config": json.dumps(lf.weights.make_config([spec]))}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return offset


def _rss() -> int | None:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@pytest.fixture
def tensor_reads(lf, monkeypatch):
    """Names of the tensors the loader reads (safetensors' get_tensor), in order."""
    reads = []
    real = lf.weights.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self._f = real(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self._f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(lf.weights, "safe_open", Counting)
    return reads


def test_weights_that_do_not_fit_are_refused_before_any_tensor_is_read(pack, lf, node_classes, sd15, linfusion_dir,
                                                                        tensor_reads):
    cache = pack.nodes.weights_store.CACHE
    f = linfusion_dir / "wide.safetensors"
    data = _sparse_one_wide_layer(lf, f)
    assert data > 536_000_000 and os.stat(f).st_blocks * 512 < 1 << 20  # 537 MB claimed, nothing on disk
    loads, rss = cache.loads, _rss()
    with pytest.raises(lf.IncompatibleModelError, match=r"are for 1 self-attention layers of widths \[4096\].*the "
                                                        r"weights have 1 layers, the model 16"):
        apply(node_classes, sd15, "wide.safetensors")
    assert tensor_reads == []
    assert cache.loads == loads and not [k for k in cache._entries if k.endswith("wide.safetensors")]
    if rss is not None:
        assert _rss() - rss < 64 << 20
    # the counter sees reads: weights that fit are read in full, once
    put_weights(lf, linfusion_dir, "sd15", sd15, name="fits")
    apply(node_classes, sd15, "fits")
    assert len(tensor_reads) == 16 * lf.weights.TENSORS_PER_MODULE
