"""Fine-tuning adapters: frozen backbone, LoRA / DoRA (peft) on the backbone's linears, merge back for export.

Thin wrapper over :mod:`models.adapters` (which also serves the HF backbone, targets ``q_proj``/``k_proj``/
``v_proj``/``o_proj``; our own backbone's attention is ``qkv``/``proj``). Adapters are injected into
``model.backbone`` in place: the module tree keeps its names, targeted ``nn.Linear``s become peft LoRA layers with
``base_layer`` + ``lora_A/B`` (+ DoRA magnitude). The export merges them into the base weights and strips the adapter
keys, so it is a plain checkpoint that ``models.load_pretrained`` reads (strict keys).
"""
from __future__ import annotations

from models.adapters import ADAPTER_MARK, has_adapters, merged_state_dict

__all__ = ["ADAPTER_MARK", "DEFAULT_TARGETS", "apply_adapters", "core_state_dict", "has_adapters"]

# adapter targets when the config names none, per backbone (models.registry name)
DEFAULT_TARGETS = {"core": ["qkv", "proj", "mlp.0", "mlp.2"], "dit": ["qkv", "proj", "mlp.0", "mlp.2"],
                   "hf": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def apply_adapters(model, freeze_backbone: bool, lora_r: int, lora_alpha: float, use_dora: bool,
                   targets: list[str]):
    """Inject LoRA/DoRA (``lora_r > 0``) and set ``requires_grad``; returns the model.

    Trainable: the SM head (always), adapter weights (with LoRA), the whole backbone (no LoRA, not frozen).
    """
    from models.adapters import AdapterConfig
    from models.adapters import apply_adapters as _apply
    from models.optim import is_sm_param

    if lora_r > 0:
        return _apply(model, AdapterConfig(r=lora_r, alpha=lora_alpha, dora=use_dora, targets=tuple(targets)))
    for name, p in model.named_parameters():
        p.requires_grad_(is_sm_param(name) or not freeze_backbone)
    return model


def core_state_dict(model) -> dict:
    """The model's weights in the un-adapted layout: adapters merged into their base layers (mutates ``model``)."""
    return merged_state_dict(model)
