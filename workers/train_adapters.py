"""Fine-tuning adapters: frozen backbone, LoRA / DoRA (peft) on the backbone's linears, merge back for export.

Adapters are injected into ``model.backbone`` in place (``peft.inject_adapter_in_model``: the module tree keeps its
names, targeted ``nn.Linear``s become peft LoRA layers with ``base_layer`` + ``lora_A/B`` (+ DoRA magnitude)).
The export merges them into the base weights and strips the adapter keys, so it is a plain core checkpoint that
``models.load_pretrained`` reads (strict keys).
"""
from __future__ import annotations

ADAPTER_MARK = "lora_"


def apply_adapters(model, freeze_backbone: bool, lora_r: int, lora_alpha: float, use_dora: bool,
                   targets: list[str]):
    """Inject LoRA/DoRA (``lora_r > 0``) and set ``requires_grad``; returns the model.

    Trainable: the SM head (always), adapter weights (with LoRA), the whole backbone (no LoRA, not frozen).
    """
    from models.optim import is_sm_param

    if lora_r > 0:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(targets),
                         use_dora=use_dora, bias="none")
        model.backbone = inject_adapter_in_model(cfg, model.backbone)
    for name, p in model.named_parameters():
        if is_sm_param(name) or ADAPTER_MARK in name:
            p.requires_grad_(True)
        else:
            p.requires_grad_(not (freeze_backbone or lora_r > 0))
    return model


def has_adapters(model) -> bool:
    return any(ADAPTER_MARK in name for name, _ in model.named_parameters())


def core_state_dict(model) -> dict:
    """The model's weights in the core layout: adapters merged into their base layers (mutates ``model``)."""
    if not has_adapters(model):
        return model.state_dict()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ADAPTER_MARK not in k}
