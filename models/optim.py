"""Optimizer parameter groups: backbone (weight decay on matrices only) and the SM head (own lr, no decay)."""
from __future__ import annotations

import torch.nn as nn

SM_PREFIX = "sm_head."


def is_sm_param(name: str) -> bool:
    return name.startswith(SM_PREFIX) or f".{SM_PREFIX}" in name


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, sm_lr: float = 1e-2) -> list[dict]:
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_sm_param(name):
            head.append(p)
        elif p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
              {"params": head, "lr": sm_lr, "weight_decay": 0.0, "name": "sm_head"}]
    return [g for g in groups if g["params"]]
