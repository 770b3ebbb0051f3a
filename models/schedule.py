"""Noise schedules α_t, forward masking q(x_t | x_0), and (global) antithetic time sampling."""
from __future__ import annotations

import math
from typing import Callable

import torch

from models.names import SCHEDULES as NAMES, check_registry


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


class DreamLinear:
    """Dream's fine-tuning noise: mask probability (1 − ε)·t + ε, loss weight 1/t (its collator's ``dsigma``)."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) * (1 - t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t


SCHEDULES: dict[str, Callable[..., object]] = {"loglinear": LogLinear, "cosine": Cosine, "dream": DreamLinear}
check_registry("noise schedules", NAMES, SCHEDULES)


def build_schedule(name: str, eps: float = 1e-3):
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name](eps)


def sample_t(batch: int, *, shared: torch.Generator, local: torch.Generator, antithetic: bool = True,
             rank: int = 0, world: int = 1, t_min: float = 1e-3, t_max: float = 1.0,
             per_batch: bool = False) -> torch.Tensor:
    """t (batch,) in [t_min, t_max].

    Antithetic (the paper's trainer): the GLOBAL batch of N = world·batch samples is split into N equal strata of
    [0, 1) and each stratum gets its own uniform draw, u_i = (i + r_i) / N; the draws come from the generator shared
    by all ranks, so they agree on the whole set, and this rank takes its slice (rank/world are passed in, nothing
    distributed is imported). ``per_batch``: one t for the whole global batch (Dream's collator)."""
    n = world * batch
    if per_batch:
        u = torch.rand((), generator=shared).expand(batch).clone()
    elif antithetic:
        r = torch.rand(n, generator=shared, dtype=torch.float64)  # one draw per stratum, identical on every rank
        i = torch.arange(n, dtype=torch.float64)
        u = ((i + r) / n)[rank * batch:(rank + 1) * batch].float()
    else:
        u = torch.rand(batch, generator=local)
    return t_min + (t_max - t_min) * u


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, schedule, mask_id: int, generator: torch.Generator,
                maskable: torch.Tensor | None = None, min_one: bool = False) -> torch.Tensor:
    """x_t ~ q(x_t | x_0): each maskable token is replaced by [MASK] with probability 1 − α_t. ``min_one``: a row
    that drew no [MASK] gets one at a uniformly chosen maskable position (Dream's collator)."""
    p_mask = (1 - schedule.alpha(t)).unsqueeze(-1)  # (B, 1)
    u = torch.rand(x0.shape, generator=generator).to(x0.device)  # (B, L)
    allowed = torch.ones_like(x0, dtype=torch.bool) if maskable is None else maskable.bool()
    masked = (u < p_mask.to(x0.device)) & allowed
    if min_one:
        none = ~masked.any(1) & allowed.any(1)  # (B,)
        # the maskable position with the smallest u (uniform among them): a second draw would change every other row
        pick = torch.where(allowed, u, torch.full_like(u, 2.0)).argmin(1)  # (B,)
        masked[none, pick[none]] = True
    return torch.where(masked, torch.full_like(x0, mask_id), x0)
