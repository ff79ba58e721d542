"""ONNX Runtime engines carry ONNX Runtime's fused operators (hs_export.build.ort.fuse_graph) and
stay exact to the PyTorch graphs. Speed itself is measured by ``hs-export bench``, not here."""

import collections
import shutil
import subprocess
import sys

import onnx
import pytest
import torch

from hs_export.build.export import dummy_inputs
from hs_export.build.ort import fuse_graph
from hs_runtime.backends.onnxruntime_backend import OrtEngine
from hs_runtime.contract import GRAPH_NAMES, call_sizes
from hs_runtime.errors import ConfigError
from hs_runtime.manifest import Manifest


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_engines_hold_fused_attention_and_gelu(tiny_engine_dir):
    manifest = Manifest.load(tiny_engine_dir)
    for name in GRAPH_NAMES:
        ops = _ops(manifest.engine_path(name))
        dims = manifest.dims(name)
        layers = dims.num_layers
        # one per attention module: joint attention per block, plus SD3.5's dual attention
        assert ops["MultiHeadAttention"] == dims.kv_entries and ops["Softmax"] == 0, (name, ops)
        assert ops["FastGelu"] >= layers and ops["Tanh"] == 0, (name, ops)


def test_fusion_is_idempotent_and_leaves_the_weights_alone(tiny_engine_dir, tmp_path):
    manifest = Manifest.load(tiny_engine_dir)
    source = manifest.engine_path("large")
    for path in source.parent.glob("large.onnx*"):
        shutil.copy(path, tmp_path / path.name)
    data = (tmp_path / "large.onnx.data").read_bytes()
    assert fuse_graph(tmp_path / "large.onnx") == {"FastGelu": 0, "MultiHeadAttention": 0}  # nothing left to fuse
    assert (tmp_path / "large.onnx.data").read_bytes() == data


def test_fused_engine_exact_on_all_tokens_and_one_token(tiny_engine_dir, tiny_torch_engines):
    """The fused graph against the PyTorch graph on a dense call with text and on the profile
    minimum (one token, every other token and the text as cached context)."""
    manifest = Manifest.load(tiny_engine_dir)
    shape = manifest.shape
    dims = manifest.dims("large")
    n_img = dims.image_tokens(shape.latent_height, shape.latent_width)
    engine = OrtEngine(manifest.engine_path("large"), "large", dims, torch.device("cpu"))
    for sizes in (call_sizes(2, n_img, 0, shape.text_tokens), call_sizes(2, 1, n_img - 1, shape.text_tokens, reuse_text=True)):
        feeds = dummy_inputs(engine.spec, sizes)
        want = tiny_torch_engines["large"](feeds)
        got = engine(feeds)
        for name, ref in want.items():
            scale = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
            err = (ref - got[name]).abs().max().item() if ref.numel() else 0.0
            assert err / scale <= engine.spec.rtol, (name, err, scale)


_POOLS_SCRIPT = """
import sys, torch
from hs_export.build.export import dummy_inputs
from hs_runtime.backends.onnxruntime_backend import OrtEngine
from hs_runtime.contract import call_sizes
from hs_runtime.manifest import Manifest
m = Manifest.load(sys.argv[1]); shape = m.shape
n_img = m.dims("large").image_tokens(shape.latent_height, shape.latent_width)
load = lambda pool: OrtEngine(m.engine_path("large"), "large", m.dims("large"), torch.device("cpu"), {"thread_pool": pool})
own = load("session")  # before the global pools exist: its own threads
feeds = dummy_inputs(own.spec, call_sizes(2, n_img, 0, shape.text_tokens))
want = own(feeds)
results = [load(pool)(feeds) for pool in ("global", "session")]  # the second joins the global pools
print(all(torch.equal(want[k], got[k]) for got in results for k in want))
"""


def test_global_thread_pool_gives_the_same_outputs(tiny_engine_dir):
    """``thread_pool: global`` changes which threads run the ops, not what they compute, and a
    folder asking for its own threads after the process's global pools exist joins them instead
    of failing in ONNX Runtime. A fresh process: the pools are process-wide state."""
    done = subprocess.run([sys.executable, "-c", _POOLS_SCRIPT, str(tiny_engine_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_unknown_thread_pool_setting_is_one_line(tiny_engine_dir):
    manifest = Manifest.load(tiny_engine_dir)
    with pytest.raises(ConfigError, match="unknown thread_pool in ort_session.json .* got 'shared' .* expected global \| session"):
        OrtEngine(manifest.engine_path("small"), "small", manifest.dims("small"), torch.device("cpu"), {"thread_pool": "shared"})
