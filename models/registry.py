"""Backbone registry: checkpoint ``"backbone"`` name -> (config type, builder, state-dict hooks).

    spec = BACKBONES[name]; cfg = spec.config_cls.from_dict(d); model = spec.build(cfg)

``models.checkpoint`` dispatches on the ``"backbone"`` field of config.json through this table (absent = ``"core"``,
so every checkpoint written before the field existed loads exactly as before). A new backbone registers a spec here;
nothing else branches on its name. Builders import their heavy dependencies (transformers) lazily.
Registered: ``core`` (our transformer), ``hf`` (a transformers decoder, models.hf_backbone,
built by models.hf_loading), ``dit`` (MDLM's DiT,
models.dit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from models import dit, hf_backbone, hf_loading
from models.config import ModelConfig
from models.diffusion_lm import build_model


def _identity_state(model: nn.Module, sd: dict) -> dict:
    return sd


def _strict_load(model: nn.Module, sd: dict, path) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing={missing} unexpected={unexpected}")


@dataclass(frozen=True)
class BackboneSpec:
    config_cls: type                                          # has from_dict(d) / to_dict()
    build: Callable[[Any], nn.Module]                         # cfg -> model (weights to be loaded)
    state_to_save: Callable[[nn.Module, dict], dict] = _identity_state  # (model, state_dict) -> tensors written
    load_state: Callable[[nn.Module, dict, Any], None] = _strict_load   # (model, tensors, path); ValueError on mismatch
    build_for_load: Callable[[Any], nn.Module] | None = None  # cfg -> model whose weights load_state fills (skips init)
    # (cfg, partition) -> model whose large modules are built inside ``partition()`` (ZeRO-3 zero.Init) and whose
    # weights ``model.init_parameters(gather)`` sets; None: the model is built whole (DeepSpeed partitions it later)
    build_partitioned: Callable[[Any, Any], nn.Module] | None = None


BACKBONES: dict[str, BackboneSpec] = {
    "core": BackboneSpec(ModelConfig, build_model, build_partitioned=build_model),
    "hf": BackboneSpec(hf_backbone.HFDiffusionConfig, hf_loading.build, hf_loading.state_to_save,
                       hf_loading.load_state, build_for_load=hf_loading.build_for_load),
    "dit": BackboneSpec(dit.DiTConfig, dit.build, build_partitioned=dit.build),
}
DEFAULT_BACKBONE = "core"


def register_backbone(name: str, spec: BackboneSpec) -> None:
    BACKBONES[name] = spec


def backbone_name(cfg: Any) -> str:
    """Registry name of a config object (by its type)."""
    for name, spec in BACKBONES.items():
        if spec.config_cls is not None and isinstance(cfg, spec.config_cls):
            return name
    raise TypeError(f"no registered backbone for config type {type(cfg).__name__}")


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    return BACKBONES[name]


def config_from_dict(d: dict, backbone: str = DEFAULT_BACKBONE):
    """The typed model config of a checkpoint's ``"model"`` section."""
    return get_spec(backbone).config_cls.from_dict(d)


def build_from_config(cfg) -> nn.Module:
    """A freshly initialised model for any registered config type."""
    return get_spec(backbone_name(cfg)).build(cfg)
