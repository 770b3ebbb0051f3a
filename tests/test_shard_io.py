"""workers.shard_io: manifest validation and atomic save/load, Parquet helpers, local and real S3 (SeaweedFS)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from infra import storage
from workers import shard_io
from workers.shard_io import DatasetManifest, ShardInfo, read_split_table
from workers.tokenize import rows_table

TOK = {"spec": "gpt2", "sha256": "ab" * 32, "vocab_size": 50258, "eos_id": 50256, "mask_id": 50257, "pad_id": 50256}


def _dataset(root: str, rows_per_shard=(3, 2), seq_len=8) -> DatasetManifest:
    """Write two small shards of consecutive ids under ``root`` and a manifest describing them."""
    shards, start = [], 0
    for i, n in enumerate(rows_per_shard):
        ids = np.arange(start, start + n * seq_len, dtype=np.int32).reshape(n, seq_len)
        start += n * seq_len
        path = f"train/shard-{i:05d}.parquet"
        sha = shard_io.write_parquet_atomic(rows_table(ids), storage.join(root, path))
        shards.append(ShardInfo(path, n, n * seq_len, sha))
    m = DatasetManifest(mode="pretrain", seq_len=seq_len, tokenizer=dict(TOK), splits={"train": shards,
                        "validation": []}, config_hash="c0ffee", sources=[{"uri": "x", "sha256": "00"}],
                        code_version="src-test")
    m.save(root)
    return m


def test_manifest_round_trip_local(tmp_path):
    root = str(tmp_path / "ds")
    m = _dataset(root)
    assert sorted(os.listdir(root)) == ["manifest.json", "train"]  # no temp files left behind
    loaded = DatasetManifest.load(root)
    assert loaded == m and loaded.fingerprint == m.compute_fingerprint()
    assert DatasetManifest.load(os.path.join(root, "manifest.json")).root == root
    uris = loaded.shard_uris("train")
    assert uris == [os.path.join(root, "train", f"shard-0000{i}.parquet") for i in range(2)]
    assert loaded.shard_uris("validation") == [] and loaded.num_rows("train") == 5
    table = read_split_table(loaded, "train")
    assert table.column("input_ids").type == __import__("pyarrow").list_(__import__("pyarrow").int32())
    assert np.array(table.column("input_ids").to_pylist()).ravel().tolist() == list(range(40))
    assert loaded.verify() == []
    # a corrupted shard is detected by hash
    with open(uris[1], "ab") as f:
        f.write(b"junk")
    assert len(loaded.verify()) == 1 and "sha256" in loaded.verify()[0]


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        DatasetManifest.load(str(tmp_path / "nope"))
    root = str(tmp_path / "ds")
    _dataset(root)
    data = json.loads(open(os.path.join(root, "manifest.json")).read())
    data["seq_len"] = 9  # edited by hand: fingerprint no longer matches
    open(os.path.join(root, "manifest.json"), "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint"):
        DatasetManifest.load(root)
    with pytest.raises(ValueError, match="manifest.mode"):
        DatasetManifest(mode="chat", seq_len=8, tokenizer=TOK, splits={}, config_hash="x")
    with pytest.raises(ValueError, match="mask_id"):
        DatasetManifest(mode="sft", seq_len=8, tokenizer={"spec": "gpt2"}, splits={}, config_hash="x")
    with pytest.raises(ValueError, match="relative"):
        DatasetManifest(mode="sft", seq_len=8, tokenizer=TOK, splits={"train": [ShardInfo("/abs.parquet", 1, 8, "")]},
                        config_hash="x")


def test_parquet_bytes_are_deterministic():
    ids = np.arange(64, dtype=np.int32).reshape(8, 8)
    mask = (ids % 2).astype(np.int8)
    a, b = shard_io.parquet_bytes(rows_table(ids, mask)), shard_io.parquet_bytes(rows_table(ids.copy(), mask.copy()))
    assert a == b and a[:4] == b"PAR1"
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(__import__("io").BytesIO(a)).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


@pytest.mark.slow
def test_manifest_and_shards_on_s3(s3_server, ray_session):
    """Real SeaweedFS: atomic writes, load by s3:// URI, and the training contract (ray.data.read_parquet)."""
    bucket = s3_server.create_bucket("shardio")
    root = f"{bucket}/ds1"
    m = _dataset(root, rows_per_shard=(4, 3))
    keys = [u.split("/ds1/", 1)[1] for u in storage.list_files(root)]
    assert sorted(keys) == ["manifest.json", "train/shard-00000.parquet", "train/shard-00001.parquet"]
    loaded = DatasetManifest.load(root)
    assert loaded.fingerprint == m.fingerprint and loaded.verify() == []
    uris = loaded.shard_uris("train")
    assert all(u.startswith("s3://shardio/ds1/train/") for u in uris)
    assert read_split_table(loaded, "train").num_rows == 7
    ds = ray_session.data.read_parquet(uris)  # endpoint/credentials reach the workers through the environment
    got = sorted(v for row in ds.take_all() for v in row["input_ids"])
    assert got == list(range(7 * 8))
    with pytest.raises(FileNotFoundError, match="s3://shardio/missing"):
        DatasetManifest.load(f"{bucket}/missing")
