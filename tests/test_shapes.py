"""The shapes preset: scenes, the training command (a few steps), the shipped weights, and that
the method works on the trained pair."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hs_export.presets import clip_tokenizer, ensure_preset
from hs_export.shapes import scenes
from hs_export.shapes.train import CACHE_NAME, ShapesTrainConfig, read_cache, train_shapes
from hs_runtime.errors import ConfigError
from hs_runtime.presets import get_preset


def test_scenes_are_seeded_and_prompts_name_what_is_drawn():
    a, prompts_a = scenes.make_scenes(6, seed=3, size=64)
    b, prompts_b = scenes.make_scenes(6, seed=3, size=64)
    assert np.array_equal(a, b) and prompts_a == prompts_b
    assert a.shape == (6, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = scenes.sample_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        words = scene.prompt.replace(",", " , ").split()
        assert set(words) <= set(scenes.VOCABULARY)
        for shape in scene.shapes:
            assert shape.kind in words and shape.colour in words and shape.colour != scene.background_colour


def test_every_prompt_fits_the_text_encoders_whole():
    spec = get_preset("shapes")
    tokenizer = clip_tokenizer(scenes.VOCABULARY, spec.clip_tokens)
    rng = np.random.default_rng(1)
    longest = max(len(tokenizer(scenes.sample_scene(rng).prompt).input_ids) for _ in range(500))
    assert longest <= spec.clip_tokens  # vocabulary words are single tokens: nothing is truncated


def test_the_tokenizer_is_the_same_in_every_process():
    """Seeded training needs the same word → id map each run (the BPE trainer numbers by hash order
    unless told otherwise, and Rust's hash seed changes per process)."""
    code = "from hs_export.presets import clip_tokenizer; from hs_export.shapes import scenes; print(clip_tokenizer(scenes.VOCABULARY).backend_tokenizer.to_str())"
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout)
    here = json.loads(clip_tokenizer(scenes.VOCABULARY).backend_tokenizer.to_str())
    assert here["model"]["vocab"] == other["model"]["vocab"] and here["model"]["merges"] == other["model"]["merges"]


def test_text_targets_bind_every_word_to_its_object():
    """T5 (bidirectional) learns every word of an object, causal CLIP only each object's last word;
    separators and padding teach nothing; the pooled vector learns the whole scene."""
    from hs_export.shapes.text_encoders import IGNORE, SLOTS, scene_targets, token_targets

    prompt = "a striped red circle , a blue square and a green star on a yellow gradient"
    tokens = ["<s>", *prompt.split(), "</s>", "<pad>"]
    every = token_targets(["▁" + t for t in tokens], every_word=True)
    last = token_targets([t + "</w>" for t in tokens], every_word=False)
    colour = list(scenes.COLOURS).index
    assert every["colour"][1:5] == [colour("red")] * 4 and every["slot"][1:5] == [0] * 4
    assert every["slot"][5] == IGNORE and every["slot"][-2:] == [IGNORE, IGNORE]  # "," and padding
    assert every["slot"][13:17] == [IGNORE, SLOTS, SLOTS, SLOTS] and every["colour"][15] == colour("yellow")
    assert [i for i, v in enumerate(last["slot"]) if v != IGNORE] == [4, 8, 12, 16]  # circle, square, star, gradient
    assert last["texture"][4] == scenes.TEXTURES.index("striped") and last["kind"][16] == len(scenes.SHAPES) + 1
    scene = scene_targets(prompt)
    assert scene["background_colour"] == colour("yellow") and scene["count"] == 2 and scene["colour_1"] == colour("blue")
    one = scene_targets("a purple star on a white background")
    assert one["count"] == 0 and one["colour_1"] == len(scenes.COLOURS) and one["kind_2"] == len(scenes.SHAPES)


def test_text_pretraining_teaches_the_encoders_which_object_a_word_belongs_to():
    """120 steps (~8 s): held-out token states say which object a word belongs to and its colour
    (chance: 1/4 and 1/8); the encoders changed and come back in eval mode."""
    from hs_export.presets import text_components
    from hs_export.shapes.text_encoders import train_text_encoders

    spec = get_preset("shapes")
    rng = np.random.default_rng(5)
    prompts = [scenes.sample_scene(rng).prompt for _ in range(600)]
    text = text_components(64, 64, 3, scenes.VOCABULARY, spec.clip_tokens)
    before = [p.detach().clone() for p in text["text_encoder_3"].parameters()]
    report = train_text_encoders(text, prompts[:500], prompts[500:], 120, seed=0, clip_length=spec.clip_tokens, t5_length=spec.max_sequence_length, batch=64, lr=5e-3, log=lambda *_: None)
    accuracy = report["held_out_accuracy"]
    assert accuracy["text_encoder"]["token_slot"] > 0.9 and accuracy["text_encoder_2"]["token_slot"] > 0.9
    assert accuracy["text_encoder_3"]["token_colour"] > 0.6 and accuracy["text_encoder"]["token_colour"] > 0.5
    assert any(not torch.equal(a, b) for a, b in zip(before, text["text_encoder_3"].parameters()))
    assert not text["text_encoder"].training and not text["text_encoder_3"].training
    lines: list[str] = []
    late = train_text_encoders(text, prompts[:8], prompts[8:10], 5, seed=0, clip_length=spec.clip_tokens, t5_length=spec.max_sequence_length, deadline=0.0, log=lines.append)
    assert late["steps"] == 0 and late["planned_steps"] == 5 and lines == ["[text] time budget reached after 0 of 5 steps"]


def test_training_command_writes_a_pipeline_that_loads(tmp_path):
    """A few steps of every phase on 64² scenes: the real code path, not a useful model."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    out = tmp_path / "shapes"
    config = ShapesTrainConfig(out=out, scenes=24, held_out=8, vae_pool=16, vae_steps=3, text_steps=2, small_steps=3, large_steps=3, batch=4, warmup=1, image_size=64, threads=1, work_dir=tmp_path / "work")
    report = train_shapes(config, log=lambda *_: None)
    cache = read_cache(tmp_path / "work" / CACHE_NAME, config.data_key())
    # The cache keeps scenes, never prompt embeddings: those always come from the encoders that ship.
    assert len(cache["prompts"]["train"]) == 24 and "embeds" not in str(sorted(cache))
    assert cache["latents"]["train"].shape[0] == 24 and cache["vae"]
    assert report["text"]["steps"] == 2 and set(report["text"]["held_out_accuracy"]) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert report["large"]["steps"] == 3 and set(report["small"]["held_out_loss"]) == {"0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"}
    assert json.loads((out / "training.json").read_text())["vae"]["parameters"] > 0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "large"))
    small = SD3Transformer2DModel.from_pretrained(str(out / "small" / "transformer"))
    from safetensors import safe_open

    with safe_open(str(next((out / "large" / "transformer").glob("*.safetensors"))), "pt") as weights:
        assert all(weights.get_tensor(k).dtype == torch.float16 for k in weights.keys())  # shipped in fp16
    assert small.config.num_layers == get_preset("shapes").small["num_layers"]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8


def _planted_pickle(path, marker):
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    path.write_bytes(pickle.dumps({"key": None, "payload": Payload()}))


def test_work_dir_cache_never_unpickles_and_rebuilds_what_it_cannot_read(tmp_path):
    """A planted pickle (the old encoded.pt) is never loaded; a damaged cache is rebuilt with a
    one-line note; a good one is reused."""
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "code-ran"
    _planted_pickle(work / "encoded.pt", marker)
    (work / CACHE_NAME).write_bytes(b"not a safetensors file at all")
    config = ShapesTrainConfig(out=tmp_path / "a", scenes=8, held_out=4, vae_pool=8, vae_steps=1, text_steps=1, small_steps=1, large_steps=1, batch=2, warmup=1, image_size=64, threads=1, work_dir=work)
    lines: list[str] = []
    train_shapes(config, log=lines.append)
    assert not marker.exists()  # nothing was unpickled
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert "never loaded" in notes[0] and "cannot read the cache" in notes[1] and "rebuilding" in notes[1]
    assert read_cache(work / CACHE_NAME, config.data_key()) is not None  # rebuilt as safetensors
    lines.clear()
    train_shapes(ShapesTrainConfig(**{**config.__dict__, "out": tmp_path / "b"}), log=lines.append)
    assert any(line.startswith("reusing the VAE") for line in lines) and not any("cannot read" in line for line in lines)
    lines.clear()
    assert read_cache(work / CACHE_NAME, {**config.data_key(), "seed": 99}, log=lines.append) is None
    assert any("other settings" in line for line in lines)


@pytest.mark.parametrize(
    "changes, message",
    [({"scenes": 0}, "scenes must be >= 1"), ({"text_steps": -1}, "text_steps must be >= 0"), ({"cfg_dropout": 1.0}, "cfg_dropout out of range"), ({"budget_minutes": 0}, "--budget-minutes must be a number > 0"),
     ({"budget_minutes": float("nan")}, "--budget-minutes must be a number > 0"), ({"threads": 0}, "--threads must be >= 1"), ({"seed": -1}, "--seed out of range"),
     ({"seed": 2**64}, "--seed out of range"), ({"scenes": 1000}, "--scenes must be >= 2000: the VAE trains on a pool of that many scenes")],
)
def test_bad_training_settings(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        train_shapes(ShapesTrainConfig(out=tmp_path / "x", **changes), log=lambda *_: None)


def test_training_refuses_a_file_or_a_foreign_folder_as_out(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "full", "is not empty")):
        with pytest.raises(ConfigError, match=message):
            train_shapes(ShapesTrainConfig(out=out), log=lambda *_: None)


# ---- the shipped, trained pair ------------------------------------------------------------------


@pytest.fixture(scope="session")
def shapes_runtime():
    from hs_runtime.runtime import HybridStitchRuntime

    paths = ensure_preset("shapes")
    spec = get_preset("shapes")
    return HybridStitchRuntime.from_models(paths.small, paths.large, paths.pipeline, max_sequence_length=spec.max_sequence_length)


def test_shipped_weights_load_with_from_pretrained(shapes_runtime):
    from hs_runtime.contract import LARGE, SMALL

    spec = get_preset("shapes")
    assert shapes_runtime.engines[LARGE].dims.num_layers == spec.large["num_layers"]
    assert shapes_runtime.engines[SMALL].dims.hidden == spec.small["num_attention_heads"] * spec.small["attention_head_dim"]
    assert shapes_runtime.text_and_vae().vae_scale_factor == 8


def test_the_method_works_on_the_trained_pair(shapes_runtime):
    """The default hybrid keeps the large model's image better than the small model alone, and
    refining all tokens (ratio 1.0) beats refining a tenth of them: 2 prompts × 2 seeds, each
    image its own seed as `generate --seeds` draws it (single images vary by several dB)."""
    from hs_export.quality.metrics import ImageDistance, to_tensor
    from hs_runtime.pipeline import initial_latents
    from hs_runtime.plans import PlanConfig, make_plan, with_mask

    spec = get_preset("shapes")
    text_and_vae = shapes_runtime.text_and_vae()
    prompts = ["a striped red circle and a blue square on a yellow background", "a checkered green star on a purple gradient"] * 2
    conditioning = text_and_vae.encode(prompts, None, True, spec.max_sequence_length)
    latents = initial_latents(len(prompts), spec.height, spec.width, seed=[0, 0, 1, 1])
    plans = {name: make_plan(name, spec.steps, PlanConfig()) for name in ("large", "small", "hybrid")}
    # The token budget's effect alone: without text K/V reuse, whose staleness ratio 1.0 keeps too.
    plain = make_plan("hybrid", spec.steps, PlanConfig(reuse_text_kv=False, small_outside_mask=False))
    plans["ratio 1.0"] = with_mask(plain, ratio=1.0)
    plans["ratio 0.1"] = with_mask(plain, ratio=0.1)
    images = {
        name: to_tensor(text_and_vae.decode(shapes_runtime.denoise(plan, latents, conditioning, guidance_scale=spec.guidance_scale).latents))
        for name, plan in plans.items()
    }
    distance = ImageDistance()
    psnr = {name: np.mean([r["psnr"] for r in distance(images[name], images["large"])]) for name in plans if name != "large"}
    assert psnr["hybrid"] > psnr["small"] + 1.0, psnr
    assert psnr["ratio 1.0"] > psnr["ratio 0.1"] + 1.0, psnr



def test_the_prompt_changes_the_image(shapes_runtime):
    """Same noise, different prompts → different images. (How well the pair follows a prompt is
    measured, not asserted: docs/quality.md, "The shapes pair".)"""
    from hs_export.quality.metrics import to_tensor
    from hs_runtime.pipeline import initial_latents
    from hs_runtime.plans import make_plan

    spec = get_preset("shapes")
    prompts = ["a red circle on a blue background", "a checkered yellow square on a purple background"]
    text_and_vae = shapes_runtime.text_and_vae()
    conditioning = text_and_vae.encode(prompts, None, True, spec.max_sequence_length)
    latents = initial_latents(len(prompts), spec.height, spec.width, seed=[0] * len(prompts))
    result = shapes_runtime.denoise(make_plan("large", spec.steps), latents, conditioning, guidance_scale=spec.guidance_scale)
    images = to_tensor(text_and_vae.decode(result.latents))
    assert (images[0] - images[1]).abs().mean() > 0.05


def test_output_folders_that_cannot_be_made_are_refused_before_training(tmp_path):
    """--out / --work-dir are written after the whole run (56 min): under a file, refused first."""
    (tmp_path / "afile").write_text("x")
    for changes in ({"out": tmp_path / "afile" / "model"}, {"out": tmp_path / "ok", "work_dir": tmp_path / "afile" / "work"}):
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            train_shapes(ShapesTrainConfig(**changes), log=lambda *_: None)


def test_a_run_cut_short_by_the_budget_is_not_cached_and_writes_no_untrained_pair(tmp_path, monkeypatch):
    """A VAE or data cut short by the budget is neither cached (a later full run would reuse it) nor
    trained on (the one deadline leaves no step for the transformers): nothing is written."""
    import hs_export.shapes.train as train

    clock = iter(range(0, 10**6, 1000))  # every look at the clock is 1000 s later: the budget ends at once
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
    config = ShapesTrainConfig(out=tmp_path / "out", scenes=8, held_out=4, vae_pool=8, vae_steps=2, text_steps=0, small_steps=2, large_steps=2, batch=2, warmup=1, image_size=64, threads=1, work_dir=tmp_path / "work")
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"the time budget ran out before the transformers' phases; nothing written or cached \| got VAE 0 of 2 steps, 8 of 8 scenes"):
        train_shapes(config, log=lines.append)
    assert any("[vae] time budget reached after 0 of 2 steps" in line for line in lines)
    assert not (tmp_path / "work" / CACHE_NAME).exists() and not (tmp_path / "out").exists()


def test_held_out_text_accuracy_leaves_out_prompts_seen_in_training():
    from hs_export.presets import text_components
    from hs_export.shapes.text_encoders import train_text_encoders

    spec = get_preset("shapes")
    rng = np.random.default_rng(5)
    prompts = [scenes.sample_scene(rng).prompt for _ in range(40)]
    text = text_components(64, 64, 3, scenes.VOCABULARY, spec.clip_tokens)
    kwargs = dict(seed=0, clip_length=spec.clip_tokens, t5_length=spec.max_sequence_length, batch=8, log=lambda *_: None)
    report = train_text_encoders(text, prompts[:30], prompts[25:], 1, **kwargs)
    assert report["held_out_prompts"] == len([p for p in prompts[25:] if p not in set(prompts[:30])])
    assert train_text_encoders(text, prompts[:30], prompts[:5], 1, **kwargs)["held_out_accuracy"] is None
