"""Session fixtures: the tiny preset is built once (save_pretrained) and loaded back (from_pretrained)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for the network
warnings.filterwarnings("ignore", message=".*torchvision.*")


def pytest_collection_modifyitems(config, items):
    """Skips ``gpu`` / ``tensorrt`` tests with the reason, evaluated lazily."""
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except Exception:
        has_trt = False
    has_diffusers = importlib.util.find_spec("diffusers") is not None  # a lent GPU machine may lack it
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if ("gpu" in item.keywords or "tensorrt" in item.keywords) and not has_diffusers:
            item.add_marker(pytest.mark.skip(reason="needs diffusers (the tiny preset's fixtures); pip install diffusers"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT >= 10.1 importable and a CUDA device"))


@pytest.fixture(scope="session")
def preset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    os.environ["HS_PRESET_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_paths(preset_root):
    from hs_export.presets import ensure_preset

    return ensure_preset("tiny", preset_root, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    from hs_runtime.models import load_transformer

    return load_transformer(tiny_paths.small), load_transformer(tiny_paths.large)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_paths):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(tiny_paths.large))


@pytest.fixture(scope="session")
def tiny_conditioning(tiny_pipe):
    from hs_runtime.pipeline import TextAndVae

    return TextAndVae(tiny_pipe).encode(["a red cat", "a photo of a dog in the city"], None, cfg=True, max_sequence_length=8)


@pytest.fixture(scope="session")
def tiny_torch_engines(tiny_models):
    from hs_runtime.backends.torch_backend import torch_engines

    return torch_engines(*tiny_models)


def random_full_inputs(dims, batch, height, width, text_tokens, seed=0):
    """Fresh random feeds for a ``*.full`` graph."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, dims.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, dims.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, dims.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_paths, tmp_path_factory):
    """ONNX Runtime engines of the tiny preset, built once through the public build API."""
    from hs_export.build import BuildConfig, build
    from hs_export.build import resolve_models

    out = tmp_path_factory.mktemp("engines") / "tiny"
    selection = resolve_models("tiny", None, None, None, log=lambda *_: None)
    build(selection, BuildConfig(out=out), log=lambda *_: None)
    return out


@pytest.fixture
def unwritable_folders(tmp_path, monkeypatch):
    """``(foreign, readonly)``: a folder holding someone else's file, and one nobody may write
    (for root, who writes anywhere, ``os.access`` says no for it)."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == readonly and mode & os.W_OK else real_access(path, mode, **kw))
    return foreign, readonly
