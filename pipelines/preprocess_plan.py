"""Preprocessing plan: which files the sources name, their fingerprints, and the deterministic cut into shard jobs.

A job depends only on the source bytes and the output-affecting settings (never on which worker runs it or when):
text/jsonl files are cut into byte ranges near multiples of ``shard_bytes``, each cut moved to just past a document
separator; Parquet and HF ``save_to_disk`` sources into row ranges of ``shard_rows``. Used by pipelines.preprocess.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from typing import TYPE_CHECKING

from infra.config import ConfigError
from infra import storage
from workers.tokenize import next_boundary

if TYPE_CHECKING:
    from pipelines.preprocess_config import PreprocessConfig, SourceConfig

# suffix -> source kind for format "auto"
SUFFIX_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl",
                ".ndjson": "jsonl", ".parquet": "parquet",
                # source code is plain text (code corpora for code models)
                **{ext: "text" for ext in (".py", ".c", ".h", ".cc", ".cpp", ".js", ".ts", ".java", ".go", ".rs",
                                           ".sh", ".rb")}}
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # a datasets save_to_disk folder


# ------------------------------------------------------------------------------------------------ sources
def _is_hf_dir(path: str, fs) -> bool:
    return fs.isdir(path) and any(fs.exists(f"{path}/{n}") for n in HF_MARKERS)


def _kind(path: str, src: SourceConfig, fs) -> str:
    if src.format != "auto":
        return src.format
    if _is_hf_dir(path, fs):
        return "hf_disk"
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUFFIX_KINDS:
        raise ConfigError(f"sources: cannot tell the format of {path!r} (suffix {ext or 'none'}); "
                          f"set sources[].format to one of text/jsonl/parquet/hf_disk")
    return SUFFIX_KINDS[ext]


def expand_source(src: SourceConfig, i: int, so: dict) -> list[tuple[str, str]]:
    """(uri, kind) of every file (or hf_disk dir) of source ``i``, sorted; FileNotFoundError names the source."""
    spec = src.path
    if spec.startswith("corpus://"):
        from pipelines.corpus import ensure_corpus

        name, _, pattern = spec[len("corpus://"):].partition("/")
        spec = os.path.join(str(ensure_corpus(name)), pattern or "*.txt")
    fs, path = storage.filesystem(spec, so)
    prefix = "s3://" if storage.is_s3(spec) else ""
    if globlib.has_magic(path):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isdir(path) and (src.format == "hf_disk" or _is_hf_dir(path, fs)):
        paths = [path]
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if os.path.splitext(p)[1].lower() in SUFFIX_KINDS)
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"sources[{i}] {src.path!r}: no such file or directory")
    if not paths:
        raise FileNotFoundError(f"sources[{i}] {src.path!r}: no input files match")
    return [(prefix + p, _kind(p, src, fs)) for p in paths]


def fingerprint(uri: str, kind: str, so: dict) -> dict:
    """sha256 of the content (hf_disk: of its files), size, and rows for row-based kinds."""
    fs, path = storage.filesystem(uri, so)
    if kind == "hf_disk":
        h, size = hashlib.sha256(), 0
        for f in sorted(fs.find(path)):
            data = fs.cat_file(f)
            h.update(os.path.relpath(f, path).encode() + b"\0" + hashlib.sha256(data).digest())
            size += len(data)
        return {"uri": uri, "kind": kind, "bytes": size, "sha256": h.hexdigest()}
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
            size += len(block)
    return {"uri": uri, "kind": kind, "bytes": size, "sha256": h.hexdigest()}


def num_rows(fp: dict, hf_split: str, so: dict) -> int:
    if fp["kind"] == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(fp["uri"], so)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    import datasets

    ds = datasets.load_from_disk(fp["uri"])
    if isinstance(ds, datasets.DatasetDict):
        if hf_split not in ds:
            raise ConfigError(f"sources.hf_split: {fp['uri']} has no split {hf_split!r} (has {sorted(ds)})")
        ds = ds[hf_split]
    return ds.num_rows


# ------------------------------------------------------------------------------------------------ planning
def byte_ranges(uri: str, size: int, target: int, boundary: str | None, so: dict) -> list[tuple[int, int]]:
    """Cut [0, size) near multiples of ``target``, each cut moved forward to just past a document separator."""
    if boundary is None or size <= target:
        return [(0, size)]
    cuts, pos = [0], 0
    while pos + target < size:
        probe, window, cut = pos + target, 1 << 16, None
        while cut is None and probe < size:
            data = storage.read_bytes(uri, so, probe, min(size, probe + window))
            off = next_boundary(data, boundary)
            if off is not None and probe + off < size:
                cut = probe + off
            elif off is not None:
                break
            else:  # no separator in this window: keep looking (overlap one byte: separators span 2+ bytes)
                probe += max(1, len(data) - 8)
                window *= 2
        if cut is None:
            break
        cuts.append(cut)
        pos = cut
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def plan_shards(cfg: PreprocessConfig, files: list[dict], settings_hash: str, so: dict) -> list[dict]:
    """Deterministic jobs: pieces (byte or row ranges) grouped in source order into shards of ~1 target unit."""
    boundary = {"file": None, "paragraph": "paragraph", "line": "line"}[cfg.text_document]
    pieces: list[tuple[float, dict]] = []  # (weight in shard units, piece)
    for fp in files:
        base = {"uri": fp["uri"], "kind": fp["kind"], "sha256": fp["sha256"]}
        if fp["kind"] in ("text", "jsonl"):
            b = boundary if fp["kind"] == "text" else "line"
            for a, z in byte_ranges(fp["uri"], fp["bytes"], cfg.shard_bytes, b, so):
                pieces.append(((z - a) / cfg.shard_bytes, {**base, "start": a, "end": z}))
        else:
            for a in range(0, fp["rows"], cfg.shard_rows):
                z = min(fp["rows"], a + cfg.shard_rows)
                extra = {"hf_split": fp["hf_split"]} if fp["kind"] == "hf_disk" else {}
                pieces.append(((z - a) / cfg.shard_rows, {**base, "start": a, "end": z, **extra}))
    jobs, cur, weight = [], [], 0.0
    for w, piece in pieces:
        cur.append(piece)
        weight += w
        if weight >= 1.0:
            jobs.append(cur)
            cur, weight = [], 0.0
    if cur:
        jobs.append(cur)
    out = []
    for i, ps in enumerate(jobs):
        key = hashlib.sha256(json.dumps({"settings": settings_hash, "pieces": ps}, sort_keys=True).encode())
        out.append({"index": i, "key": key.hexdigest(), "pieces": ps})
    return out
