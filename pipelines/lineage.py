"""Content-addressed stage records and run lineage (local dir or s3://), written atomically.

Each stage writes ``<run_root>/<stage>/<key>/_stage.json`` last; its presence (with the same key) means the stage is
complete, so a rerun skips it. ``<run_root>/runs/<run_id>/lineage.json`` says what produced what from which inputs;
``<run_root>/runs/latest.json`` points at the newest run (for ``softmask status``).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

MARKER = "_stage.json"


def digest(*parts, length: int = 16) -> str:
    """Stable hash of JSON-able parts (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def code_version(*packages: str) -> str:
    """Hash of every .py file of the named top-level packages (models, workers, pipelines, infra)."""
    import importlib

    h = hashlib.sha256()
    for name in packages:
        root = Path(inspect.getsourcefile(importlib.import_module(name))).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return "src-" + h.hexdigest()[:16]


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def _fs(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def read_json(uri: str) -> dict | None:
    fs, path = _fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def write_json(uri: str, data: dict) -> None:
    """Atomic: write a temp object next to it, then move it into place (rename locally, copy+delete on S3)."""
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)
    else:
        fs.mv(tmp, path)


def stage_record(stage_dir: str) -> dict | None:
    return read_json(join(stage_dir, MARKER))


def complete(stage_dir: str, record: dict) -> dict:
    record = {**record, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(join(stage_dir, MARKER), record)
    return record


def write_lineage(run_root: str, run_id: str, lineage: dict) -> str:
    uri = join(run_root, "runs", run_id, "lineage.json")
    write_json(uri, lineage)
    write_json(join(run_root, "runs", "latest.json"), {"run_id": run_id, "lineage": uri})
    return uri
