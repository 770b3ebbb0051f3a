"""The on-disk layout of a softmask checkpoint directory: file names, format version, reading its two files.

    <dir>/config.json         {"format_version", "model": <config.to_dict()>, "metadata", ["backbone": name]}
    <dir>/model.safetensors   the weights (never a pickle)
    <dir>/softmask_head.json  readable ω values of the SM head

The one place that knows these names. ``models.checkpoint`` writes and loads whole models through the backbone
registry; ``models.hf_loading`` reads an adapter-only checkpoint's base through this module directly, so the loaders
never import each other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "softmask_head.json"


def read_config_json(path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory (FileNotFoundError / ValueError on a wrong directory)."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a softmask checkpoint (no config.json): {Path(path)}")
    data = json.loads(cfg_file.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: unsupported format_version {data.get('format_version')!r}")
    return data


def read_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory's safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS_FILE), device=str(map_location))
