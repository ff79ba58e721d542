"""The CLI's error contract, table-driven: every bad input exits 1 (2 for click usage errors) with
exactly one ``Error: …`` line and never a traceback.

A new command adds a TABLE entry; ``test_every_command_is_in_the_table`` fails until it does.
Placeholders in the arguments (``{engines}``, ``{file}``, …) are the paths of the ``places`` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hs_export.cli import main

USAGE = 2  # click: malformed command line
ERROR = 1  # the toolkit's one-line errors

GEN = ["{engines}", "--prompt", "x", "--steps", "4", "--out", "{tmp}/never.png"]  # valid but for the row's change
GEN_MODELS = ["--small", "{small}", "--large", "{large}", "--prompt", "x", "--steps", "4", "--height", "128", "--width", "128", "--out", "{tmp}/never.png"]
BUILD = ["--preset", "tiny", "--out", "{tmp}/build"]
BENCH = ["--preset", "tiny", "--steps", "2", "--warmup", "0", "--repeat", "1", "--plans", "small"]

TABLE: dict[str, list[tuple[list[str], int, str]]] = {
    "generate": [
        ([*GEN, "--width", "0"], ERROR, "width must be a positive multiple of 16 | got 0"),
        ([*GEN, "--height", "-16"], ERROR, "height must be a positive multiple of 16 | got -16"),
        ([*GEN, "--steps", "0"], ERROR, "steps must be >= 1 | got 0"),
        ([*GEN, "--steps", "-3"], ERROR, "steps must be >= 1 | got -3"),
        ([*GEN, "--seed", "-1"], ERROR, "seed out of range | got -1"),
        ([*GEN, "--seed", str(2**64)], ERROR, "seed out of range"),
        ([*GEN, "--guidance-scale", "nan"], ERROR, "guidance scale must be a finite number | got nan"),
        ([*GEN, "--guidance-scale", "-1"], ERROR, "guidance scale must be >= 0"),
        ([*GEN, "--mask-ratio", "0"], ERROR, "mask ratio out of range"),
        ([*GEN, "--mask-ratio", "-0.3"], ERROR, "mask ratio out of range"),
        ([*GEN, "--refresh-every", "-1"], ERROR, "refresh_every must be >= 0"),
        ([*GEN, "--refreshes", "-1"], ERROR, "refreshes must be >= 0"),
        ([*GEN, "--refresh-every", "2", "--refreshes", "1"], ERROR, "--refresh-every and --refreshes both given"),
        ([*GEN, "--large-fraction", "2"], ERROR, "large_fraction out of range"),
        ([*GEN, "--out", "{empty}"], ERROR, "is a folder, not a file"),
        ([*GEN, "--out", "{tmp}/no-extension"], ERROR, "--out needs an image file name"),
        ([*GEN, "--out", "{file}/x.png"], ERROR, "is a file, not a folder"),
        ([*GEN, "--device", "bogus"], ERROR, "unknown device | got 'bogus'"),
        (["{file}", "--prompt", "x"], ERROR, "is a file, not a folder"),
        (["{missing}", "--prompt", "x"], ERROR, "engine folder not found"),
        (["{truncated}", "--prompt", "x"], ERROR, "engines/large.onnx has the wrong size"),
        (["{foreign}", "--prompt", "x"], ERROR, "ONNX Runtime cannot load large engine"),
        (["--small", "{file}", "--large", "{file}", "--prompt", "x"], ERROR, "is a file, not a folder"),
        ([*GEN_MODELS, "--pipeline", "{file}"], ERROR, "pipeline {file} is a file, not a folder"),
        (["--preset", "tiny", "--small", "{small}", "--prompt", "x"], ERROR, "either --preset or --small/--large"),
        ([*GEN, "--plan", "fastest"], USAGE, "Invalid value for '--plan'"),
        ([*GEN, "--steps", "many"], USAGE, "Invalid value for '--steps'"),
        (["{engines}"], USAGE, "Missing option '--prompt'"),
    ],
    "build": [
        ([*BUILD, "--height", "0"], ERROR, "height must be a positive multiple of 16 | got 0"),
        ([*BUILD, "--width", "-16"], ERROR, "width must be a positive multiple of 16 | got -16"),
        ([*BUILD, "--prompts", "0"], ERROR, "prompts must be >= 1 | got 0"),
        ([*BUILD, "--prompts", "-2"], ERROR, "prompts must be >= 1 | got -2"),
        ([*BUILD, "--text-tokens", "0"], ERROR, "text tokens must be >= 1 | got 0"),
        ([*BUILD, "--mask-ratio", "0"], ERROR, "mask ratio out of range"),
        ([*BUILD, "--token-buckets", "0"], ERROR, "token buckets must be >= 1 | got 0"),
        ([*BUILD, "--opset", "0"], ERROR, "opset out of range | got 0 | expected 14..20"),
        ([*BUILD, "--builder-optimization-level", "9"], ERROR, "builder optimization level out of range"),
        (["--preset", "tiny", "--out", "{file}"], ERROR, "--out {file} is a file, not a folder"),
        (["--small", "{file}", "--large", "{file}", "--out", "{tmp}/b2"], ERROR, "is a file, not a folder"),
        (["--small", "{missing}", "--large", "{missing}", "--out", "{tmp}/b3"], ERROR, "model path does not exist"),
        (["--out", "{tmp}/b4"], ERROR, "no models given"),
        ([*BUILD, "--precision", "fp8"], USAGE, "Invalid value for '--precision'"),
        ([*BUILD, "--prompts", "two"], USAGE, "Invalid value for '--prompts'"),
    ],
    "inspect": [
        (["{file}"], ERROR, "engine folder {file} is a file, not a folder"),
        (["{missing}"], ERROR, "engine folder not found"),
        (["{empty}"], ERROR, "no manifest.json"),
        (["{badjson}"], ERROR, "unreadable"),
        (["{truncated}"], ERROR, "has the wrong size"),
        ([], USAGE, "Missing argument"),
    ],
    "verify": [
        (["{engines}", "--steps", "0"], ERROR, "steps must be >= 1 | got 0"),
        (["{engines}", "--device", "bogus"], ERROR, "unknown device"),
        (["{file}"], ERROR, "is a file, not a folder"),
        (["{missing}"], ERROR, "engine folder not found"),
        (["{truncated}"], ERROR, "has the wrong size"),
        (["{tampered}"], ERROR, "verification failed | got engines/large.onnx (sha256 differs)"),
        (["{engines}", "--plan", "fastest"], USAGE, "Invalid value for '--plan'"),
        ([], USAGE, "Missing argument"),
    ],
    "bench": [
        ([*BENCH, "--height", "0"], ERROR, "height must be a positive multiple of 16 | got 0"),
        ([*BENCH, "--width", "-16"], ERROR, "width must be a positive multiple of 16 | got -16"),
        ([*BENCH, "--steps", "0"], ERROR, "--steps must be >= 1 | got 0"),
        ([*BENCH, "--repeat", "0"], ERROR, "--repeat must be >= 1 | got 0"),
        ([*BENCH, "--warmup", "-1"], ERROR, "--warmup must be >= 0 | got -1"),
        ([*BENCH, "--prompts", "0"], ERROR, "prompts must be >= 1 | got 0"),
        ([*BENCH, "--plans", ""], ERROR, "unknown plan in --plans"),
        ([*BENCH, "--sweep-ratio", "0,0.5"], ERROR, "mask ratio out of range"),
        ([*BENCH, "--sweep-ratio", "a,b"], ERROR, "--sweep-ratio takes comma-separated numbers"),
        ([*BENCH, "--sweep-ratio", "0.2,0.20"], ERROR, "a mask ratio repeated in --sweep-ratio | got 0.2,0.2"),  # one row would silently replace the other
        ([*BENCH, "--json", "{empty}"], ERROR, "--json {empty} is a folder, not a file"),
        ([*BENCH, "--sweep-ratio", "0.5", "--plot", "{empty}/sweep.txt"], ERROR, "--plot needs an image file name | got 'sweep.txt'"),  # before the run
        ([*BENCH, "--device", "bogus"], ERROR, "unknown device"),
        (["{file}"], ERROR, "is a file, not a folder"),
        (["{truncated}"], ERROR, "has the wrong size"),
        (["{engines}", "--preset", "tiny"], ERROR, "an engine folder or --preset (one of them) | got both"),
        ([], ERROR, "an engine folder or --preset (one of them) | got neither"),
        ([*BENCH, "--preset", "nope"], USAGE, "Invalid value for '--preset'"),
    ],
    "quality": [  # all refused before any model loads
        (["--preset", "tiny", "--seeds", "0"], ERROR, "--seeds must be >= 1 | got 0"),
        (["--preset", "tiny", "--steps", "0"], ERROR, "--steps must be >= 1 | got 0"),
        (["--preset", "tiny", "--height", "0"], ERROR, "--height must be >= 1 | got 0"),
        (["--preset", "tiny", "--prompts", "0"], ERROR, "--prompts must be >= 1 | got 0"),
        (["--preset", "tiny", "--batch", "0"], ERROR, "--batch must be >= 1 | got 0"),
        (["--preset", "tiny", "--repeat", "0"], ERROR, "repeat >= 1"),
        (["--preset", "tiny", "--plans", "fastest"], ERROR, "unknown plan in --plans"),
        (["--preset", "tiny", "--sweep", "nonsense"], ERROR, "unknown family in --sweep"),
        (["--preset", "tiny", "--guidance-scale", "nan"], ERROR, "guidance scale must be a finite number"),
        (["--preset", "tiny", "--device", "bogus"], ERROR, "unknown device"),
        (["{file}"], ERROR, "is a file, not a folder"),
        (["{truncated}"], ERROR, "has the wrong size"),
        (["--preset", "nope"], USAGE, "Invalid value for '--preset'"),
        (["--preset", "tiny", "--json", "{empty}"], ERROR, "--json {empty} is a folder, not a file"),
        (["--preset", "tiny", "--grid", "{tmp}/grid.txt"], ERROR, "--grid needs an image file name"),
        (["--preset", "tiny", "--prompts", "{empty}"], ERROR, "--prompts is a folder, not a file"),
    ],
    "train-shapes": [
        (["--out", "{file}"], ERROR, "--out is a file, not a folder"),
        (["--out", "{engines}"], ERROR, "is not empty and holds no earlier training"),
        (["--out", "{tmp}/shapes", "--work-dir", "{file}"], ERROR, "--work-dir is a file, not a folder"),
        (["--out", "{tmp}/shapes", "--scenes", "0"], ERROR, "scenes must be >= 1 | got 0"),
        (["--out", "{tmp}/shapes", "--batch", "-1"], ERROR, "batch must be >= 1 | got -1"),
        (["--out", "{tmp}/shapes", "--budget-minutes", "0"], ERROR, "--budget-minutes must be a number > 0"),
        ([], USAGE, "Missing option '--out'"),
    ],
    "serve": [  # all refused before Triton starts
        (["{missing}"], ERROR, "engine folder not found"),
        (["{engines}", "--instances", "0"], ERROR, "--instances must be >= 1 | got 0"),
        (["{engines}", "--http-port", "0"], ERROR, "--http-port out of range | got 0"),
        (["{engines}", "--http-port", "18000", "--grpc-port", "18000"], ERROR, "HTTP, gRPC and metrics ports must differ"),
        (["{engines}", "--max-queue-delay-ms", "-1"], ERROR, "--max-queue-delay-ms out of range"),
        (["{engines}", "--device", "bogus"], ERROR, "unknown device"),
        ([], USAGE, "Missing argument"),
    ],
    "triton-repo": [  # all refused before anything is written
        (["{missing}", "--out", "{tmp}/repo"], ERROR, "engine folder not found"),
        (["{engines}", "--out", "{tmp}/repo", "--instances", "0"], ERROR, "--instances must be >= 1 | got 0"),
        (["{engines}", "--out", "{tmp}/repo", "--max-queue", "-1"], ERROR, "--max-queue must be >= 0 | got -1"),
        (["{engines}", "--out", "{tmp}/repo", "--max-batch-size", "0"], ERROR, "--max-batch-size must be >= 1 | got 0"),
        (["{engines}", "--out", "{tmp}/repo", "--device", "bogus"], ERROR, "unknown device"),
        (["{engines}", "--out", "{engines}"], ERROR, "holds other files"),
        (["{engines}"], USAGE, "Missing option '--out'"),
    ],
    "client": [
        (["--url", "http://127.0.0.1:9", "--prompt", "x", "--out", "{tmp}/never.png"], ERROR, "cannot reach a HybridStitch server at http://127.0.0.1:9"),
        (["--url", "ftp://127.0.0.1:9", "--prompt", "x"], ERROR, "unsupported server URL"),
        (["--url", "http://127.0.0.1:9", "--prompt", "x", "--steps", "0"], ERROR, "steps must be >= 1 | got 0"),
        (["--url", "http://127.0.0.1:9", "--prompt", "x", "--seed", "-1"], ERROR, "seed out of range | got -1"),
        (["--url", "http://127.0.0.1:9", "--prompt", "x", "--mask-ratio", "1.5"], ERROR, "mask ratio out of range"),
        ([], USAGE, "Missing option '--prompt'"),
    ],
    "bench-serve": [
        (["http://127.0.0.1:9", "--concurrency", "0"], ERROR, "--concurrency takes positive integers"),
        (["http://127.0.0.1:9", "--concurrency", "a,b"], ERROR, "--concurrency takes comma-separated integers"),
        (["http://127.0.0.1:9", "--requests", "0"], ERROR, "--requests must be >= 1"),
        (["http://127.0.0.1:9", "--baseline", "{missing}"], ERROR, "cannot read the baseline"),
        (["http://127.0.0.1:9", "--requests", "1"], ERROR, "cannot reach a HybridStitch server at http://127.0.0.1:9"),
    ],
}

CASES = [
    pytest.param(command, args, code, fragment, id=f"{command} {' '.join(args)}")
    for command, rows in TABLE.items()
    for args, code, fragment in rows
]


@pytest.fixture(scope="module")
def places(tiny_engine_dir, tiny_paths, tmp_path_factory) -> dict[str, str]:
    """Paths the table's placeholders stand for: good, missing, wrong-kind and damaged ones."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "a-file.txt").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text("{not json")
    damaged = {}
    for name in ("truncated", "tampered", "foreign"):
        damaged[name] = root / name
        shutil.copytree(tiny_engine_dir, damaged[name])
    engine = "engines/large.onnx"
    data = (tiny_engine_dir / engine).read_bytes()
    (damaged["truncated"] / engine).write_bytes(data[: len(data) // 3])  # a partial copy
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    (damaged["tampered"] / engine).write_bytes(bytes(flipped))  # same size, other bytes
    (damaged["foreign"] / engine).write_bytes(b"\0" * len(data))  # right size, not ONNX at all
    return {
        "engines": str(tiny_engine_dir), "file": str(root / "a-file.txt"), "missing": str(root / "nowhere"),
        "empty": str(root / "empty"), "badjson": str(root / "badjson"), "tmp": str(root),
        "small": str(tiny_paths.small), "large": str(tiny_paths.large), **{k: str(v) for k, v in damaged.items()},
    }


@pytest.mark.parametrize("command, args, code, fragment", CASES)
def test_bad_input_gives_one_error_line(command, args, code, fragment, places):
    argv = [command, *(a.format(**places) for a in args)]
    result = CliRunner().invoke(main, argv)
    output = result.output
    assert isinstance(result.exception, SystemExit), f"escaped exception {result.exception!r}\n{output}"
    assert result.exit_code == code, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert fragment.format(**places) in errors[0], output
    assert "Traceback" not in output


def test_every_command_is_in_the_table():
    assert set(main.commands) <= set(TABLE), f"add rows for {sorted(set(main.commands) - set(TABLE))} to TABLE"


def test_no_row_leaves_files_behind(places):
    assert not any(p.name == "never.png" for p in Path(places["tmp"]).rglob("*"))
    for name in ("build", "b2", "b3", "b4", "shapes"):
        folder = Path(places["tmp"]) / name
        assert not folder.exists() or not any(folder.iterdir())


def test_foreign_engine_file_keeps_the_library_reason(places):
    """The ONNX Runtime error is turned into ours, with ORT's own one-line reason kept."""
    manifest = json.loads((Path(places["foreign"]) / "manifest.json").read_text())
    assert manifest["artifacts"]  # sizes match, so only the library can tell
    result = CliRunner().invoke(main, ["inspect", places["foreign"]])
    assert result.exit_code == 0  # inspect reads the manifest only
    result = CliRunner().invoke(main, ["generate", places["foreign"], "--prompt", "x", "--out", places["tmp"] + "/never.png"])
    assert "INVALID_PROTOBUF" in result.output or "ONNXRuntimeError" in result.output
    assert "rebuild with: hs-export build" in result.output


def test_io_errors_say_what_fixes_them():
    """A read-only file system is not cured by freeing space: the way out follows the errno."""
    import errno

    import click

    from hs_export.cli import _one_line_errors

    def fails(code):
        @_one_line_errors
        def write():
            raise OSError(code, os.strerror(code), "out.png")

        with pytest.raises(click.ClickException) as info:
            write()
        return info.value.message

    assert fails(errno.EROFS) == "I/O error on out.png | got Read-only file system | choose a path on a writable file system"
    assert fails(errno.ENOSPC).endswith("| free some space or choose another path")
