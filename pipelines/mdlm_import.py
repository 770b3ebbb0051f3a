"""``softmask mdlm-import``: an MDLM / soft-masking DiT checkpoint -> a softmask checkpoint (``"backbone": "dit"``).

    from pipelines.mdlm_import import MDLMImportConfig, run
    res = run(MDLMImportConfig(source="/models/mdlm-owt", output="artifacts/models/mdlm-owt"))
    # train.init_checkpoint = res.output, model.backbone = dit   (continue with SM: configs/continue_mdlm_owt_sm.yaml)

Sources (read by models.dit_loading, which documents the key mapping and every check):
- the hub layout of kuleshov-group/mdlm-owt (config.json with ``model_type: mdlm`` + model.safetensors or
  pytorch_model.bin): MDLM trained 1M steps on OpenWebText, binary masking;
- a Lightning checkpoint file (``*.ckpt``): MDLM's own (Google Drive) or a released soft-masking model, whose EMA
  weights (``weights: ema``, the default) or live weights are taken, with the learned ω of an SM checkpoint.
Every file is read as safetensors or with torch's weights-only unpickler (models.weights_file): no pickled object of
those files is ever constructed, and a checkpoint that does not match the DiT layout is refused with one line.

Output (one directory, written atomically): config.json + model.safetensors + softmask_head.json
(models.save_pretrained), the tokenizer (``tokenizer``: GPT-2 + [MASK] = 50257 for the OWT models), import.json.
Idempotent: a rerun with the same source content and settings returns at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from infra.config import ConfigError, field, require, to_dict
from pipelines.hf_import import IMPORT_RECORD, hash_files, write_atomic

log = logging.getLogger("softmask.mdlm_import")

IMPORT_FORMAT = 1  # bump when the written layout changes
EXECUTION_ONLY = ("output", "overwrite", "fingerprint", "source")


@dataclass
class MDLMImportConfig:
    """The ``mdlm_import:`` section: which MDLM-family checkpoint to turn into a softmask checkpoint, and how."""

    source: str = field("", "an MDLM hub-layout directory (config.json with model_type mdlm + model.safetensors or "
                            "pytorch_model.bin, e.g. kuleshov-group/mdlm-owt as downloaded) or a Lightning "
                            "checkpoint file (*.ckpt: MDLM's binary model or a released soft-masking model)")
    output: str = field("artifacts/models/mdlm-owt", "checkpoint directory to write (local path)")
    weights: Literal["ema", "live"] = field("ema", "Lightning checkpoints: the EMA weights (what the authors "
                                                   "evaluate) or the live weights of the last step")
    tokenizer: str = field("gpt2", "tokenizer written beside the weights (models.tokenizer spec: gpt2 = GPT-2 + "
                                   "<|mask|> 50257, the OWT models'; a tokenizer.json / HF dir; or none); its "
                                   "vocabulary and [MASK] id must be the checkpoint's")
    n_heads: int | None = field(None, "attention heads; None = from the checkpoint's rotary frequencies (or its "
                                      "config.json); needed only when neither has them")
    time_conditioning: bool | None = field(None, "condition the network on σ(t); None = config.json's value (hub), "
                                                 "off for Lightning checkpoints (MDLM OWT and the SM paper train "
                                                 "without)")
    dropout: float | None = field(None, "residual dropout recorded for training; None = config.json's (hub), 0.1 "
                                        "(MDLM small) for Lightning checkpoints")
    max_seq_len: int | None = field(None, "longest sequence; None = config.json's model_length (hub), 1024")
    softmask_k: int = field(3, "top-k tokens mixed into a still-masked position (the paper's LM setting: 3)")
    vocab_pad_multiple: int = field(1, "pad the vocabulary rows to a multiple of this (64: faster GPU matmuls)")
    fingerprint: Literal["content", "stat"] = field("content", "how the source is fingerprinted for the skip check: "
                                                               "sha256 of its files, or (name, size, mtime)")
    overwrite: bool = field(False, "replace an existing output that was imported from another source / settings")

    def __post_init__(self) -> None:
        require(bool(self.source), "source", "is required (an MDLM hub directory or a Lightning .ckpt file)")
        require(bool(self.output) and "://" not in self.output, "output", "must be a local directory")
        require(self.softmask_k >= 1, "softmask_k", f"must be >= 1, got {self.softmask_k}")
        require(self.n_heads is None or self.n_heads >= 1, "n_heads", "must be >= 1")
        require(self.vocab_pad_multiple >= 1, "vocab_pad_multiple", "must be >= 1")
        require(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len", "must be >= 8")


@dataclass
class MDLMImportResult:
    """What ``run`` produced (also written to ``<output>/import.json``)."""

    output: str
    skipped: bool
    source: str
    source_kind: str            # mdlm_hub | lightning
    source_fingerprint: str
    import_key: str
    objective: str              # sm (the checkpoint has learned ω) | binary
    sm_head: dict | None        # ω_s, ω_a, ω_b of an SM checkpoint
    params: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def source_kind(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "mdlm_hub"
    if path.is_file():
        return "lightning"
    why = "a directory without config.json" if path.is_dir() else "no such file or directory"
    raise ConfigError(f"source: {source!r}: {why}; expected an MDLM hub directory (config.json + model.safetensors) "
                      f"or a Lightning checkpoint file (.ckpt)")


def _fingerprint(cfg: MDLMImportConfig, kind: str) -> str:
    path = Path(cfg.source).expanduser().resolve()
    if kind == "lightning":
        return f"file-{cfg.fingerprint}-" + hash_files([path], path.parent, cfg.fingerprint)
    files = sorted(f for f in path.iterdir() if f.name in ("config.json", "model.safetensors", "pytorch_model.bin"))
    return f"dir-{cfg.fingerprint}-" + hash_files(files, path, cfg.fingerprint)


def _load(cfg: MDLMImportConfig, kind: str):
    """(DiffusionLM, info) of the source; ConfigError naming the source on anything that does not match."""
    from models.dit_loading import from_lightning_checkpoint, from_mdlm_hub_dir

    over = {k: v for k, v in (("time_conditioning", cfg.time_conditioning), ("dropout", cfg.dropout),
                              ("max_seq_len", cfg.max_seq_len)) if v is not None}
    try:
        if kind == "mdlm_hub":
            if cfg.n_heads is not None:
                over["n_heads"] = cfg.n_heads
            return from_mdlm_hub_dir(cfg.source, softmask_k=cfg.softmask_k,
                                     vocab_pad_multiple=cfg.vocab_pad_multiple, **over)
        return from_lightning_checkpoint(cfg.source, weights=cfg.weights, softmask_k=cfg.softmask_k,
                                         n_heads=cfg.n_heads, vocab_pad_multiple=cfg.vocab_pad_multiple, **over)
    except ValueError as e:
        raise ConfigError(f"source: {e}") from None


def _tokenizer(cfg: MDLMImportConfig, model):
    """The tokenizer to write (None for ``none``), checked against the checkpoint's vocabulary and [MASK] row."""
    from models.tokenizer import load_tokenizer

    if cfg.tokenizer == "none":
        return None
    try:
        tok = load_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None
    mc = model.config
    require(tok.vocab_size == mc.vocab_size and tok.mask_id == mc.mask_token_id, "tokenizer",
            f"{cfg.tokenizer!r} has {tok.vocab_size} ids with [MASK] = {tok.mask_id}; the checkpoint has "
            f"{mc.vocab_size} rows with [MASK] = {mc.mask_token_id} (the last row)")
    return tok


def run(cfg: MDLMImportConfig) -> MDLMImportResult:
    """Import (or skip an identical earlier import); returns what is at ``cfg.output``."""
    from models import save_pretrained

    t0 = time.monotonic()
    out = Path(cfg.output).expanduser()
    kind = source_kind(cfg.source)
    fp = _fingerprint(cfg, kind)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_ONLY}
    key = hashlib.sha256(json.dumps({"format": IMPORT_FORMAT, "source": fp, "settings": settings},
                                    sort_keys=True).encode()).hexdigest()[:24]
    rec_file = out / IMPORT_RECORD
    prev = json.loads(rec_file.read_text()) if rec_file.is_file() and (out / "model.safetensors").is_file() else None
    if prev is not None and prev.get("import_key") == key:
        kept = {k: prev[k] for k in ("source", "source_kind", "source_fingerprint", "import_key", "objective",
                                     "sm_head", "params")}
        return MDLMImportResult(output=str(out), skipped=True, seconds=time.monotonic() - t0, **kept)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        what = f"an import of {prev.get('source')!r} with other settings" if prev else "something else"
        raise ConfigError(f"output: {out} holds {what}; choose another output or set overwrite=true")

    model, info = _load(cfg, kind)
    tok = _tokenizer(cfg, model)
    params = sum(p.numel() for p in model.parameters())
    record = {"source": cfg.source, "source_kind": kind, "source_fingerprint": fp, "import_key": key,
              "objective": info["objective"], "sm_head": info["sm_head"], "params": int(params)}
    metadata = {"origin": "mdlm_import", "objective": info["objective"], "source": cfg.source, "source_kind": kind,
                "source_fingerprint": fp, "weights": info["weights"], "ignored_keys": info["ignored_keys"],
                **({"tokenizer": tok.info()} if tok is not None else {})}

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, metadata=metadata)
        if tok is not None:
            tok.save(tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps({**record, "info": info, "config": to_dict(cfg)}, indent=2,
                                                    sort_keys=True, default=str))

    write_atomic(out, write)
    seconds = time.monotonic() - t0
    log.info("mdlm import: %s (%s, %s, %.1fM params) -> %s in %.1fs", cfg.source, kind, info["objective"],
             params / 1e6, out, seconds)
    return MDLMImportResult(output=str(out), skipped=False, seconds=seconds, **record)


def cli_mdlm_import(cfg: MDLMImportConfig, extras: dict) -> int:
    """Runner for the CLI's ``Command`` table."""
    try:
        res = run(cfg)
    except ConfigError as e:
        print(f"softmask mdlm-import: {e}", file=sys.stderr)
        return 2
    state = "already imported" if res.skipped else f"imported in {res.seconds:.1f}s"
    omega = "" if not res.sm_head else ", ω " + ", ".join(f"{k}={v:.4g}" for k, v in res.sm_head.items())
    print(f"{res.source} -> {res.output} ({state}; {res.params / 1e6:.1f}M params, {res.objective}{omega})\n"
          f"use: softmask train --config configs/continue_mdlm_owt_sm.yaml --init_checkpoint={res.output} ...")
    return 0
