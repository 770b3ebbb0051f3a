"""Content-addressed stage records and run lineage (local dir or s3://), written atomically (infra.storage).

Each stage writes ``<run_root>/<stage>/<key>/_stage.json`` last; its presence (with the same key) means the stage is
complete, so a rerun skips it. ``<run_root>/runs/<run_id>/lineage.json`` says what produced what from which inputs;
``<run_root>/runs/latest.json`` points at the newest run (for ``softmask status``).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

from infra.storage import join, read_json, write_json

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


def stage_record(stage_dir: str) -> dict | None:
    return read_json(join(stage_dir, MARKER), missing_ok=True)


def complete(stage_dir: str, record: dict) -> dict:
    record = {**record, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(join(stage_dir, MARKER), record)
    return record


def write_lineage(run_root: str, run_id: str, lineage: dict) -> str:
    uri = join(run_root, "runs", run_id, "lineage.json")
    write_json(uri, lineage)
    write_json(join(run_root, "runs", "latest.json"), {"run_id": run_id, "lineage": uri})
    return uri
