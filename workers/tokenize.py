"""Ray UDF: tokenise one planned shard, pack it, write zstd Parquet atomically, return stats.

A *job* (planned by ``pipelines.preprocess``) is ``{"index": i, "key": hash, "pieces": [piece, ...]}``; a piece is
``{"uri", "kind": text|jsonl|parquet|hf_disk, "start", "end", ...}`` (byte range for text/jsonl, aligned by the
planner to document boundaries with :func:`next_boundary`; row range for parquet/hf_disk).

Per shard, documents are routed to ``train``/``validation`` by a hash of their content (:func:`is_validation`), then

- ``pretrain``: ``doc_1 EOS doc_2 EOS ...`` cut into fixed ``seq_len`` blocks (wrap, as MDLM/OWT); the last partial
  block of each shard and split is dropped and *counted* (``dropped_tail_tokens``).
- ``sft``: one row per (prompt, response): ``prompt response EOS`` then padding; ``loss_mask`` 0 on prompt tokens,
  1 on response + EOS; padding is EOS with loss_mask 1 (``eos_trained``) or PAD with loss_mask 0 (``ignored``).

Bad records (non-UTF-8, malformed JSON, missing fields, too long) are skipped and counted by reason, or raise in
strict mode; the shard then returns ``{"error": message}`` and writes nothing.
A receipt ``<out>/_progress/shard-XXXXX.json`` is written after the Parquet files: it is what makes a rerun skip
this shard (the driver re-checks the shard hashes).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from infra import storage
from workers import shard_io

SPLITS = ("train", "validation")
# byte-level document separators of the text reader (see next_boundary)
TEXT_SEPARATORS = {"paragraph": re.compile(rb"\n[ \t\r]*\n"), "line": re.compile(rb"\n")}
MAX_SKIP_EXAMPLES = 5


@dataclass
class TokenizeSettings:
    """Everything a worker needs (built by the driver from PreprocessConfig; plain data, no pipelines import)."""

    mode: str                      # pretrain | sft
    seq_len: int
    tokenizer: str                 # load_tokenizer spec
    out_root: str                  # dataset root (local path or s3://)
    add_missing_specials: bool = False
    tokenizer_sha256: str = ""     # expected fingerprint (checked in the worker)
    text_document: str = "file"    # file | paragraph | line
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    sft_padding: str = "eos_trained"   # eos_trained | ignored
    overlength: str = "wrap"           # wrap | truncate | skip
    strict: bool = False
    validation_fraction: float = 0.0
    split_salt: str = "softmask"
    storage_options: dict = field(default_factory=dict)


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        super().__init__(f"{reason} at {where}" + (f": {detail}" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def receipt_uri(out_root: str, index: int) -> str:
    return storage.join(out_root, "_progress", f"shard-{index:05d}.json")


def is_validation(key: str, fraction: float, salt: str) -> bool:
    """Deterministic split by content hash: identical documents always land in the same split."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256((salt + "\0" + key).encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def next_boundary(data: bytes, text_document: str) -> int | None:
    """Offset just past the first document separator in ``data`` (None if none). A cut there splits the file into
    exactly the same documents as reading it whole (the planner aligns byte ranges with it)."""
    m = TEXT_SEPARATORS[text_document].search(data)
    return m.end() if m else None


# -------------------------------------------------------------------------------------------- readers
def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("non_utf8", where, f"invalid UTF-8 byte at offset {e.start} of the record") from None


def _read_text(piece: dict, s: TokenizeSettings) -> Iterator[tuple[str, Any]]:
    data = storage.read_bytes(piece["uri"], s.storage_options, piece["start"], piece["end"])
    if s.text_document == "file":
        chunks = [(0, data)]
    else:
        chunks, pos = [], 0
        for m in TEXT_SEPARATORS[s.text_document].finditer(data):
            chunks.append((pos, data[pos:m.start()]))
            pos = m.end()
        chunks.append((pos, data[pos:]))
    for off, raw in chunks:
        where = f"{piece['uri']}@{piece['start'] + off}"
        if not raw.strip():
            if s.text_document == "file":
                yield where, BadRecord("empty_document", where)
            continue
        try:
            yield where, _decode(raw, where).strip()
        except BadRecord as e:
            yield where, e


def _read_jsonl(piece: dict, s: TokenizeSettings) -> Iterator[tuple[str, Any]]:
    data = storage.read_bytes(piece["uri"], s.storage_options, piece["start"], piece["end"])
    pos = 0
    for line in data.split(b"\n"):
        where = f"{piece['uri']}@{piece['start'] + pos}"
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(_decode(line, where))
            if not isinstance(obj, dict):
                raise BadRecord("malformed_json", where, "a JSON line must be an object")
            yield where, obj
        except json.JSONDecodeError as e:
            yield where, BadRecord("malformed_json", where, str(e))
        except BadRecord as e:
            yield where, e


def _wanted_columns(names: list[str], s: TokenizeSettings) -> list[str]:
    want = [s.text_field] if s.mode == "pretrain" else [s.prompt_field, s.response_field, s.messages_field]
    return [c for c in want if c in names]


def _read_parquet(piece: dict, s: TokenizeSettings) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(piece["uri"], s.storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        groups = [i for i in range(md.num_row_groups) if starts[i] < piece["end"] and starts[i + 1] > piece["start"]]
        cols = _wanted_columns(pf.schema_arrow.names, s)
        table = pf.read_row_groups(groups, columns=cols)
    table = table.slice(piece["start"] - int(starts[groups[0]]), piece["end"] - piece["start"]) if groups else table
    yield from _rows(piece, table.to_pylist())


def _read_hf_disk(piece: dict, s: TokenizeSettings) -> Iterator[tuple[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(piece["uri"])
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[piece["hf_split"]]
    ds = ds.select_columns(_wanted_columns(ds.column_names, s))
    yield from _rows(piece, ds.select(range(piece["start"], piece["end"])).to_list())


def _rows(piece: dict, rows: list[dict]) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{piece['uri']}#row{piece['start'] + i}", row


READERS: dict[str, Callable[[dict, TokenizeSettings], Iterator[tuple[str, Any]]]] = {
    "text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf_disk": _read_hf_disk,
}


# -------------------------------------------------------------------------------------------- record -> text
def _field(obj: dict, name: str, where: str) -> str:
    v = obj.get(name)
    if not isinstance(v, str):
        raise BadRecord("missing_field", where, f"field {name!r} missing or not a string")
    return v


def pretrain_text(obj: Any, s: TokenizeSettings, where: str) -> str:
    return obj if isinstance(obj, str) else _field(obj, s.text_field, where)


def render_chat(messages: Any, where: str) -> tuple[str, str]:
    """HF chat format -> (prompt, response): earlier turns rendered ``"{role}: {content}\\n"`` plus ``"assistant: "``;
    the response is the content of the final (assistant) turn."""
    ok = (isinstance(messages, list) and len(messages) >= 2
          and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                  for m in messages) and messages[-1]["role"] == "assistant")
    if not ok:
        raise BadRecord("malformed_chat", where, "messages must be a list of {role, content} ending with assistant")
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    return prompt, messages[-1]["content"]


def sft_pair(obj: Any, s: TokenizeSettings, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise BadRecord("missing_field", where, "sft records must be JSON objects / table rows")
    if obj.get(s.messages_field) is not None:
        return render_chat(obj[s.messages_field], where)
    return _field(obj, s.prompt_field, where), _field(obj, s.response_field, where)


# -------------------------------------------------------------------------------------------- packing
def pack_pretrain(docs_ids: list[list[int]], seq_len: int, eos_id: int) -> tuple[np.ndarray, int]:
    """``doc EOS doc EOS ...`` -> (rows, seq_len) int32 blocks and the dropped tail length."""
    if not docs_ids:
        return np.zeros((0, seq_len), np.int32), 0
    eos = [eos_id]
    total = sum(len(ids) + 1 for ids in docs_ids)
    stream = np.fromiter(itertools.chain.from_iterable(part for ids in docs_ids for part in (ids, eos)),
                         dtype=np.int32, count=total)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len), int(len(stream) - rows * seq_len)


def pack_sft(prompt_ids: list[int], response_ids: list[int], seq_len: int, eos_id: int, pad_id: int,
             padding: str) -> tuple[np.ndarray, np.ndarray]:
    """One SFT row: (input_ids (seq_len,), loss_mask (seq_len,)); caller guarantees it fits."""
    ids = prompt_ids + response_ids + [eos_id]
    mask = [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)
    n_pad = seq_len - len(ids)
    if padding == "eos_trained":
        ids, mask = ids + [eos_id] * n_pad, mask + [1] * n_pad
    else:
        ids, mask = ids + [pad_id] * n_pad, mask + [0] * n_pad
    return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


def _list_column(rows: np.ndarray, value_type):
    import pyarrow as pa

    n, length = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))


def rows_table(input_ids: np.ndarray, loss_mask: np.ndarray | None = None):
    """(rows, seq_len) arrays -> Table(input_ids list<int32>[, loss_mask list<int8>])."""
    import pyarrow as pa

    cols = {"input_ids": _list_column(input_ids.astype(np.int32, copy=False), pa.int32())}
    if loss_mask is not None:
        cols["loss_mask"] = _list_column(loss_mask.astype(np.int8, copy=False), pa.int8())
    return pa.table(cols)


# -------------------------------------------------------------------------------------------- the UDF
_TOKENIZERS: dict = {}  # per worker process: (spec, add_missing) -> TextTokenizer
_SHARDERS: dict = {}    # per worker process: settings json -> TokenizeShard


def _tokenizer(spec: str, add_missing: bool, sha256: str):
    """The tokenizer, loaded once per worker process; reloaded if the expected fingerprint differs."""
    from models.tokenizer import load_tokenizer

    tok = _TOKENIZERS.get((spec, add_missing))
    if tok is None or (sha256 and tok.sha256 != sha256):
        tok = _TOKENIZERS[(spec, add_missing)] = load_tokenizer(spec, add_missing_specials=add_missing)
    if sha256 and tok.sha256 != sha256:
        raise RuntimeError(f"tokenizer {spec!r} in the worker has sha256 {tok.sha256[:12]}, the driver expected "
                           f"{sha256[:12]} (changed on disk during the run?)")
    return tok


def tokenize_shard(settings: dict, job: dict) -> dict:
    """Ray task body: reuses this worker process's TokenizeShard (and tokenizer) across tasks and runs."""
    key = json.dumps(settings, sort_keys=True)
    sharder = _SHARDERS.get(key)
    if sharder is None:
        _SHARDERS.clear()
        sharder = _SHARDERS[key] = TokenizeShard(settings)
    return sharder(job)


class TokenizeShard:
    """Stateful callable: the tokenizer is loaded once per worker; ``__call__(job) -> result dict``."""

    def __init__(self, settings: dict):
        self.s = TokenizeSettings(**settings)
        self.tok = _tokenizer(self.s.tokenizer, self.s.add_missing_specials, self.s.tokenizer_sha256)

    def __call__(self, job: dict) -> dict:
        try:
            result = self._run(job)
        except BadRecord as e:  # strict mode
            return {"index": job["index"], "error": str(e)}
        result["worker"] = {"pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}
        return result

    def _records(self, job: dict, skipped: dict, examples: list) -> Iterator[tuple[str, Any]]:
        for piece in job["pieces"]:
            for where, obj in READERS[piece["kind"]](piece, self.s):
                if isinstance(obj, BadRecord):
                    self._skip(obj, skipped, examples)
                else:
                    yield where, obj

    def _skip(self, bad: BadRecord, skipped: dict, examples: list) -> None:
        if self.s.strict:
            raise bad
        skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append(str(bad))

    def _run(self, job: dict) -> dict:
        s, skipped, examples = self.s, {}, []
        texts: dict[str, list] = {sp: [] for sp in SPLITS}
        for where, obj in self._records(job, skipped, examples):
            try:
                if s.mode == "pretrain":
                    text = pretrain_text(obj, s, where)
                    key, item = text, text
                else:
                    prompt, response = sft_pair(obj, s, where)
                    key, item = prompt + "\0" + response, (prompt, response, where)
            except BadRecord as e:
                self._skip(e, skipped, examples)
                continue
            if s.mode == "pretrain" and not text.strip():
                self._skip(BadRecord("empty_document", where), skipped, examples)
                continue
            sp = "validation" if is_validation(key, s.validation_fraction, s.split_salt) else "train"
            texts[sp].append((where, item))
        stats = {"docs": {}, "doc_tokens": {}, "rows": {}, "dropped_tail_tokens": {}}
        shards = {}
        for sp in SPLITS:
            table, st = (self._pretrain_split if s.mode == "pretrain" else self._sft_split)(texts[sp], skipped,
                                                                                            examples)
            for k, v in st.items():
                stats[k][sp] = v
            if table.num_rows:
                path = f"{sp}/{shard_name(job['index'])}"
                sha = shard_io.write_parquet_atomic(table, storage.join(s.out_root, path), s.storage_options)
                shards[sp] = asdict(shard_io.ShardInfo(path, table.num_rows, table.num_rows * s.seq_len, sha))
        stats["skipped"] = dict(sorted(skipped.items()))
        receipt = {"index": job["index"], "key": job["key"], "shards": shards, "stats": stats,
                   "skip_examples": examples}
        storage.write_atomic(receipt_uri(s.out_root, job["index"]),
                                    json.dumps(receipt, sort_keys=True).encode(), s.storage_options)
        return receipt

    def _pretrain_split(self, items: list, skipped: dict, examples: list):
        s, tok = self.s, self.tok
        ids = tok.encode_batch([text for _, text in items])
        kept = []
        for (where, _), doc in zip(items, ids):
            if len(doc) + 1 > s.seq_len and s.overlength != "wrap":
                if s.overlength == "skip":
                    self._skip(BadRecord("too_long", where, f"{len(doc) + 1} tokens > seq_len {s.seq_len}"),
                               skipped, examples)
                    continue
                doc = doc[: s.seq_len - 1]  # truncate: the document and its EOS fill one block
            kept.append(doc)
        rows, tail = pack_pretrain(kept, s.seq_len, tok.eos_id)
        st = {"docs": len(kept), "doc_tokens": sum(len(d) + 1 for d in kept), "rows": int(rows.shape[0]),
              "dropped_tail_tokens": tail}
        return rows_table(rows), st

    def _sft_split(self, items: list, skipped: dict, examples: list):
        s, tok = self.s, self.tok
        flat = tok.encode_batch([t for _, (p, r, _) in items for t in (p, r)])
        out_ids, out_mask, n_tok = [], [], 0
        for i, (_, (_, _, where)) in enumerate(items):
            p, r = flat[2 * i], flat[2 * i + 1]
            if len(p) + len(r) + 1 > s.seq_len:
                if s.overlength == "skip" or len(p) >= s.seq_len - 1:
                    self._skip(BadRecord("too_long", where, f"{len(p) + len(r) + 1} tokens > seq_len {s.seq_len}"),
                               skipped, examples)
                    continue
                r = r[: s.seq_len - 1 - len(p)]  # truncate the response, keep the prompt whole
            ids, mask = pack_sft(p, r, s.seq_len, tok.eos_id, tok.pad_id, s.sft_padding)
            out_ids.append(ids)
            out_mask.append(mask)
            n_tok += len(p) + len(r) + 1
        shape = (len(out_ids), s.seq_len)
        ids_arr = np.stack(out_ids) if out_ids else np.zeros(shape, np.int32)
        mask_arr = np.stack(out_mask) if out_mask else np.zeros(shape, np.int8)
        st = {"docs": len(out_ids), "doc_tokens": n_tok, "rows": len(out_ids), "dropped_tail_tokens": 0}
        return rows_table(ids_arr, mask_arr), st


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
