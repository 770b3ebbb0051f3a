"""The soft-masking (SM) head: three learnable scalars that turn a prediction into a soft input.

For a still-masked position with predictive distribution p (full vocabulary):
    λ(p) = ω_s · σ(ω_a · (−H(p) − ω_b)),   π = top-k probabilities renormalised,
    e    = (1 − λ)·E[mask] + λ·Σ_i π_i·E[v_i].
The head returns the sparse form (ids (B,L,k+1), weights (B,L,k+1)) with ids[...,0] = x_t; the backbone embeds it
by gathering k+1 rows. Entropy, top-k and λ are computed only on masked rows, in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = 1e-6


def flat_rows(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat indices (M,) of the True positions of a (B, L) mask: ``h.flatten(0, 1)[flat_rows(m)]`` equals
    ``h[m]``. Computing them is one device->host wait; every gather by them afterwards is asynchronous."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) in nats along the last dim, computed in fp32 from one fused log_softmax."""
    logp = torch.log_softmax(z.float(), dim=-1)  # (M, V)
    h = -torch.linalg.vecdot(logp.exp(), logp)  # (M,)
    if torch.isnan(h).any():  # −inf logits give 0·(−inf): redo with a finite stand-in (rare path)
        h = -torch.linalg.vecdot(logp.exp(), torch.nan_to_num(logp, neginf=-1e30))
    return h


def _rows_per_chunk(z: torch.Tensor) -> int:
    """Rows of z handled at once: cache-sized on CPU; ~256 MB of fp32 on an accelerator, where every chunk costs a
    handful of kernel launches and small chunks would leave the device idle between them."""
    if z.device.type == "cpu":
        return 32
    return max(32, (256 << 20) // (4 * z.shape[-1]))


def neg_entropy(z: torch.Tensor) -> torch.Tensor:
    """−H(softmax(z)) (m,) in fp32 for logits z (m, V) of any float dtype: one log_softmax, one exp, one dot.
    ``models.compile.compile_softmask_head`` swaps in a compiled copy (one fused reduction over the bf16 logits)."""
    logp = torch.log_softmax(z.float(), dim=-1)  # (m, V)
    return torch.linalg.vecdot(logp.exp(), logp)


@torch.no_grad()
def entropy_topk(z: torch.Tensor, k: int, chunk: int | None = None,
                 neg_entropy_fn: Callable[[torch.Tensor], torch.Tensor] = neg_entropy,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(−H, top-k logits, top-k ids) of each row of z (M, V), fp32, in row chunks.

    One fused log_softmax, one exp and one dot per chunk: on a 50k vocabulary this reads each row ~4 times while it
    is still in cache (CPU) or in few large kernels (GPU), instead of materialising several (M, V) temporaries. The
    top-k runs on z's own dtype (bf16 on a GPU: half the bytes; the fp32 cast of a bf16 value is exact)."""
    M = z.shape[0]
    chunk = chunk or _rows_per_chunk(z)
    neg_h = torch.empty(M, device=z.device, dtype=torch.float32)
    top_z = torch.empty(M, k, device=z.device, dtype=torch.float32)
    top_i = torch.empty(M, k, device=z.device, dtype=torch.long)
    for s in range(0, M, chunk):
        zc = z[s:s + chunk]
        neg_h[s:s + chunk] = neg_entropy_fn(zc)
        if k == 1:
            top_z[s:s + chunk], top_i[s:s + chunk] = torch.max(zc, dim=-1, keepdim=True)
        else:
            top_z[s:s + chunk], top_i[s:s + chunk] = torch.topk(zc, k, dim=-1)
    bad = torch.isnan(neg_h)
    if bad.any():  # −inf logits give 0·(−inf): redo those rows with a finite stand-in (rare path, one sync)
        neg_h[bad] = -entropy_from_logits(z[bad])
    return neg_h, top_z, top_i


@dataclass
class FeedbackStats:
    """What one soft-mask feedback measured over the rows it fed (sums, so that several forwards add up).

    ``lambda_sum`` and ``gate_open`` are 0-dim device tensors (reading one waits for the device); ``gate_open`` counts
    the rows whose gate σ(ω_a(−H − ω_b)) is at least 0.5, i.e. whose prediction is confident enough (H ≤ −ω_b) for
    soft-masking to act once ω_s has grown."""

    lambda_sum: torch.Tensor
    gate_open: torch.Tensor
    rows: int

    def __add__(self, other: "FeedbackStats") -> "FeedbackStats":
        return FeedbackStats(self.lambda_sum + other.lambda_sum, self.gate_open + other.gate_open,
                             self.rows + other.rows)

    def means(self) -> dict[str, float]:
        """{"lambda_mean", "gate_open"} as floats (NaN when no row was fed)."""
        n = self.rows or float("nan")
        return {"lambda_mean": float(self.lambda_sum) / n, "gate_open": float(self.gate_open) / n}


def gate_open_count(neg_entropy: torch.Tensor, omega_b: torch.Tensor | float) -> torch.Tensor:
    """Rows whose SM gate σ(ω_a(−H − ω_b)) is >= 0.5 (ω_a > 0, so: −H >= ω_b), as a 0-dim tensor."""
    return (neg_entropy >= omega_b).sum()


class SoftMaskHead(nn.Module):
    """λ-gated top-k feedback. ``k=None`` mixes the full vocabulary with a learnable softmax temperature."""

    def __init__(self, k: int | None = 3, omega_s: float = 1e-6, omega_b: float = -0.75, omega_a: float = 6.66,
                 temperature: float = 1.0):
        super().__init__()
        if k is not None and k < 1:
            raise ValueError(f"SoftMaskHead k must be >= 1 or None, got {k}")
        bad = [msg for ok, msg in ((0 < omega_s < 1, f"0 < omega_s < 1, got {omega_s}"),
                                   (omega_a > 0, f"omega_a > 0, got {omega_a}"),
                                   (omega_b < 0, f"omega_b < 0, got {omega_b}"),
                                   (temperature > 0, f"temperature > 0, got {temperature}")) if not ok]
        if bad:
            raise ValueError("SoftMaskHead needs " + "; ".join(bad))
        self.k = k
        self.raw_scale = nn.Parameter(torch.tensor(_logit(omega_s)))                 # ω_s = σ(raw)
        self.raw_centre = nn.Parameter(torch.tensor(_inv_softplus(-omega_b - _EPS)))  # ω_b = −softplus(raw) − ε
        self.raw_steepness = nn.Parameter(torch.tensor(_inv_softplus(omega_a - _EPS)))  # ω_a = softplus(raw) + ε
        self.raw_temperature = (nn.Parameter(torch.tensor(_inv_softplus(temperature - _EPS))) if k is None else None)
        self.neg_entropy_fn: Callable[[torch.Tensor], torch.Tensor] = neg_entropy  # top-k path; see neg_entropy

    @property
    def omega_s(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_scale)

    @property
    def omega_b(self) -> torch.Tensor:
        return -F.softplus(self.raw_centre) - _EPS

    @property
    def omega_a(self) -> torch.Tensor:
        return F.softplus(self.raw_steepness) + _EPS

    @property
    def temperature(self) -> torch.Tensor:
        if self.raw_temperature is None:
            return torch.ones((), device=self.raw_scale.device)
        return F.softplus(self.raw_temperature) + _EPS

    def lam(self, neg_entropy: torch.Tensor) -> torch.Tensor:
        """λ as a function of −H (any shape)."""
        return self.omega_s * torch.sigmoid(self.omega_a * (neg_entropy - self.omega_b))

    def values(self) -> dict[str, float]:
        out = {"omega_s": self.omega_s.item(), "omega_a": self.omega_a.item(), "omega_b": self.omega_b.item()}
        if self.k is None:
            out["temperature"] = self.temperature.item()
        return out

    def forward(self, x_t: torch.Tensor, logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B,L) long, logits (B,L,V) -> ids (B,L,K+1) long, weights (B,L,K+1) fp32 (K = k, or V when k=None)."""
        masked = x_t == mask_id  # (B, L)
        z = logits.reshape(-1, logits.shape[-1]) if bool(masked.all()) else logits[masked]  # view when all masked
        ids, w, _ = self.mix(x_t, masked, z)
        return ids, w

    def mix(self, x_t: torch.Tensor, masked: torch.Tensor, z: torch.Tensor, flat: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, FeedbackStats]:
        """Same as forward, given only the still-masked rows' logits z (M, V) (M = masked.sum()), plus what it
        measured (:class:`FeedbackStats`). ``flat`` (M,) may pass ``flat_rows(masked)`` in when the caller already
        has it. ``scale`` (B,) multiplies ω_s per sample (transparency scheduling at sampling time; 0 gives the pure
        [MASK] input)."""
        B, L = x_t.shape
        V = z.shape[-1]
        K = self.k if self.k is not None else V
        ids = x_t.unsqueeze(-1).expand(B, L, K + 1).clone()  # unmasked rows: x_t with weight 1, the rest weight 0
        w = torch.zeros(B, L, K + 1, device=z.device, dtype=torch.float32)
        w[..., 0] = 1.0
        if z.shape[0] == 0:
            zero = torch.zeros((), device=z.device)
            return ids, w, FeedbackStats(zero, zero, 0)
        if self.k is None:
            z = z.float() / self.temperature  # τ is learnable: keep this path differentiable in z
            neg_h = -entropy_from_logits(z)  # (M,)
            top_ids = torch.arange(V, device=z.device).expand(z.shape[0], V)
            pi = torch.softmax(z, dim=-1)
        else:
            neg_h, top_z, top_ids = entropy_topk(z, self.k, neg_entropy_fn=self.neg_entropy_fn)  # z is a constant
            pi = torch.softmax(top_z, dim=-1)  # renormalised top-k probabilities
        lam = self.lam(neg_h)  # (M,) — gradients reach ω only through λ
        # one flat index of the masked rows (M,): every gather/scatter below is then sync-free on an accelerator
        flat = flat_rows(masked) if flat is None else flat
        if scale is not None:
            lam = lam * scale.to(lam).index_select(0, flat // L)  # (M,): each row's sample factor
        stats = FeedbackStats(lam.detach().sum(), gate_open_count(neg_h.detach(), self.omega_b.detach()), z.shape[0])
        ids.view(B * L, K + 1)[flat] = torch.cat([x_t.reshape(-1)[flat].unsqueeze(-1), top_ids], dim=-1)
        fed = torch.cat([(1 - lam).unsqueeze(-1), lam.unsqueeze(-1) * pi], -1)  # (M, K+1), carries grads to ω
        w = w.view(B * L, K + 1).index_put((flat,), fed).view(B, L, K + 1)
        return ids, w, stats
