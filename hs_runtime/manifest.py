"""``manifest.json``: what an engine folder holds and what it was built for (DESIGN §3).

The runtime is made from the folder alone; any mismatch names itself and the rebuild command.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .contract import GRAPH_NAMES, ModelDims
from .errors import ManifestError, describe
from .profiles import BuildShape

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class Manifest:
    """A parsed, validated manifest. ``data`` is the JSON document itself."""

    folder: Path
    data: dict

    @property
    def build(self) -> dict:
        return self.data["build"]

    @property
    def backend(self) -> str:
        return self.build["backend"]

    @property
    def rebuild_command(self) -> str:
        return self.build.get("command", "hs-export build ... --force")

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def shape(self) -> BuildShape:
        return BuildShape(**self.build["shape"])

    def dims(self, role: str) -> ModelDims:
        return ModelDims(**self.data["models"][role]["dims"])

    def graph(self, name: str) -> dict:
        return self.data["graphs"][name]

    def engine_path(self, name: str) -> Path:
        return self.folder / self.graph(name)["engine"]["path"]

    def onnx_path(self, name: str) -> Path:
        return self.folder / self.graph(name)["onnx"]["path"]

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Reads and validates ``folder/manifest.json``.

        Raises:
            ManifestError: missing folder or manifest, unreadable JSON, another schema version,
                an incomplete build, or a graph whose engine file is missing.
        """
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(describe(f"engine folder not found: {folder}", fix=f"build one with: hs-export build --preset tiny --out {folder}"))
        if not path.is_file():
            raise ManifestError(describe(f"no {MANIFEST_NAME} in {folder}: not an engine folder", fix=f"build one with: hs-export build --out {folder}"))
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(describe(f"unreadable {path}", got=str(exc))) from exc
        schema = data.get("schema_version")
        manifest = cls(folder, data)
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                describe(f"manifest schema version mismatch in {folder}", got=schema, expected=SCHEMA_VERSION, fix=f"rebuild with: {manifest.rebuild_command} --force")
            )
        if not manifest.complete:
            raise ManifestError(describe(f"engine build in {folder} did not finish", got="ONNX files only", fix=f"finish it with: {manifest.rebuild_command}"))
        missing = [g for g in GRAPH_NAMES if g not in data.get("graphs", {}) or not manifest.engine_path(g).exists()]
        if missing:
            raise ManifestError(describe(f"engine folder {folder} is missing graph(s) {missing}", fix=f"rebuild with: {manifest.rebuild_command} --force"))
        return manifest


def write_manifest(folder: Path, data: dict) -> Path:
    """Writes ``manifest.json`` atomically (temp file + rename), so readers never see half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=folder)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME
