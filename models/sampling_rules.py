"""Per-step update rules of the samplers (registry: name -> rule(ctx) -> new tokens).

Each rule sees the current tokens, the model's prediction (``MaskedLogits``: rows for at least the ``active``
positions) and the step's times t > s on the grid 1 -> t_eps, and only changes ``ctx.active`` (still-masked,
in-block, not fixed) positions — ReMDM also remasks ``ctx.decoded`` ones. Times use α_t = 1 − t. The ancestral and
ReMDM rules never force a position: what is still masked after the grid gets the sampler's noise-removal step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from models.names import ALGORITHMS, check_registry

_CHUNK_ELEMS = 1 << 24  # rows per Gumbel chunk bounded by this many float64 elements (~128 MB)


@dataclass
class StepContext:
    x: torch.Tensor        # (N, L) current tokens
    logits: Any            # models.diffusion_lm.MaskedLogits: unfiltered prediction, .at(sel) -> (M, V)
    t: float
    s: float
    active: torch.Tensor   # (N, L) bool: masked positions this step may unmask
    decoded: torch.Tensor  # (N, L) bool: generated (non-fixed) tokens of the current block
    mask_id: int
    cfg: Any
    generator: torch.Generator
    last: bool
    per_row: dict[str, torch.Tensor] | None = None  # {name in PER_ROW: (N,) float32}: per-row values overriding cfg's


# Settings that may differ between the rows of one sample() call (a Serve batch mixes requests that differ in them):
# each only changes how a row's own candidates are drawn or revealed.
PER_ROW = ("temperature", "top_p", "threshold")


def knob(ctx: StepContext, name: str, rows: torch.Tensor | None = None):
    """``cfg.<name>``, or with per-row values the row's value: (M, 1) for the positions whose rows are ``rows`` (M,),
    (N, 1) when ``rows`` is None."""
    values = ctx.per_row.get(name) if ctx.per_row else None
    if values is None:
        return getattr(ctx.cfg, name)
    return (values if rows is None else values[rows]).unsqueeze(-1)


def nucleus(probs: torch.Tensor, top_p, rule: str = "mdlm") -> torch.Tensor:
    """Nucleus filtering of probs (M, V), rows renormalised. ``mdlm`` (the paper's language-model code): keep the
    tokens, most probable first, while the cumulative probability is <= top_p, and always the first; ``dream``
    (Dream's and Hugging Face's rule): also keep the token whose probability crosses top_p. top_p: a float or one
    value per row (M, 1); 1 keeps everything."""
    per_row = torch.is_tensor(top_p)
    if not per_row and top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)  # (M, V)
    keep = (cum - sorted_p) <= top_p if rule == "dream" else cum <= top_p
    keep[..., 0] = True
    if per_row:
        keep |= top_p >= 1.0  # (M, 1): those rows are not filtered
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


def sampling_probs(z: torch.Tensor, temperature, top_p, rule: str = "mdlm") -> torch.Tensor:
    """The sampling copy (M, V): temperature then nucleus; SM feedback keeps using the unfiltered logits. temperature
    and top_p: floats, or one value per row (M, 1)."""
    t = temperature.clamp_min(1e-6) if torch.is_tensor(temperature) else max(temperature, 1e-6)
    return nucleus(torch.softmax(z.float() / t, dim=-1), top_p, rule)


def draw(z: torch.Tensor, ctx: StepContext, rows: torch.Tensor) -> torch.Tensor:
    """One token per row of logits z (M, V) (its sample's row index in ``rows`` (M,)): greedy at temperature 0, else
    float64 Gumbel-max on the sampling copy."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    temperature, top_p = knob(ctx, "temperature", rows), knob(ctx, "top_p", rows)
    per_row = torch.is_tensor(temperature)
    if not per_row and temperature == 0:
        return z.argmax(-1)
    out = []
    size = max(1, _CHUNK_ELEMS // z.shape[-1])
    for a in range(0, z.shape[0], size):
        chunk, t, p = z[a:a + size], temperature, top_p
        if per_row:
            t = t[a:a + size]
        if torch.is_tensor(p):
            p = p[a:a + size]
        logp = sampling_probs(chunk, t, p, ctx.cfg.top_p_rule).double().log()
        u = torch.rand(logp.shape, generator=ctx.generator, device=z.device, dtype=torch.float64)
        pick = (logp - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
        out.append(torch.where(t.squeeze(-1) == 0, chunk.argmax(-1), pick) if per_row else pick)
    return torch.cat(out)


def _uniform(shape, ctx: StepContext) -> torch.Tensor:
    return torch.rand(shape, generator=ctx.generator, device=ctx.x.device, dtype=torch.float64)


def _unmask_with_prob(ctx: StepContext, p_unmask: float, x_new: torch.Tensor) -> torch.Tensor:
    idx = ctx.active.nonzero(as_tuple=True)
    if idx[0].numel() == 0:
        return x_new
    go = _uniform(idx[0].shape, ctx) < p_unmask
    chosen = torch.zeros_like(ctx.active)
    chosen[idx[0][go], idx[1][go]] = True  # row-major, the order of idx
    return x_new.masked_scatter(chosen, draw(ctx.logits.at(chosen), ctx, chosen.nonzero(as_tuple=True)[0]))


def ancestral(ctx: StepContext) -> torch.Tensor:
    """MDLM reverse step: a masked token is revealed with probability (α_s − α_t)/(1 − α_t) = (t − s)/t."""
    return _unmask_with_prob(ctx, (ctx.t - ctx.s) / ctx.t, ctx.x.clone())


def _remask(ctx: StepContext, x_new: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each decoded (generated, not fixed) token of the block goes back to [MASK] with probability σ."""
    if sigma > 0:
        idx = ctx.decoded.nonzero(as_tuple=True)
        back = _uniform(idx[0].shape, ctx) < sigma
        x_new[idx[0][back], idx[1][back]] = ctx.mask_id
    return x_new


def _remdm_step(ctx: StepContext, a_t: float, a_s: float, sigma: float) -> torch.Tensor:
    """The ReMDM posterior with remasking σ: masked tokens revealed with prob (α_s − (1 − σ)α_t)/(1 − α_t), decoded
    ones remasked with prob σ."""
    x_new = _unmask_with_prob(ctx, (a_s - (1 - sigma) * a_t) / (1 - a_t), ctx.x.clone())
    return _remask(ctx, x_new, sigma)


def remdm_cap(ctx: StepContext) -> torch.Tensor:
    """ReMDM with capped remasking σ_t = min(η, (1 − α_s)/α_t) (η default 0.04)."""
    a_t, a_s = 1.0 - ctx.t, 1.0 - ctx.s
    eta = ctx.cfg.remdm_eta(0.04)
    return _remdm_step(ctx, a_t, a_s, eta if a_t <= 0 else min(eta, (1.0 - a_s) / a_t))


def remdm_loop(ctx: StepContext) -> torch.Tensor:
    """ReMDM-loop (η default 0.02): the grid's t in (t_on, 1] takes α from 0 to α_on (MDLM steps), t in (t_off, t_on]
    holds α = α_on and remasks with σ = η (decoded tokens are refined, the masked share stays ~1 − α_on), and
    t in [0, t_off] takes α from α_on to 1 (MDLM steps)."""
    cfg = ctx.cfg
    t_on, t_off, a_on = cfg.loop_t_on, cfg.loop_t_off, cfg.loop_alpha_on
    if t_off < ctx.t <= t_on:  # (on a coarse grid the last step may fall in the loop: noise removal finishes)
        return _remdm_step(ctx, a_on, a_on, cfg.remdm_eta(0.02))
    if ctx.t > t_on:  # move chance 1 − (1 − t)·α_on/(1 − t_on); a coarse grid's step stops at t_on (1 − α_on)
        m_t, m_s = (1.0 - (1.0 - u) * a_on / (1.0 - t_on) for u in (ctx.t, max(ctx.s, t_on)))
    else:  # move chance t·(1 − α_on)/t_off
        m_t, m_s = (u * (1.0 - a_on) / t_off for u in (ctx.t, ctx.s))
    return _unmask_with_prob(ctx, (m_t - m_s) / m_t if m_t > 0 else 1.0, ctx.x.clone())


def reveal_counts(active: torch.Tensor, t: float, s: float, last: bool, rule: str) -> torch.Tensor:
    """(N,) positions a confidence rule reveals this step (all of a row's on the last step). ``round``: round(#masked ·
    (1 − s/t)) per row, at least one; ``dream``: floor(batch-mean #masked · (1 − s/t)), possibly none (Dream's
    sampler), capped at each row's masked count."""
    n_masked = active.sum(1)  # (N,)
    if last:
        return n_masked
    if rule == "dream":
        n = int(float(n_masked.float().mean()) * (1 - s / t))
        return torch.clamp(n_masked, max=n)
    return torch.clamp(torch.round(n_masked * (1 - s / t)), min=1).long()


def _candidates(ctx: StepContext, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A candidate token drawn at every active position and its score: (cand (N, L) long, [MASK] elsewhere; conf
    (N, L) float, −inf elsewhere). The score reads the sampling copy (temperature 0 scores at temperature 1)."""
    idx = ctx.active.nonzero(as_tuple=True)
    z = ctx.logits.at(ctx.active)  # (M, V), row-major like idx
    cand = draw(z, ctx, idx[0])  # (M,)
    temperature = knob(ctx, "temperature", idx[0])
    temperature = torch.where(temperature == 0, 1.0, temperature) if torch.is_tensor(temperature) else temperature or 1.0
    probs = sampling_probs(z, temperature, knob(ctx, "top_p", idx[0]), ctx.cfg.top_p_rule)
    conf = torch.full(ctx.x.shape, float("-inf"), device=ctx.x.device)
    conf[idx] = score(probs, cand).float()
    cand_full = torch.full_like(ctx.x, ctx.mask_id)
    cand_full[idx] = cand
    return cand_full, conf


def _confidence_rule(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Dream/LLaDA-style: sample a candidate everywhere, reveal the most confident masked positions of each row
    (how many: :func:`reveal_counts`)."""

    def rule(ctx: StepContext) -> torch.Tensor:
        if not bool(ctx.active.any()):
            return ctx.x.clone()
        cand, conf = _candidates(ctx, score)
        n = reveal_counts(ctx.active, ctx.t, ctx.s, ctx.last, ctx.cfg.transfer_rule)  # (N,)
        order = conf.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order).contiguous())
        reveal = (rank < n.unsqueeze(1)) & ctx.active
        return torch.where(reveal, cand, ctx.x)

    return rule


def threshold(ctx: StepContext) -> torch.Tensor:
    """Confidence-aware parallel decoding (Fast-dLLM): reveal every active position whose candidate has probability
    >= ``cfg.threshold`` under the sampling copy (the top probability when greedy), and in each row with an active
    position at least the most confident one (the first on ties, as ``confidence``); the block's last allowed step
    reveals all that is left. The grid times are not read: a block ends when it is complete."""
    if not bool(ctx.active.any()):
        return ctx.x.clone()
    cand, conf = _candidates(ctx, _top1)
    reveal = ctx.active if ctx.last else ctx.active & (conf >= knob(ctx, "threshold"))  # (N, L)
    best = torch.zeros_like(reveal).scatter_(1, conf.argmax(1, keepdim=True), True)  # (N, L): each row's first max
    return torch.where((reveal | best) & ctx.active, cand, ctx.x)


def _top1(probs, cand):
    return probs.gather(-1, cand.unsqueeze(-1)).squeeze(-1)


def _margin(probs, cand):
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _neg_entropy(probs, cand):
    return (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)


UPDATE_RULES: dict[str, Callable[[StepContext], torch.Tensor]] = {
    "ancestral": ancestral,
    "remdm_cap": remdm_cap,
    "remdm_loop": remdm_loop,
    "confidence": _confidence_rule(_top1),
    "margin": _confidence_rule(_margin),
    "entropy": _confidence_rule(_neg_entropy),
    "threshold": threshold,
}
check_registry("sampler update rules", ALGORITHMS, UPDATE_RULES)
