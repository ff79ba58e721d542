import json

import pytest
import torch

from hs_runtime.contract import ModelDims

from hs_runtime.errors import IncompatibleModelsError, ModelLoadError
from hs_runtime.models import check_pair, load_transformer
from hs_runtime.presets import PRESETS, random_transformer


def test_pipeline_root_and_transformer_folder_load_the_same(tiny_paths):
    a = load_transformer(tiny_paths.large)
    b = load_transformer(tiny_paths.large / "transformer")
    assert ModelDims.from_config(a.config) == ModelDims.from_config(b.config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not an SD3 model folder"):
        load_transformer(tmp_path / "empty")


def test_unreachable_hub_id_says_offline():
    with pytest.raises(ModelLoadError, match="offline"):
        load_transformer("stabilityai/not-a-real-model-for-tests")


def test_incompatible_pair(tiny_models):
    small, large = tiny_models
    other = random_transformer({**PRESETS["tiny"].large, "joint_attention_dim": 48}, 0)
    check_pair(small.config, large.config)
    with pytest.raises(IncompatibleModelsError, match="joint_attention_dim: small=32 large=48"):
        check_pair(small.config, other.config)


def test_preset_is_written_once(tiny_paths):
    marker = json.loads((tiny_paths.root / "preset.json").read_text())
    assert marker["name"] == "tiny" and (tiny_paths.large / "model_index.json").is_file()
