"""Exponential moving average of the backbone weights; the SM head is excluded (as in the paper's code)."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.optim import is_sm_param


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if not is_sm_param(n)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {n: sd[n].detach().clone().float() for n in self.shadow}

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA weights in place of the backbone's (SM head kept as trained)."""
        sd = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in sd.items()}


def checksum(state: dict[str, torch.Tensor]) -> float:
    """Σ|w| of a state dict in float64, in name order: a cheap fingerprint for logs (the setup record of a resumed run
    shows which EMA it restored)."""
    return float(sum(state[n].double().abs().sum() for n in sorted(state)))
