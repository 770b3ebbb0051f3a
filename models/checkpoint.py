"""Checkpoint format: a directory with config.json + model.safetensors (+ softmask_head.json, readable ω values).

config.json = {"format_version", "model": <config.to_dict()>, "metadata", ["backbone": name]}; ``backbone`` picks the
config type / builder in ``models.registry`` (absent: our own ``core`` DiffusionLM; ``hf``: models.hf_backbone).

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
from models.diffusion_lm import DiffusionLM
from models.registry import DEFAULT_BACKBONE, backbone_name, config_from_dict, get_spec

FORMAT_VERSION = 1


def save_pretrained(model: DiffusionLM, path: str | os.PathLike, *, state_dict: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict``, e.g. EMA weights) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone_name(model.config)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = get_spec(backbone).state_to_save(model, sd)  # e.g. HF: tied duplicates dropped, adapter-only subsets
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "softmask", "version": str(FORMAT_VERSION)})
        cfg = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "metadata": metadata or {}}
        if backbone != DEFAULT_BACKBONE:  # our own checkpoints stay exactly as they were
            cfg["backbone"] = backbone
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "softmask_head.json").write_text(json.dumps(model.sm_head.values(), indent=2))
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors writes it 0600; a checkpoint is meant to be shared
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
    """(typed model config, metadata); the config type follows config.json's ``"backbone"`` (models.registry)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a softmask checkpoint (no config.json): {path}")
    data = json.loads(cfg_file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: unsupported format_version {data.get('format_version')!r}")
    return config_from_dict(data["model"], data.get("backbone", DEFAULT_BACKBONE)), data.get("metadata", {})


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DiffusionLM:
    """Load a checkpoint directory written by save_pretrained (safetensors only, strict key match)."""
    cfg, metadata = read_config(path)
    spec = get_spec(backbone_name(cfg))
    model = (spec.build_for_load or spec.build)(cfg)
    sd = load_file(str(Path(path) / "model.safetensors"), device=str(map_location))
    spec.load_state(model, sd, path)  # ValueError "does not match its config" on missing / unexpected keys
    model.checkpoint_metadata = metadata
    return model.eval()
