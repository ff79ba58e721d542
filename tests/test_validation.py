"""User values are validated in the API (so embedding hosts get the CLI's errors): zero and negative
sizes are errors, never "use the default"; a file where a folder is expected says exactly that."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hs_export.bench import BenchConfig
from hs_export.build import BuildConfig
from hs_runtime import HybridStitchRuntime
from hs_runtime.errors import ConfigError, HybridStitchError, ManifestError, ModelLoadError, ShapeError
from hs_runtime.models import load_transformer
from hs_runtime.pipeline import TextAndVae, initial_latents
from hs_runtime.sampler import StitchedSampler
from hs_runtime.validation import SEED_MAX, check_device, check_output_file, check_seed, nearest_existing


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, True, 1.5])
def test_bad_seeds(seed):
    with pytest.raises(ConfigError, match=r"seed out of range .* 0\.\.18446744073709551615 \(2\*\*64 - 1, what torch generators take\)"):
        check_seed(seed)


def test_seed_range_ends_work():
    assert initial_latents(1, 16, 16, 0).shape == initial_latents(1, 16, 16, SEED_MAX).shape == (1, 16, 2, 2)
    with pytest.raises(ConfigError, match="seed out of range"):
        initial_latents(1, 16, 16, -5)


@pytest.mark.parametrize("size", [0, -16])
def test_zero_and_negative_sizes_are_errors_in_the_api(size, tmp_path):
    with pytest.raises(ShapeError, match=re.escape(f"height must be a positive multiple of 16 | got {size}")):
        initial_latents(1, size, 16, 0)
    with pytest.raises(ShapeError, match="width must be a positive multiple of 16"):
        BuildConfig(out=tmp_path / "e", width=size).validate()
    with pytest.raises(ShapeError, match="height must be a positive multiple of 16"):
        from hs_export.runs import bench_engines

        bench_engines("tiny", "cpu", "fp32", size, None)


@pytest.mark.parametrize("field, value, message", [
    ("prompts", 0, "prompts must be >= 1 | got 0"),
    ("text_tokens", 0, "text tokens must be >= 1 | got 0"),  # 0 is not "use the default"
    ("text_tokens", -1, "text tokens must be >= 1 | got -1"),
    ("token_buckets", 0, "token buckets must be >= 1"),
    ("opset", 13, "opset out of range | got 13 | expected 14..20"),
    ("builder_optimization_level", -1, "builder optimization level out of range"),
])
def test_build_config_validates_every_count(field, value, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BuildConfig(out=tmp_path / "e", **{field: value}).validate()


@pytest.mark.parametrize("changes, message", [
    ({"prompts": 0}, "prompts must be >= 1"),
    ({"seed": -1}, "seed out of range"),
    ({"guidance_scale": float("inf")}, "guidance scale must be a finite number"),
    ({"steps": 0}, "--steps must be >= 1"),
])
def test_bench_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        BenchConfig(**changes)


def test_sampler_guidance(tiny_torch_engines):
    for bad in (float("nan"), -0.5):
        with pytest.raises(ConfigError, match="guidance scale"):
            StitchedSampler(tiny_torch_engines, guidance_scale=bad)


def test_files_where_folders_are_expected(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ManifestError, match=f"engine folder {file} is a file, not a folder"):
        HybridStitchRuntime.from_dir(file)
    with pytest.raises(ModelLoadError, match=f"model {file} is a file, not a folder"):
        load_transformer(file)
    with pytest.raises(ModelLoadError, match=f"pipeline {file} is a file, not a folder"):
        TextAndVae.from_pretrained(file)
    with pytest.raises(ConfigError, match=f"--out {file} is a file, not a folder"):
        BuildConfig(out=file).validate()


def test_folders_where_files_are_expected(tmp_path):
    with pytest.raises(ConfigError, match=f"--json {tmp_path} is a folder, not a file"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(ConfigError, match=re.escape("needs an image file name | got 'out.txt'")):
        check_output_file(tmp_path / "out.txt", "--out", (".png", ".jpg"))
    assert check_output_file(tmp_path / "new" / "out.png", "--out", (".png",)) == tmp_path / "new" / "out.png"


def test_an_output_where_nothing_can_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only folder or file system (seen as ``os.access``; root passes permission bits, so
    the test stands one in) used to fail only after the run, saying to free some space."""
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"--out {tmp_path}/sub/out.png cannot be written | got no write permission on {tmp_path}")):
        check_output_file(tmp_path / "sub" / "out.png", "--out", (".png",))


def test_nearest_existing_folder(tmp_path, monkeypatch):
    """The one walk behind the output, repository and free-disk checks: it stops at the first
    ancestor that exists, and a relative path ends at ``.`` at the latest."""
    assert nearest_existing(tmp_path / "a" / "b" / "c.png") == tmp_path
    (tmp_path / "a").mkdir()
    assert nearest_existing(tmp_path / "a" / "b") == tmp_path / "a"
    monkeypatch.chdir(tmp_path)
    assert nearest_existing(Path("x") / "y") == Path(".")


def test_devices():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=re.escape("unknown device | got 'gpu0'")):
        check_device("gpu0")
    with pytest.raises(ConfigError, match=re.escape("unsupported device | got cpu:1")):
        check_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device requested but torch sees no GPU here"):
            check_device("cuda")


def test_every_api_error_is_one_family():
    for cls in (ConfigError, ShapeError, ManifestError, ModelLoadError):
        assert issubclass(cls, HybridStitchError)
