"""The README's first command, minus the install, runs as written (in a scratch folder)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)


def test_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert _bash_blocks()[1].strip() in ci


def test_first_command_runs(preset_root, tmp_path):
    steps = [s.strip() for s in _bash_blocks()[0].split("&&")]
    assert steps[0].startswith("python3 -m pip install torch==2.13.0")
    env = {**os.environ, "HS_PRESET_DIR": str(preset_root)}
    for step in steps[1:]:
        argv = shlex.split(step)
        assert argv[0] == "hs-export"
        cmd = [sys.executable, "-c", "from hs_export.cli import main; main()", *argv[1:]]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "engines" / "shapes" / "manifest.json").is_file()
    assert (tmp_path / "out_compare.png").is_file() and len(list(tmp_path.glob("out_[0-9].png"))) == 4  # seeds 0–3
