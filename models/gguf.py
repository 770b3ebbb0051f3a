"""GGUF files as HF models: dequantise once into a plain fp32 safetensors HF directory, cached by content.

    hf_dir = gguf_to_hf_dir("/pkgs/smollm2.gguf")            # <cache>/gguf/<stem>-<sha256[:16]>/ (converted once)
    model, tok = from_gguf("/pkgs/smollm2.gguf")             # = models.hf_loading.from_hf_dir(gguf_to_hf_dir(...))

transformers dequantises a GGUF on load (needs ``gguf`` + ``accelerate``), which is slow, so every user (the HF
import, the evaluator LM) reads the converted copy. A GGUF-loaded model refuses ``save_pretrained`` ("quantized with
gguf and is not serializable"), so the conversion drops ``quantization_config`` and copies the state dict into a fresh
model built from the config. The cache root is ``models.cache.cache_root()``.
transformers is imported inside the functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from models.cache import cache_root

CONVERTED_MARKER = "softmask_evaluator.json"  # {"source", "sha256"} of the GGUF a converted directory came from


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` once and write a plain fp32 HF directory (weights, config, tokenizer, marker) to ``out``
    atomically (temp dir + rename; a concurrent converter that finished first wins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # else save_pretrained refuses a GGUF-loaded model
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf), "sha256": sha256_file(gguf)}))
        if out.exists():  # a concurrent converter won
            shutil.rmtree(tmp)
            return
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_to_hf_dir(gguf_path, cache_dir=None) -> Path:
    """Dequantise a GGUF ONCE into a fp32 safetensors HF directory, cached by the file's sha256."""
    gguf = Path(gguf_path).expanduser().resolve()
    out = Path(cache_dir or cache_root() / "gguf") / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if not ((out / "model.safetensors").is_file() and (out / "config.json").is_file()):
        convert_gguf(gguf, out)
    return out


def from_gguf(gguf_path, *, cache_dir=None, **kwargs):
    """(HFDiffusionLM, TextTokenizer) from a GGUF file (transformers' GGUF support; needs gguf + accelerate).

    ``kwargs`` as for :func:`models.hf_loading.from_hf_dir`. The dequantised copy lives under ``cache_dir`` (default
    ``<cache_root>/gguf``), so later loads skip the slow dequantisation.
    """
    from models.hf_loading import from_hf_dir

    return from_hf_dir(gguf_to_hf_dir(gguf_path, cache_dir), **kwargs)
