import pytest
from click.testing import CliRunner

from hs_export.cli import main

ARGS = ["generate", "--preset", "tiny", "--prompt", "a red cat", "--steps", "4", "--seed", "0"]


def test_generate_writes_image_and_timings(tiny_paths, tmp_path):
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, [*ARGS, "--plan", "hybrid", "--out", str(out), "--compare"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (128, 128)
    assert Image.open(tmp_path / "out_compare.png").size == (3 * 128, 128)
    for stage in ("large", "mask", "hybrid", "small", "overhead", "total"):
        assert stage in result.output


def test_generate_several_seeds_stacks_one_compare_row_per_image(tiny_paths, tmp_path):
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, [*ARGS, "--seeds", "2", "--mask-energy", "0.5", "--mask-ratio", "0.5", "--out", str(out), "--compare"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(tmp_path / "out_0.png").size == Image.open(tmp_path / "out_1.png").size == (128, 128)
    assert Image.open(tmp_path / "out_compare.png").size == (3 * 128, 2 * 128 + 4)
    assert "seed 0 (of 2)" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--plan", "fastest"], "Invalid value for '--plan'"),
        (["--mask-ratio", "0"], "mask ratio out of range"),
        (["--mask-ratio", "1.2"], "mask ratio out of range"),
        (["--height", "120"], "height must be a positive multiple of 16"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--mask-energy", "1.5"], "mask energy share out of range"),
        (["--mask-energy", "0.5", "--mask-min-ratio", "0.5"], "mask min_ratio out of range"),
        (["--mask-energy", "0.5"], "between min_ratio (--mask-min-ratio, here 0.05) and ratio (--mask-ratio, here 0.02): raise the ratio"),  # the defaults alone
        (["--mask-reselect-every", "2", "--mask-signal", "disagreement"], "mask re-selection needs the detail signal"),
        (["--negative-prompt", "a", "--negative-prompt", "b"], "--negative-prompt given neither once nor once per --prompt | got 2 negative, 1 prompts"),
        (["--seed", str(2**64 - 1), "--seeds", "2"], "seed out of range"),  # the last seed, before any model loads
        (["--prompt", " "], "empty --prompt | got ' '"),  # as the client and the server refuse it
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tiny_paths, tmp_path, extra, message):
    result = CliRunner().invoke(main, [*ARGS, "--out", str(tmp_path / "x.png"), *extra])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_incompatible_models_cli(tiny_paths, tmp_path):
    from hs_runtime.presets import PRESETS, random_transformer

    other = random_transformer({**PRESETS["tiny"].small, "pooled_projection_dim": 16}, 0)
    other.save_pretrained(tmp_path / "other")
    result = CliRunner().invoke(main, ["generate", "--small", str(tmp_path / "other"), "--large", str(tiny_paths.large), "--prompt", "x", "--steps", "2"])
    assert result.exit_code == 1 and "cannot be stitched" in result.output and "Traceback" not in result.output


def test_each_prompt_gets_its_own_negative_prompt(tiny_paths, tmp_path):
    """Two --negative-prompt for two --prompt pair up in order (a second one used to replace the
    first for every prompt): prompt 0's image is the one it gets alone with its own negative."""
    import numpy as np
    from PIL import Image

    def render(name, *args):
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(main, ["generate", "--preset", "tiny", "--steps", "3", "--plan", "large", "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        return out

    render("pair", "--prompt", "a red cat", "--prompt", "a blue dog", "--negative-prompt", "blurry", "--negative-prompt", "dark")
    alone = render("alone", "--prompt", "a red cat", "--negative-prompt", "blurry")
    other = render("other", "--prompt", "a red cat", "--negative-prompt", "dark")
    first = np.asarray(Image.open(tmp_path / "pair_0.png")) if (tmp_path / "pair_0.png").exists() else None
    assert first is not None, sorted(p.name for p in tmp_path.iterdir())
    def diff(path):
        return int(np.abs(first.astype(int) - np.asarray(Image.open(path)).astype(int)).max())

    assert diff(alone) <= 2 < 20 < diff(other), (diff(alone), diff(other))  # batch of 2 vs 1: float rounding only


def test_generate_encodes_the_prompts_once_and_writes_each_seed_as_it_runs(tiny_paths, tmp_path, monkeypatch):
    """Several seeds and --compare render the same prompts: the text encoders run once (they ran
    per seed and again for --compare). A seed's images are on disk before the next seed runs, so
    a long run that fails keeps what it finished."""
    from hs_runtime.errors import NumericalError
    from hs_runtime.pipeline import HybridStitchPipeline, TextAndVae

    counts = {"encode": 0, "render": 0}
    encode, render = TextAndVae.encode, HybridStitchPipeline.__call__

    def counted_encode(self, *args, **kwargs):
        counts["encode"] += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(TextAndVae, "encode", counted_encode)
    result = CliRunner().invoke(main, [*ARGS, "--seeds", "2", "--out", str(tmp_path / "ok.png"), "--compare"])
    assert result.exit_code == 0, result.output
    assert counts["encode"] == 1
    refused = CliRunner().invoke(main, [*ARGS, "--height", "100", "--out", str(tmp_path / "odd.png")])
    assert refused.exit_code == 1 and "height must be a positive multiple of 16" in refused.output, refused.output
    assert counts["encode"] == 1  # refused before the text encoders ran

    def second_fails(self, *args, **kwargs):
        counts["render"] += 1
        if counts["render"] == 2:
            raise NumericalError("the second seed went non-finite")
        return render(self, *args, **kwargs)

    monkeypatch.setattr(HybridStitchPipeline, "__call__", second_fails)
    result = CliRunner().invoke(main, [*ARGS, "--seeds", "2", "--out", str(tmp_path / "cut.png")])
    assert result.exit_code == 1 and "the second seed went non-finite" in result.output
    assert (tmp_path / "cut_0.png").is_file() and not (tmp_path / "cut_1.png").exists()
