"""Checkpoint format: a directory with config.json + model.safetensors (+ softmask_head.json, readable ω values).

Writes are atomic (temp dir + rename); loading never unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.diffusion_lm import DiffusionLM, build_model

FORMAT_VERSION = 1


def save_pretrained(model: DiffusionLM, path: str | os.PathLike, *, state_dict: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict``, e.g. EMA weights) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "softmask", "version": str(FORMAT_VERSION)})
        cfg = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "metadata": metadata or {}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "softmask_head.json").write_text(json.dumps(model.sm_head.values(), indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a softmask checkpoint (no config.json): {path}")
    data = json.loads(cfg_file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: unsupported format_version {data.get('format_version')!r}")
    return ModelConfig.from_dict(data["model"]), data.get("metadata", {})


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DiffusionLM:
    """Load a checkpoint directory written by save_pretrained (safetensors only, strict key match)."""
    cfg, metadata = read_config(path)
    model = build_model(cfg)
    sd = load_file(str(Path(path) / "model.safetensors"), device=str(map_location))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing={missing} unexpected={unexpected}")
    model.checkpoint_metadata = metadata
    return model.eval()
