"""Dataset shards and their manifest: local paths and ``s3://`` URIs (fsspec / s3fs, endpoint from the environment).

Layout (docs/architecture.md, "Dataset layout")::

    <root>/manifest.json
    <root>/train/shard-00000.parquet        input_ids: list<int32> (len seq_len); loss_mask: list<int8> (sft only)
    <root>/validation/shard-00000.parquet

Training reads a dataset with exactly::

    m = DatasetManifest.load(uri); uris = m.shard_uris("train"); ray.data.read_parquet(uris)
    m.seq_len, m.mode, m.tokenizer["vocab_size" | "mask_id" | "eos_id" | "pad_id"]

NOTE: every write is atomic (``infra.storage.write_atomic``: temp name, then into place). Parquet bytes are
deterministic for a given table and pyarrow version (no timestamps).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from infra.storage import join, read_bytes, sha256_hex, write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
MODES = ("pretrain", "sft")
TOKENIZER_KEYS = ("spec", "sha256", "vocab_size", "eos_id", "mask_id", "pad_id")
PARQUET_COMPRESSION = "zstd"


# ------------------------------------------------------------------------------------------------ parquet
def parquet_bytes(table) -> bytes:
    """zstd Parquet bytes of a pyarrow Table (deterministic for a given table and pyarrow version)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=PARQUET_COMPRESSION)
    return buf.getvalue()


def write_parquet_atomic(table, uri: str, storage_options: dict | None = None) -> str:
    """Write ``table`` as one zstd Parquet file atomically; returns the file's sha256."""
    data = parquet_bytes(table)
    write_atomic(uri, data, storage_options)
    return sha256_hex(data)


def read_parquet(uri: str, storage_options: dict | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(read_bytes(uri, storage_options)))


# ------------------------------------------------------------------------------------------------ manifest
@dataclass
class ShardInfo:
    """One Parquet shard: ``path`` relative to the dataset root, ``rows`` sequences, ``tokens`` = rows * seq_len."""

    path: str
    rows: int
    tokens: int
    sha256: str


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class DatasetManifest:
    """What preprocessing wrote and from what; ``fingerprint`` hashes everything else in it."""

    mode: str
    seq_len: int
    tokenizer: dict
    splits: dict[str, list[ShardInfo]]
    config_hash: str
    sources: list[dict] = field(default_factory=list)
    code_version: str = ""
    totals: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    fingerprint: str = ""
    root: str = field(default="", compare=False)  # where it was loaded from / saved to (not serialized)

    def __post_init__(self) -> None:
        self.splits = {s: [sh if isinstance(sh, ShardInfo) else ShardInfo(**sh) for sh in shards]
                       for s, shards in (self.splits or {}).items()}
        self.validate()

    def tokenizer_source(self) -> str:
        """Where to load the tokenizer from: the copy saved inside a local dataset (it travels with the dataset to
        another machine or path), else the spec it was built from."""
        local = self.tokenizer.get("dir")
        if local and self.root and "://" not in self.root:
            path = os.path.join(self.root, local)
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                return path
        return str(self.tokenizer["spec"])

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.mode not in MODES:
            raise ValueError(f"manifest.mode: must be one of {list(MODES)}, got {self.mode!r}")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ValueError(f"manifest.seq_len: must be a positive integer, got {self.seq_len!r}")
        missing = [k for k in TOKENIZER_KEYS if k not in (self.tokenizer or {})]
        if missing:
            raise ValueError(f"manifest.tokenizer: missing key(s) {missing}")
        for split, shards in self.splits.items():
            for sh in shards:
                if sh.path.startswith("/") or ".." in sh.path.split("/") or "://" in sh.path:
                    raise ValueError(f"manifest.splits.{split}: shard path must be relative, got {sh.path!r}")

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        return d

    def compute_fingerprint(self) -> str:
        d = self.to_dict()
        d.pop("fingerprint")
        return sha256_hex(_canonical(d).encode())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @staticmethod
    def manifest_uri(uri: str) -> str:
        """``uri`` may name the dataset root or its manifest.json."""
        return str(uri) if str(uri).rstrip("/").endswith(".json") else join(str(uri), MANIFEST_NAME)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "DatasetManifest":
        """Read ``<root>/manifest.json`` (``uri`` = root or the json); FileNotFoundError names the URI."""
        muri = cls.manifest_uri(uri)
        try:
            raw = read_bytes(muri, storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"dataset manifest not found: {muri} (run preprocessing to create it)") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset manifest {muri} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"root"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"dataset manifest {muri}: unknown key(s) {unknown}")
        m = cls(**data)
        m.root = muri.rsplit("/", 1)[0]
        if m.fingerprint and m.fingerprint != m.compute_fingerprint():
            raise ValueError(f"dataset manifest {muri}: fingerprint mismatch (file edited or corrupt)")
        return m

    def save(self, uri: str | None = None, storage_options: dict | None = None) -> str:
        """Write manifest.json atomically under ``uri`` (root or json path; default: ``self.root``)."""
        target = uri or self.root
        if not target:
            raise ValueError("DatasetManifest.save: no uri given and the manifest has no root")
        self.fingerprint = self.compute_fingerprint()
        muri = self.manifest_uri(target)
        write_atomic(muri, self.to_json().encode(), storage_options)
        self.root = muri.rsplit("/", 1)[0]
        return muri

    # ------------------------------------------------------------------------------------------ access
    def shard_uris(self, split: str) -> list[str]:
        """Absolute URIs (local path or s3://) of ``split``'s shards, in order."""
        if split not in self.splits:
            raise KeyError(f"dataset {self.root or '?'} has no split {split!r} (splits: {sorted(self.splits)})")
        if not self.root:
            raise ValueError("DatasetManifest.shard_uris: manifest has no root (load() or save() it first)")
        return [join(self.root, sh.path) for sh in self.splits[split]]

    def num_rows(self, split: str) -> int:
        return sum(sh.rows for sh in self.splits.get(split, []))

    def num_tokens(self, split: str) -> int:
        return sum(sh.tokens for sh in self.splits.get(split, []))

    def verify(self, storage_options: dict | None = None) -> list[str]:
        """Problems found when re-hashing every shard ([] = all present and intact)."""
        problems = []
        for split in self.splits:
            for sh, uri in zip(self.splits[split], self.shard_uris(split)):
                try:
                    got = sha256_hex(read_bytes(uri, storage_options))
                except FileNotFoundError:
                    problems.append(f"{uri}: missing")
                    continue
                if got != sh.sha256:
                    problems.append(f"{uri}: sha256 {got[:12]} != manifest {sh.sha256[:12]}")
        return problems


def read_split_table(manifest: DatasetManifest, split: str, storage_options: dict | None = None):
    """All shards of ``split`` concatenated into one ``pyarrow.Table`` (small datasets, tests, eval)."""
    import pyarrow as pa

    tables = [read_parquet(u, storage_options) for u in manifest.shard_uris(split)]
    if not tables:
        names = ["input_ids"] + (["loss_mask"] if manifest.mode == "sft" else [])
        types = [pa.list_(pa.int32()), pa.list_(pa.int8())][: len(names)]
        return pa.schema(list(zip(names, types))).empty_table()
    return pa.concat_tables(tables)
