"""Saving and loading whole models: a directory with config.json + model.safetensors (+ softmask_head.json).

The layout is ``models.checkpoint_format``; config.json's ``backbone`` picks the config type / builder in
``models.registry`` (absent: our own ``core`` DiffusionLM; ``hf``: models.hf_backbone, built by models.hf_loading).

Writes are atomic (temp dir + rename); loading never unpickles.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.adapters import has_adapters
from models.checkpoint_format import (CONFIG_FILE, FORMAT_VERSION, HEAD_FILE, WEIGHTS_FILE, read_config_json,
                                      read_weights)
from models.config import ModelConfig
from models.diffusion_lm import DiffusionLM
from models.registry import DEFAULT_BACKBONE, backbone_name, config_from_dict, get_spec


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
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "softmask", "version": str(FORMAT_VERSION)})
        cfg = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "metadata": metadata or {}}
        if backbone != DEFAULT_BACKBONE:  # our own checkpoints stay exactly as they were
            cfg["backbone"] = backbone
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / HEAD_FILE).write_text(json.dumps(model.sm_head.values(), indent=2))
        os.chmod(tmp / WEIGHTS_FILE, 0o644)  # safetensors writes it 0600; a checkpoint is meant to be shared
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
    data = read_config_json(path)
    return config_from_dict(data["model"], data.get("backbone", DEFAULT_BACKBONE)), data.get("metadata", {})


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DiffusionLM:
    """Load a checkpoint directory written by save_pretrained (safetensors only, strict key match)."""
    cfg, metadata = read_config(path)
    spec = get_spec(backbone_name(cfg))
    model = (spec.build_for_load or spec.build)(cfg)
    sd = read_weights(path, map_location)
    spec.load_state(model, sd, path)  # ValueError "does not match its config" on missing / unexpected keys
    model.checkpoint_metadata = metadata
    return model.eval()


def save_adapters(model, path, base_checkpoint, metadata: dict | None = None) -> Path:
    """Adapter-only checkpoint: adapters + SM head + config (HF backbone); ``load_pretrained(path)`` rebuilds the
    model from ``base_checkpoint`` (the softmask checkpoint of the un-adapted model, a local path that must still
    exist at load time) and gives identical logits. Returns the checkpoint path."""
    if not has_adapters(model) or "base_checkpoint" not in {f.name for f in dataclasses.fields(model.config)}:
        raise ValueError("save_adapters needs a model with adapters and a config with a base_checkpoint field")
    own = model.config
    model.config = dataclasses.replace(own, base_checkpoint=str(Path(base_checkpoint).expanduser().resolve()))
    try:
        return save_pretrained(model, path, metadata=metadata)
    finally:
        model.config = own
