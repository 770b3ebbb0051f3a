"""softmask models: pure PyTorch masked diffusion LM with soft-masking. No ray/deepspeed/distributed imports.

The package itself imports nothing heavy: ``models.names`` (the shared names) is importable without torch, and the
exports below load their module on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_pretrained": "models.checkpoint", "read_config": "models.checkpoint", "save_pretrained": "models.checkpoint",
    "save_adapters": "models.checkpoint",
    "FLAVORS": "models.config", "ModelConfig": "models.config",
    "DiffusionLM": "models.diffusion_lm", "build_model": "models.diffusion_lm",
    "HFDiffusionConfig": "models.hf_backbone", "HFDiffusionLM": "models.hf_backbone",
    "BACKBONES": "models.registry", "build_from_config": "models.registry", "config_from_dict": "models.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
