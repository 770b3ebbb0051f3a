"""``softmask tokenizer train``: a byte-level BPE trained on a corpus, written as ``<output>/tokenizer.json``.

    from pipelines.tokenizer_train import TokenizerTrainConfig, run
    tok = run(TokenizerTrainConfig(sources=["corpus://shakespeare"], output="artifacts/tokenizers/shk8k"))

Specials: ``<|endoftext|>`` = 0, ``<|mask|>`` = 1, ``<|pad|>`` = 2 (docs/architecture.md). The result is loadable
with ``models.tokenizer.load_tokenizer(output)`` and usable as ``preprocess.tokenizer``.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from infra.config import ConfigError, field, require

log = logging.getLogger("softmask.tokenizer_train")


@dataclass
class TokenizerTrainConfig:
    """The ``tokenizer:`` section of `softmask tokenizer train`."""

    sources: list[str] = field(None, "local UTF-8 text files, globs, directories (*.txt inside) or corpus://name",
                               factory=lambda: ["corpus://shakespeare"])
    output: str = field("artifacts/tokenizers/bpe8k", "directory to write tokenizer.json (+ HF config files) into")
    vocab_size: int = field(8192, "vocabulary size including the 256 byte symbols and 3 special tokens")
    min_frequency: int = field(2, "minimum pair frequency for a merge")

    def __post_init__(self) -> None:
        require(bool(self.sources), "sources", "at least one source is required")
        require(self.vocab_size >= 259, "vocab_size", f"must be >= 259 (256 bytes + 3 specials), got {self.vocab_size}")
        require(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        require(bool(self.output), "output", "is required")


def resolve_files(sources: list[str]) -> list[Path]:
    """Sorted text files of the sources; a source matching nothing is a ConfigError naming it."""
    files: list[Path] = []
    for i, spec in enumerate(sources):
        if spec.startswith("corpus://"):
            from pipelines.corpus import ensure_corpus

            name, _, pattern = spec[len("corpus://"):].partition("/")
            spec = os.path.join(str(ensure_corpus(name)), pattern or "*.txt")
        p = Path(spec).expanduser()
        found = (sorted(Path(x) for x in globlib.glob(str(p)) if Path(x).is_file()) if globlib.has_magic(spec)
                 else sorted(p.rglob("*.txt")) if p.is_dir() else [p] if p.is_file() else [])
        if not found:
            raise ConfigError(f"sources[{i}]: {spec!r} matches no file")
        files += found
    return files


def run(cfg: TokenizerTrainConfig):
    """Train and save; returns the ``TextTokenizer`` (its ``spec`` is the output directory)."""
    from models.tokenizer import train_bpe

    files = resolve_files(cfg.sources)
    t0 = time.monotonic()
    tok = train_bpe(files, cfg.vocab_size, cfg.output, min_frequency=cfg.min_frequency)
    log.info("trained byte-level BPE: vocab %d on %d files (%.1f MB) in %.1fs -> %s (sha256 %s)", tok.vocab_size,
             len(files), sum(f.stat().st_size for f in files) / 1e6, time.monotonic() - t0, cfg.output,
             tok.sha256[:12])
    return tok
