"""LoRA / DoRA adapters (peft) on a diffusion LM's backbone: inject, freeze, merge.

    apply_adapters(model, AdapterConfig(r=16, alpha=16, dora=True))   # the paper's SM fine-tuning setting
    merge_adapters(model)                                              # fold into the base weights, drop peft layers
    models.save_adapters(model, out, base_checkpoint=base_dir)         # adapters + SM head only (models.checkpoint)

Adapters are injected into ``model.backbone`` in place (``peft.inject_adapter_in_model``): the module tree keeps its
names; each targeted ``nn.Linear`` becomes a peft LoRA layer holding ``base_layer`` + ``lora_A/B`` (+ the DoRA
``lora_magnitude_vector``). Trainable afterwards: the adapters and the SM head; everything else is frozen.
When the model's config has an ``adapters`` field (the HF backbone's ``HFDiffusionConfig``), the adapter settings are
recorded there, so ``models.save_pretrained`` / ``models.load_pretrained`` round-trip an unmerged model.
peft is imported lazily (pure PyTorch; no ray / deepspeed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ADAPTER_MARK = "lora_"  # every peft LoRA/DoRA tensor name contains it (lora_A, lora_B, lora_magnitude_vector)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention projections of HF decoder layers (Llama, Qwen2, ...)


@dataclass
class AdapterConfig:
    """LoRA / DoRA settings (defaults: the paper's Dream fine-tuning, DoRA r=16 α=16 on q/k/v/o)."""

    r: int = field(default=16, metadata={"doc": "adapter rank"})
    alpha: float = field(default=16.0, metadata={"doc": "LoRA scaling numerator (scale = alpha / r)"})
    dora: bool = field(default=True, metadata={"doc": "DoRA (weight-decomposed LoRA) instead of plain LoRA"})
    dropout: float = field(default=0.0, metadata={"doc": "dropout on the adapter input"})
    targets: tuple[str, ...] = field(default=QKVO, metadata={"doc": "names of the nn.Linear modules to adapt"})

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0 or not self.targets:
            raise ValueError(f"invalid AdapterConfig (need r >= 1, alpha > 0, 0 <= dropout < 1, targets): {self}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return cls(**d)


def is_adapter_key(name: str) -> bool:
    return ADAPTER_MARK in name


def has_adapters(model) -> bool:
    return any(is_adapter_key(name) for name, _ in model.named_parameters())


def _record(model, cfg: AdapterConfig | None) -> None:
    mcfg = getattr(model, "config", None)
    if mcfg is not None and dataclasses.is_dataclass(mcfg) and "adapters" in {f.name for f in dataclasses.fields(mcfg)}:
        mcfg.adapters = cfg.to_dict() if cfg is not None else None


def apply_adapters(model, cfg: AdapterConfig, freeze_backbone: bool = True):
    """Inject LoRA/DoRA into ``model.backbone`` and set ``requires_grad``; returns ``model`` (mutated).

    Trainable: adapters and the SM head; the rest of the backbone too when ``freeze_backbone=False``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from models.optim import is_sm_param

    if has_adapters(model):
        raise ValueError("the model already has adapters")
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      use_dora=cfg.dora, bias="none")
    model.backbone = inject_adapter_in_model(lcfg, model.backbone)
    if not has_adapters(model):
        raise ValueError(f"no module of the backbone matches the adapter targets {cfg.targets}")
    for name, p in model.named_parameters():
        p.requires_grad_(is_sm_param(name) or is_adapter_key(name) or not freeze_backbone)
    _record(model, cfg)
    return model


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merged_state_dict(model) -> dict:
    """Weights with every adapter merged into its base layer, in the un-adapted key layout (``merge_adapters``:
    mutates ``model`` into the plain model, whose forward is unchanged)."""
    return merge_adapters(model).state_dict()


def merge_adapters(model):
    """Fold the adapters into the base weights and put the plain base layers back; returns ``model`` (mutated).

    Afterwards the model is an ordinary (un-adapted) model whose parameters are all trainable again.
    """
    layers = _tuner_layers(model)
    if not layers:
        return model
    for name, module in layers:
        if not module.merged:
            module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    _record(model, None)
    return model

