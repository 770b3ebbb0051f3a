"""The preprocessing stage's config (the ``preprocess:`` section and its sources), torch- and Ray-free: the stage
(pipelines.preprocess) and its planner (pipelines.preprocess_plan) both read it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infra import storage
from infra.config import field, require

# config fields that change how a run executes but never its output (left out of the config hash)
EXECUTION_ONLY = ("output", "num_workers", "worker_cpus", "overwrite", "progress", "s3_endpoint_url", "s3_region",
                  "ray_address")



@dataclass
class SourceConfig:
    """One input: a file, a glob, a directory, an s3:// URI or glob, ``corpus://<name>[/<glob>]``, or a HF dataset
    saved with ``save_to_disk``."""

    path: str = field("", "file / glob / directory / s3:// URI or glob / corpus://name[/glob] / HF save_to_disk dir")
    format: Literal["auto", "text", "jsonl", "parquet", "hf_disk"] = field(
        "auto", "auto = by suffix (.txt/.md/.rst and source code such as .py/.c text, .jsonl jsonl, .parquet "
                "parquet; a dir with dataset_info.json is hf_disk)")
    hf_split: str = field("train", "split to read when an hf_disk path holds a DatasetDict")

    def __post_init__(self) -> None:
        require(bool(self.path), "sources.path", "is required")


@dataclass
class PreprocessConfig:
    """The ``preprocess:`` section. Every field but those in EXECUTION_ONLY enters the dataset's config hash."""

    sources: list[SourceConfig | str] = field(None, "inputs, read in this order (a plain string = {path: ...})",
                                             factory=list)
    output: str = field("artifacts/datasets/default", "dataset root: local dir or s3://bucket/prefix")
    mode: Literal["pretrain", "sft"] = field("pretrain", "pretrain: EOS-joined documents packed into seq_len blocks; "
                                                         "sft: one padded prompt/response row per record")
    seq_len: int = field(256, "tokens per row")
    tokenizer: str = field("gpt2", "'gpt2' (official GPT-2 BPE), a tokenizer.json path or a HF tokenizer directory")
    tokenizer_add_missing_specials: bool = field(False, "add <|endoftext|>/<|mask|> when the tokenizer lacks EOS/MASK "
                                                        "(default: error)")
    text_document: Literal["file", "paragraph", "line"] = field(
        "file", "what one document is in a text file: the whole file, a blank-line separated paragraph, or a line")
    text_field: str = field("text", "jsonl/parquet/hf column holding the document (pretrain)")
    prompt_field: str = field("prompt", "column holding the prompt (sft)")
    response_field: str = field("response", "column holding the response (sft)")
    messages_field: str = field("messages", "column holding HF chat messages [{role, content}] (sft; used when "
                                            "present, the last turn must be the assistant's)")
    sft_padding: Literal["eos_trained", "ignored"] = field(
        "eos_trained", "sft padding: EOS scored by the loss (loss_mask 1) or PAD ignored (loss_mask 0)")
    overlength: Literal["auto", "wrap", "truncate", "skip"] = field(
        "auto", "a document/record longer than seq_len: wrap across blocks (pretrain only), truncate, or skip (a "
                "counted skip; an error in strict mode); auto = wrap for pretrain, skip for sft")
    strict: bool = field(False, "raise on the first bad record/file instead of counting and logging a skip")
    validation_fraction: float = field(0.05, "share of documents (by content hash) routed to the validation split")
    split_salt: str = field("softmask", "salt of the document hash that assigns splits")
    shard_bytes: int = field(4 << 20, "target input bytes per shard (text/jsonl)")
    shard_rows: int = field(50_000, "target input rows per shard (parquet / hf_disk)")
    num_workers: int = field(0, "Ray tokeniser actors (0 = one per Ray CPU)")
    worker_cpus: float = field(0.5, "Ray CPUs reserved per actor; keep the pool below the cluster's CPUs (a pool "
                                    "taking every CPU can deadlock)")
    overwrite: bool = field(False, "replace a dataset at `output` that was built with a different config")
    progress: bool = field(True, "show a progress bar (tokens/s) and print the summary")
    s3_endpoint_url: str | None = field(None, "S3 endpoint (default: AWS_ENDPOINT_URL); credentials only via the "
                                              "environment")
    s3_region: str | None = field(None, "S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    ray_address: str | None = field(None, "Ray cluster to join when Ray is not initialised (None: local Ray)")

    def __post_init__(self) -> None:
        self.sources = [SourceConfig(path=s) if isinstance(s, str) else s for s in (self.sources or [])]
        require(bool(self.sources), "sources", "at least one source is required")
        require(bool(self.output), "output", "is required")
        require(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        require(0.0 <= self.validation_fraction < 1.0, "validation_fraction", "must be in [0, 1)")
        require(self.shard_bytes >= 1024, "shard_bytes", "must be >= 1024")
        require(self.shard_rows >= 1, "shard_rows", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(0.0 < self.worker_cpus <= 64, "worker_cpus", "must be in (0, 64]")
        require(not (self.mode == "sft" and self.overlength == "wrap"), "overlength",
                "wrap is for pretrain only (an sft record is one row)")
        require(not (self.mode == "sft" and self.text_document != "file"), "text_document",
                "sft reads jsonl/parquet/hf records, not plain text")

    @property
    def resolved_overlength(self) -> str:
        if self.overlength != "auto":
            return self.overlength
        return "wrap" if self.mode == "pretrain" else "skip"

    def storage_options(self) -> dict:
        return storage.storage_options_from_env({"endpoint_url": self.s3_endpoint_url, "region": self.s3_region})
