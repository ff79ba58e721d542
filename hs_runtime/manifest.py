"""``manifest.json``: what an engine folder holds and what it was built for (DESIGN §3).

The runtime is made from the folder alone; any mismatch names itself and the rebuild command.
Every file of the folder is recorded with its size and sha256 (``artifacts``): loading checks the
sizes (a ``stat`` per file), so a file cut short by a partial copy or a full disk is named before
any engine library reads it; ``hs-export verify`` checks the hashes.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from .contract import GRAPH_NAMES, ModelDims, graph_spec
from .errors import ManifestError, describe
from .profiles import BuildShape
from .validation import check_folder_path

# 3: contract v3 (K and V as separate tensors); 2: contract v2 (one graph per model, per-module
# K/V stacked as [2, B, N, D]); 1: three graphs. Folders of an older schema are refused with the
# rebuild command. Folders without artifact records still load (sizes unchecked).
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("build", "models", "graphs")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks (engines reach tens of GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_records(folder: Path) -> list[dict]:
    """``{"path", "bytes", "sha256"}`` for every file of an engine folder but the manifest itself
    (engines, their ``.data`` files, ONNX files, session settings), in path order."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


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
        """The recorded build command, with ``--out`` naming this folder (a copied or moved
        folder's hint must not rebuild, with ``--force``, the one it was copied from)."""
        build = self.data.get("build")
        command = build.get("command") if isinstance(build, dict) else None
        if not isinstance(command, str):
            return "hs-export build ... --force"
        try:
            words = shlex.split(command)
        except ValueError:
            return command
        if "--out" in words[:-1]:
            start = words.index("--out") + 1
            end = next((i for i in range(start, len(words)) if words[i].startswith("--")), len(words))
            words[start:end] = [str(self.folder.resolve())]  # older commands held the path unquoted
        return shlex.join(words)

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def shape(self) -> BuildShape:
        return BuildShape(**self.build["shape"])

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel of the build (SD3: 8)."""
        return max(1, int(self.build["height"]) // self.shape.latent_height)

    @property
    def artifacts(self) -> list[dict]:
        """The recorded files (empty for folders built before records existed)."""
        return list(self.data.get("artifacts", []))

    @property
    def damaged_fix(self) -> str:
        return f"copy the whole folder again, or rebuild with: {self.rebuild_command} --force"

    def check_sizes(self) -> None:
        """Compares every recorded file's size with the disk (cheap: one ``stat`` each).

        Raises:
            ManifestError: naming the first missing or resized file, and the rebuild command.
        """
        for record in self.artifacts:
            path = self.folder / record["path"]
            if not path.is_file():
                raise ManifestError(describe(f"damaged engine folder {self.folder}: {record['path']} is missing", expected=f"{record['bytes']} bytes as built", fix=self.damaged_fix))
            size = path.stat().st_size
            if size != record["bytes"]:
                raise ManifestError(
                    describe(
                        f"damaged engine folder {self.folder}: {record['path']} has the wrong size", got=f"{size} bytes",
                        expected=f"{record['bytes']} bytes as built (cut short by a partial copy or a full disk?)", fix=self.damaged_fix,
                    )
                )

    def hash_problems(self) -> list[tuple[str, str | None]]:
        """``(path, problem or None)`` per recorded file, comparing sha256 (reads every byte)."""
        results = []
        for record in self.artifacts:
            path = self.folder / record["path"]
            if not path.is_file():
                results.append((record["path"], "missing"))
            elif sha256_file(path) != record["sha256"]:
                results.append((record["path"], "sha256 differs"))
            else:
                results.append((record["path"], None))
        return results

    def dims(self, role: str) -> ModelDims:
        return ModelDims(**self.data["models"][role]["dims"])

    def graph(self, name: str) -> dict:
        return self.data["graphs"][name]

    def engine_path(self, name: str) -> Path:
        return self.folder / self.graph(name)["engine"]["path"]

    def onnx_path(self, name: str) -> Path | None:
        """The graph's ONNX file, or ``None`` when the build deleted it (TensorRT, no --keep-onnx)."""
        path = self.graph(name)["onnx"]["path"]
        return None if path is None else self.folder / path

    def _check_fields(self, path: Path) -> None:
        """The fields every command reads, of the types they read them as, and every recorded
        path inside the folder (a hand-edited or foreign manifest names its fault in one line)."""

        def refuse(what: str, got) -> ManifestError:
            return ManifestError(describe(f"{path} is not a valid engine manifest: {what}", got=got, fix=f"rebuild with: {self.rebuild_command} --force"))

        build = self.data["build"]
        if not isinstance(build, dict):
            raise refuse("build is not an object", type(build).__name__)
        for key, allowed in (("backend", ("onnxruntime", "tensorrt")), ("precision", ("fp32", "fp16", "bf16"))):
            if build.get(key) not in allowed:
                raise refuse(f"unknown build.{key}", repr(build.get(key)))
        for key in ("height", "width"):
            if isinstance(build.get(key), bool) or not isinstance(build.get(key), int) or build[key] < 1:
                raise refuse(f"build.{key} is not a positive integer", repr(build.get(key)))
        if not _is_int(build.get("max_sequence_length")):  # negative in folders built without a pipeline before 2026-12-07: unused there
            raise refuse("build.max_sequence_length is not an integer", repr(build.get("max_sequence_length")))
        if "io_dtype" in self.data and self.data["io_dtype"] != build["precision"]:
            raise refuse("io_dtype is not the build's precision", f"{self.data['io_dtype']!r} for {build['precision']} engines")
        try:
            shape = self.shape
        except (TypeError, ValueError) as exc:  # BuildShape's own checks raise ConfigError (a ValueError)
            raise refuse("build.shape is not a build shape", str(exc).split(" | ")[0]) from None
        for f in fields(BuildShape):  # JSON holds any type: "16" or 1.5 would fail far from here
            value, kind = getattr(shape, f.name), {"int": int, "float": float, "bool": bool}[str(f.type)]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise refuse(f"build.shape.{f.name} is not {'an' if kind is int else 'a'} {kind.__name__}", repr(value))
        if min(shape.latent_height, shape.latent_width, shape.prompts, shape.text_tokens) < 1 or not 0 < shape.mask_ratio <= 1:
            raise refuse("build.shape has a size below 1 or a mask ratio outside (0, 1]", repr(self.build["shape"])[:120])
        graphs = self.data["graphs"]
        if not isinstance(graphs, dict) or not all(isinstance(g, dict) and isinstance((g.get("engine") or {}).get("path"), str) for g in graphs.values()):
            raise refuse("graphs lack their engine paths", type(graphs).__name__)
        models = self.data.get("models") if isinstance(self.data.get("models"), dict) else {}
        for name in GRAPH_NAMES:  # what loading, inspect and verify read of each graph and model
            graph, model = graphs.get(name), models.get(name)
            if not isinstance(graph, dict) or not isinstance(graph.get("profiles"), list) or not isinstance(graph.get("onnx"), dict) or not isinstance(graph.get("parity"), dict):
                raise refuse(f"graphs.{name} lacks its profiles, onnx or parity record", repr(sorted(graph) if isinstance(graph, dict) else graph)[:120])
            if not isinstance(model, dict) or not isinstance(model.get("source"), str) or not isinstance(model.get("sha256"), str) or not isinstance(model.get("dims"), dict):
                raise refuse(f"models.{name} lacks its source, sha256 or dims", repr(sorted(model) if isinstance(model, dict) else model)[:120])
            try:
                dims = self.dims(name)
            except (TypeError, ValueError) as exc:
                raise refuse(f"models.{name}.dims are not model dimensions", str(exc).split(" | ")[0]) from None
            odd = [f.name for f in fields(ModelDims) if not _is_int(getattr(dims, f.name)) or getattr(dims, f.name) < 1]
            if odd:
                raise refuse(f"models.{name}.dims.{odd[0]} is not a positive integer", repr(getattr(dims, odd[0])))
            inputs = graph_spec(name, dims).input_names
            if not graph["profiles"] or not all(isinstance(p, dict) and all(_is_range(p.get(i)) for i in inputs) for p in graph["profiles"]):
                raise refuse(f"graphs.{name}.profiles are not [min, opt, max] shapes of every input", repr(graph["profiles"])[:120])
        if not isinstance(self.data.get("versions"), dict):
            raise refuse("versions is not an object", type(self.data.get("versions")).__name__)
        artifacts = self.data.get("artifacts", [])
        if not isinstance(artifacts, list):
            raise refuse("artifacts is not a list", type(artifacts).__name__)
        for record in artifacts:
            if not (isinstance(record, dict) and isinstance(record.get("path"), str) and isinstance(record.get("sha256"), str)
                    and isinstance(record.get("bytes"), int) and not isinstance(record["bytes"], bool) and record["bytes"] >= 0):
                raise refuse("a file record is not {path, bytes, sha256}", repr(record)[:120])
        root = self.folder.resolve()
        recorded = [g["engine"]["path"] for g in graphs.values()] + [a["path"] for a in artifacts]
        outside = [p for p in recorded if not isinstance(p, str) or not (self.folder / p).resolve().is_relative_to(root)]
        if outside:
            raise refuse("a recorded file lies outside the folder", repr(outside[0]))

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Reads and validates ``folder/manifest.json``.

        Raises:
            ManifestError: missing folder or manifest (or a file in its place), unreadable JSON,
                another schema version, an incomplete build, a graph whose engine file is missing,
                or a file whose size differs from the one recorded at build time.
        """
        folder = check_folder_path(folder, "engine folder", ManifestError, fix="pass the folder hs-export build wrote (with manifest.json)")
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(describe(f"engine folder not found: {folder}", fix=f"build one with: hs-export build --preset tiny --out {folder}"))
        if not path.is_file():
            raise ManifestError(describe(f"no {MANIFEST_NAME} in {folder}: not an engine folder", fix=f"build one with: hs-export build --out {folder}"))
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(describe(f"unreadable {path}", got=str(exc), fix="rebuild the folder with hs-export build ... --force")) from exc
        lacking = [key for key in REQUIRED_KEYS if key not in data] if isinstance(data, dict) else list(REQUIRED_KEYS)
        if lacking:
            raise ManifestError(describe(f"{path} is not an engine manifest", got=f"no {', '.join(lacking)}", fix="rebuild the folder with hs-export build ... --force"))
        schema = data.get("schema_version")
        manifest = cls(folder, data)
        if schema != SCHEMA_VERSION:
            what = "an older engine contract (K/V stacked as one tensor)" if isinstance(schema, int) and schema < SCHEMA_VERSION else "another engine contract"
            raise ManifestError(
                describe(f"engine folder {folder} was built for {what}", got=f"schema {schema!r}", expected=f"schema {SCHEMA_VERSION}", fix=f"rebuild with: {manifest.rebuild_command} --force")
            )
        if not manifest.complete:
            raise ManifestError(describe(f"engine build in {folder} did not finish", got="ONNX files only", fix=f"finish it with: {manifest.rebuild_command}"))
        manifest._check_fields(path)
        missing = [g for g in GRAPH_NAMES if g not in data.get("graphs", {}) or not manifest.engine_path(g).exists()]
        if missing:
            raise ManifestError(describe(f"engine folder {folder} is missing graph(s) {missing}", fix=f"rebuild with: {manifest.rebuild_command} --force"))
        manifest.check_sizes()
        return manifest


def write_manifest(folder: Path, data: dict) -> Path:
    """Writes ``manifest.json`` atomically (temp file + rename), so readers never see half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=folder)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; engine folders are shared and copied
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_range(shapes) -> bool:
    """``[min, opt, max]``: three shapes of one rank, of non-negative integers."""
    return (isinstance(shapes, list) and len(shapes) == 3 and all(isinstance(s, list) for s in shapes)
            and len({len(s) for s in shapes}) == 1 and all(_is_int(d) and d >= 0 for s in shapes for d in s))
