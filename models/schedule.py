"""Noise schedules α_t, forward masking q(x_t | x_0), and (global) antithetic time sampling."""
from __future__ import annotations

import math
from typing import Callable

import torch


class LogLinear:
    """α_t = 1 − (1 − ε)·t: the ELBO weight −α'_t / (1 − α_t) is exactly 1/t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """−α'_t / (1 − α_t)."""
        return 1.0 / t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise σ(t) = −log α_t (MDLM's time input to a time-conditioned network; 0 at t = 0)."""
        return -torch.log1p(-(1 - self.eps) * t)


class Cosine:
    """α_t = ε + (1 − ε)·cos(π t / 2)."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.eps + (1 - self.eps) * torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        d_alpha = -(1 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        return -d_alpha / (1 - self.alpha(t))


SCHEDULES: dict[str, Callable[..., object]] = {"loglinear": LogLinear, "cosine": Cosine}


def build_schedule(name: str, eps: float = 1e-3):
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name](eps)


def sample_t(batch: int, *, shared: torch.Generator, local: torch.Generator, antithetic: bool = True,
             rank: int = 0, world: int = 1, t_min: float = 1e-3, t_max: float = 1.0) -> torch.Tensor:
    """t (batch,) in [t_min, t_max]. Antithetic: one shared offset u0, then evenly spaced over the GLOBAL batch
    (world·batch points), this rank taking its slice — ranks pass rank/world in, nothing distributed is imported."""
    if antithetic:
        u0 = torch.rand((), generator=shared)
        idx = torch.arange(batch, dtype=torch.float64) + rank * batch
        u = ((u0.double() + idx / (world * batch)) % 1.0).float()
    else:
        u = torch.rand(batch, generator=local)
    return t_min + (t_max - t_min) * u


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, schedule, mask_id: int, generator: torch.Generator,
                maskable: torch.Tensor | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0): each maskable token is replaced by [MASK] with probability 1 − α_t."""
    p_mask = (1 - schedule.alpha(t)).unsqueeze(-1)  # (B, 1)
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = u < p_mask.to(x0.device)
    if maskable is not None:
        masked &= maskable.bool()
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def flat_rows(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat indices (M,) of the True positions of a (B, L) mask: ``h.flatten(0, 1)[flat_rows(m)]`` equals
    ``h[m]``. Computing them is one device->host wait; every gather by them afterwards is asynchronous."""
    return mask.reshape(-1).nonzero().squeeze(1)
