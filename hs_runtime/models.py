"""Loading SD3 transformers (local diffusers folders or hub ids) and checking a small/large pair.

diffusers is imported lazily: hosts that serve ONNX Runtime or TensorRT engines never need it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .contract import ModelDims
from .errors import IncompatibleModelsError, ModelLoadError, describe
from .validation import check_folder_path

# Fields two models must share to be stitched: latent space and text conditioning.
PAIR_FIELDS = ("patch_size", "in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim")


def resolve_transformer_source(source: str | Path) -> tuple[str, str | None]:
    """``(path or hub id, subfolder)`` for a pipeline root, a transformer folder, or a hub id."""
    path = check_folder_path(source, "model", ModelLoadError, fix="pass the model's folder (with config.json), not a file in it")
    if path.exists():
        if (path / "transformer" / "config.json").is_file():
            return str(path), "transformer"
        if (path / "config.json").is_file():
            return str(path), None
        raise ModelLoadError(
            describe(
                f"not an SD3 model folder: {path}",
                expected="a diffusers pipeline folder with transformer/config.json, or a transformer folder with config.json",
            )
        )
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ModelLoadError(describe(f"model path does not exist: {text}", fix="pass an existing folder or a hub id like stabilityai/stable-diffusion-3.5-large"))
    return text, "transformer"


def load_transformer(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Loads a diffusers ``SD3Transformer2DModel`` in eval mode.

    Args:
        source: a pipeline root (with ``transformer/``), a transformer folder, or a hub id.
    """
    from diffusers import SD3Transformer2DModel

    where, subfolder = resolve_transformer_source(source)
    try:
        model = SD3Transformer2DModel.from_pretrained(where, subfolder=subfolder, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            describe(f"could not load SD3 transformer from {source!r}", got=first_line, fix="check the path, or download the model and pass its local folder (this host may be offline)")
        ) from exc
    return model.to(device).eval()


def check_pair(small_config, large_config) -> None:
    """Raises :class:`IncompatibleModelsError` if the two models cannot be stitched."""
    diffs = [
        f"{f}: small={small_config.get(f)} large={large_config.get(f)}"
        for f in PAIR_FIELDS
        if small_config.get(f) != large_config.get(f)
    ]
    if diffs:
        raise IncompatibleModelsError(
            describe("small and large models cannot be stitched", got="; ".join(diffs), expected="equal latent space and text conditioning (SD3 / SD3.5 family)")
        )


def model_dims(model) -> ModelDims:
    return ModelDims.from_config(model.config)
