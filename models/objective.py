"""The MDLM continuous-time ELBO with binary, soft-masked (two-pass) or self-conditioning training.

All randomness derives from (seed, step, rank) so that every rank agrees on the two-pass coin (ZeRO-3 needs identical
forward call graphs), antithetic t is global over the data-parallel batch, and a resumed run replays exactly.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

import torch
import torch.nn.functional as F

from models.objective_config import ObjectiveConfig
from models.schedule import build_schedule, mask_tokens, sample_t
from models.softmask import entropy_topk, flat_rows, gate_open_count

def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(shared across ranks, local to this rank) CPU generators for one step."""
    return (torch.Generator().manual_seed(_seed(seed, step, "shared")),
            torch.Generator().manual_seed(_seed(seed, step, rank, "local")))


def uses_two_pass(obj: ObjectiveConfig, seed: int, step: int) -> bool:
    """One coin per (global) batch; identical on every rank and on replay."""
    if obj.kind == "binary" or obj.p_sm <= 0:
        return False
    return random.Random(_seed(seed, step, "coin")).random() < obj.p_sm


def elbo_terms(logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule,
               mask_id: int) -> torch.Tensor:
    """Per-token weighted NLL (B, L) from full logits (B, L, V): w(t)·(−log p_θ(x0)) on masked positions, 0 elsewhere
    (SUBS carry-over)."""
    masked = x_t == mask_id  # (B, L)
    out = torch.zeros(x0.shape, device=logits.device, dtype=torch.float32)
    out[masked] = masked_elbo_terms(logits[masked], x0, masked, t, schedule)
    return out


def token_nll(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log softmax(z)[target] (M,) in fp32, from logits z (M, V) of any float dtype.

    Eager, this materialises fp32 copies of z (cast, log-softmax, and their gradients); ``models.compile.
    compiled_token_nll`` fuses it into one reduction forward and one elementwise backward."""
    return F.cross_entropy(z.float(), target, reduction="none")


NLL = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_elbo_terms(z: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                      schedule, nll: NLL = token_nll) -> torch.Tensor:
    """w(t)·(−log p_θ(x0)) (M,) for the masked rows only, given their logits z (M, V) (``masked_only`` forward).
    ``masked`` is the (B, L) mask or its flat row-major indices (M,) (``models.softmask.flat_rows``)."""
    flat = flat_rows(masked) if masked.dtype == torch.bool else masked  # (M,)
    nll = nll(z, x0.reshape(-1).index_select(0, flat))  # (M,)
    weight = schedule.weight(t.to(z.device)).index_select(0, flat // x0.shape[1])  # (M,): w(t) of each row's sample
    return weight * nll


def noise_batch(x0, obj, seed, step, rank, world, loss_mask, mask_id):
    """(t (B,), x_t (B, L), schedule): the training noise of one batch, derived from (seed, step, rank)."""
    shared, local = generators(seed, step, rank)
    schedule = build_schedule(obj.schedule, obj.eps)
    t = sample_t(x0.shape[0], shared=shared, local=local, antithetic=obj.antithetic, rank=rank, world=world,
                 t_min=obj.t_min or obj.eps, t_max=obj.t_max, per_batch=obj.per_batch_t).to(x0.device)
    x_t = mask_tokens(x0, t, schedule, mask_id, local, loss_mask, min_one=obj.min_one_masked)
    return t, x_t, schedule


def training_loss(model, x0: torch.Tensor, obj: ObjectiveConfig, *, seed: int, step: int, rank: int = 0,
                  world: int = 1, loss_mask: torch.Tensor | None = None, two_pass: bool | None = None,
                  mask_id: int | None = None, nll: NLL = token_nll, gate_centre: float | None = None):
    """(loss, metrics). ``model`` is a DiffusionLM or anything with its forward (a DeepSpeed engine); ``nll``: the
    per-token cross-entropy (:func:`token_nll`, or its compiled form from ``models.compile.compiled_token_nll``).

    loss = Σ_masked w(t)·NLL / #scored tokens (the per-token ELBO estimate), or / #masked tokens with
    ``obj.loss_norm == "masked"`` (Dream). ``loss_mask`` (B, L): 1 where a token may be masked and is scored, 0 for
    prompt tokens / ignored padding (never masked).

    Gate diagnostics: on a soft-masking two-pass step the metrics carry ``lambda_mean`` and ``gate_open`` (the share
    of masked positions whose pass-1 prediction opens the SM gate, σ(ω_a(−H − ω_b)) >= 0.5); on a one-pass step of any
    objective ``gate_centre`` (the head's current ω_b, passed by a trainer on the steps it logs) gives ``gate_open``
    of this step's prediction, which reads pure masks just as pass 1 does.
    """
    inner = getattr(model, "module", model)
    mask_id = inner.mask_id if mask_id is None else mask_id
    if two_pass is None:
        two_pass = uses_two_pass(obj, seed, step)
    t, x_t, schedule = noise_batch(x0, obj, seed, step, rank, world, loss_mask, mask_id)
    masked = x_t == mask_id  # (B, L)
    flat = flat_rows(masked)  # (M,): the step's one wait for the device; every gather below is by index
    z, fb = model(x_t, t, two_pass=two_pass, masked_only=True, rows=flat, with_stats=True)  # (M, V): masked rows
    terms = masked_elbo_terms(z, x0, flat, t, schedule, nll)
    if obj.loss_norm == "masked":
        denom = torch.tensor(max(int(flat.numel()), 1))
    else:
        denom = loss_mask.sum().clamp_min(1) if loss_mask is not None else torch.tensor(x0.numel())
    loss = terms.sum() / denom.to(terms.device)
    # 0-dim tensors, not floats: reading them (float(), .item()) waits for the device, so callers do it only when
    # they log; a step that is not logged never stalls on its metrics
    metrics = {"loss": loss.detach(), "masked_frac": masked.float().mean(), "two_pass": float(two_pass),
               "t_mean": t.mean()}
    if fb is not None and fb.rows:
        metrics["lambda_mean"] = fb.lambda_sum / fb.rows
        metrics["gate_open"] = fb.gate_open / fb.rows
    elif gate_centre is not None and not two_pass and flat.numel():
        neg_h, _, _ = entropy_topk(z.detach(), 1)  # (M,)
        metrics["gate_open"] = gate_open_count(neg_h, gate_centre) / flat.numel()
    return loss, metrics


@torch.no_grad()
def validation_nll(model, x0: torch.Tensor, obj: ObjectiveConfig, *, seed: int = 0, step: int = 0,
                   two_pass: bool = False, loss_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(Σ weighted NLL, #scored tokens) for one batch; exp(Σ/n) over a split is the perplexity bound."""
    inner = getattr(model, "module", model)
    t, x_t, schedule = noise_batch(x0, obj, seed, step, 0, 1, loss_mask, inner.mask_id)
    masked = x_t == inner.mask_id
    terms = masked_elbo_terms(model(x_t, t, two_pass=two_pass, masked_only=True), x0, masked, t, schedule)
    n = int(loss_mask.sum()) if loss_mask is not None else x0.numel()
    return float(terms.sum()), n
