"""One storage layer for local paths and ``s3://`` URIs (fsspec / s3fs): join, read, atomic write, JSON, sha256.

    uri = join(root, "train", "shard-00000.parquet")        # local path or s3://bucket/...
    write_atomic(uri, data); read_bytes(uri); write_json(uri, {...}); read_json(uri, missing_ok=True)
    sha256_file(uri)                                        # streamed, never the whole file in memory

S3: the endpoint and region come from the environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``) and then from explicit ``storage_options``; credentials are left to botocore's own chain.
NOTE: every write is atomic: the bytes go to a temp name beside the target (``.<name>.tmp-<random>``), then into
place (local: fsync + ``os.replace``; S3: copy to the final key, delete the temp). :func:`is_temp_name` recognises
the leftovers of an interrupted write. Workers and pipelines both use this module (infra imports none of ours).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def is_remote(uri: str) -> bool:
    """A URI with a scheme other than ``file://``."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (no normalisation of the scheme)."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def storage_options_from_env(overrides: dict | None = None) -> dict:
    """s3fs options: endpoint and region from the environment, then ``overrides`` (e.g. from a config)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["region"] = region
    for k, v in (overrides or {}).items():
        if v is not None:
            opts[k] = v
    return opts


def filesystem(uri: str, storage_options: dict | None = None):
    """``(fsspec filesystem, path inside it)`` for a local path, a ``file://`` URI or an ``s3://`` URI."""
    import fsspec

    if is_s3(uri):
        import s3fs

        opts = storage_options_from_env(storage_options)
        client_kwargs = {"region_name": opts["region"]} if opts.get("region") else {}
        # listings cache off: other processes (Ray workers) write the same prefixes
        fs = s3fs.S3FileSystem(endpoint_url=opts.get("endpoint_url"), client_kwargs=client_kwargs,
                               use_listings_cache=False)
        return fs, str(uri).split("://", 1)[1]
    if is_remote(uri):
        return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    path = str(uri).removeprefix("file://")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def read_bytes(uri: str, storage_options: dict | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    """Whole file, or bytes [start, end); FileNotFoundError when absent."""
    fs, path = filesystem(uri, storage_options)
    if start is None and end is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=start, end=end)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def remove(uri: str, storage_options: dict | None = None) -> None:
    """Delete a file or a whole directory / prefix (nothing when absent)."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=fs.isdir(path))


def list_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Every file under ``uri`` (recursive) as full URIs / absolute paths; [] when absent."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return []
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + p for p in fs.find(path))


def write_atomic(uri: str, data: bytes | str, storage_options: dict | None = None) -> None:
    """Write ``data`` (str: UTF-8) under a temp name, then move it into place; a reader never sees half a file."""
    data = data.encode() if isinstance(data, str) else data
    fs, path = filesystem(uri, storage_options)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    if is_remote(uri):
        fs.pipe_file(tmp, data)
        try:
            fs.copy(tmp, path)
        finally:
            fs.rm(tmp)
        return
    os.makedirs(parent, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_temp_name(uri: str) -> bool:
    """Leftover of an interrupted atomic write (see :func:`write_atomic`)."""
    return ".tmp-" in str(uri).rsplit("/", 1)[-1]


def read_json(uri: str, storage_options: dict | None = None, *, missing_ok: bool = False) -> Any:
    """The parsed JSON file; FileNotFoundError when absent (None with ``missing_ok``)."""
    try:
        return json.loads(read_bytes(uri, storage_options))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise


def write_json(uri: str, data: Any, storage_options: dict | None = None) -> None:
    """Atomic JSON write (sorted keys, indent 2; values JSON cannot hold are written as ``str``)."""
    write_atomic(uri, json.dumps(data, indent=2, sort_keys=True, default=str), storage_options)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, storage_options: dict | None = None) -> str:
    """sha256 of a file's content, streamed."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
