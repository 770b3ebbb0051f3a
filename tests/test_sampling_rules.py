"""The samplers' per-step update rules on hand-made logits (models.sampling_rules, one StepContext per step).

Probabilities are checked statistically on many positions with a fixed seed: a count k of n Bernoulli(p) draws must
lie within 5 binomial standard deviations sqrt(n·p·(1 − p)) of n·p (a false alarm has probability < 1e-6; the
mutations these tests are meant to catch move the count by 10 or more standard deviations).
"""
from __future__ import annotations

import math

import pytest
import torch

from models.diffusion_lm import NEG_INF, MaskedLogits
from models.sampling import SamplerConfig
from models.sampling_rules import UPDATE_RULES, StepContext

V = 16          # vocabulary incl. [MASK]
MASK = V - 1    # its logit is suppressed (SUBS), as the model's output does
DECODED = 3     # the token of positions decoded before the step
PEAK = 5        # the only token the ancestral/ReMDM logits allow


def context(x: torch.Tensor, z: torch.Tensor, t: float, s: float, cfg: SamplerConfig, *, outside=None, seed=0,
            last=False) -> StepContext:
    """The StepContext the sampler builds for tokens x (N, L) and dense logits z (N, L, V); ``outside`` (N, L) marks
    positions the step may not touch (fixed, or in a later block)."""
    outside = torch.zeros_like(x, dtype=torch.bool) if outside is None else outside
    masked = x == MASK
    return StepContext(x=x, logits=MaskedLogits(masked, z[masked]), t=t, s=s, active=masked & ~outside,
                       decoded=~masked & ~outside, mask_id=MASK, cfg=cfg,
                       generator=torch.Generator().manual_seed(seed), last=last)


def peaked_logits(shape: tuple[int, int]) -> torch.Tensor:
    """Logits (N, L, V) that put all mass on PEAK: any revealed position must read PEAK."""
    z = torch.full((*shape, V), NEG_INF)
    z[..., PEAK] = 0.0
    return z


def half_decoded(n: int = 200, length: int = 50) -> torch.Tensor:
    """(n, length) tokens: the first half decoded (DECODED), the second half [MASK]."""
    x = torch.full((n, length), MASK)
    x[:, :length // 2] = DECODED
    return x


def assert_binomial(k: int, n: int, p: float, what: str) -> None:
    std = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= 5 * std + 1e-9, f"{what}: {k} of {n}, expected {n * p:.1f} ± {5 * std:.1f} (p={p:.4f})"


def rates(ctx: StepContext, x_new: torch.Tensor) -> tuple[int, int, int, int]:
    """(revealed, masked before, remasked, decoded before); every revealed position must read PEAK."""
    was_masked = ctx.x == MASK
    revealed = was_masked & (x_new != MASK)
    remasked = ~was_masked & (x_new == MASK)
    assert (x_new[revealed] == PEAK).all(), "a revealed position did not take the predicted token"
    kept = ~was_masked & ~remasked
    assert torch.equal(x_new[kept], ctx.x[kept]), "a decoded token changed without being remasked"
    return int(revealed.sum()), int(was_masked.sum()), int(remasked.sum()), int((~was_masked).sum())


# ----------------------------------------------------------------------------------------------- ancestral
@pytest.mark.parametrize("t, s", [(1.0, 0.9), (0.5, 0.25), (0.8, 0.6), (0.3, 0.29)])
def test_ancestral_reveals_each_masked_token_with_probability_t_minus_s_over_t(t, s):
    x = half_decoded()
    ctx = context(x, peaked_logits(x.shape), t, s, SamplerConfig(algorithm="ancestral"), seed=1)
    revealed, masked, remasked, _ = rates(ctx, UPDATE_RULES["ancestral"](ctx))
    assert remasked == 0  # MDLM never remasks
    assert_binomial(revealed, masked, (t - s) / t, f"ancestral t={t} s={s}")


def test_ancestral_step_to_zero_reveals_everything_but_positions_outside_the_step():
    x = half_decoded(4, 10)
    outside = torch.zeros_like(x, dtype=torch.bool)
    outside[:, -1] = True  # a masked position of a later block
    ctx = context(x, peaked_logits(x.shape), 0.1, 0.0, SamplerConfig(), outside=outside, last=True)
    x_new = UPDATE_RULES["ancestral"](ctx)
    assert (x_new[:, 5:-1] == PEAK).all() and (x_new[:, -1] == MASK).all() and (x_new[:, :5] == DECODED).all()


def test_ancestral_last_step_is_not_forced():
    """The grid ends at t_eps > 0: the last step still reveals with (t − s)/t; what stays masked is left to the
    sampler's noise-removal forward, not unmasked by the rule."""
    x = half_decoded()
    ctx = context(x, peaked_logits(x.shape), 0.1, 1e-3 * 40, SamplerConfig(), seed=3, last=True)
    revealed, masked, remasked, _ = rates(ctx, UPDATE_RULES["ancestral"](ctx))
    assert remasked == 0 and revealed < masked
    assert_binomial(revealed, masked, 0.6, "ancestral last step")


# ----------------------------------------------------------------------------------------------- ReMDM
def remdm_case(algorithm: str, t: float, s: float, eta: float | None, seed: int = 2, **over):
    x = half_decoded()
    cfg = SamplerConfig(algorithm=algorithm, eta=eta, **over)
    ctx = context(x, peaked_logits(x.shape), t, s, cfg, seed=seed)
    return rates(ctx, UPDATE_RULES[algorithm](ctx))


@pytest.mark.parametrize("t, s, eta, sigma", [
    (0.5, 0.4, 0.3, 0.3),      # (1 − α_s)/α_t = 0.8 > η: σ = η
    (0.2, 0.1, 0.3, 0.125),    # (1 − α_s)/α_t = 0.1/0.8 < η: the cap binds
    (0.5, 0.4, None, 0.04),    # the paper's η for remdm_cap
    (0.02, 0.01, None, 0.01 / 0.98),
])
def test_remdm_cap_remasks_with_sigma_min_eta_and_reveals_by_the_posterior(t, s, eta, sigma):
    """σ_t = min(η, (1 − α_s)/α_t) with α = 1 − t: decoded tokens go back to [MASK] with probability σ, masked ones are
    revealed with probability (α_s − (1 − σ)·α_t)/(1 − α_t)."""
    a_t, a_s = 1 - t, 1 - s
    revealed, masked, remasked, decoded = remdm_case("remdm_cap", t, s, eta)
    assert_binomial(remasked, decoded, sigma, f"remdm_cap remasking t={t} s={s} eta={eta}")
    assert_binomial(revealed, masked, min(1.0, (a_s - (1 - sigma) * a_t) / (1 - a_t)), "remdm_cap reveal")


# ----------------------------------------------------------------------------------------------- ReMDM-loop
# Defaults: t_on = 0.55, t_off = 0.05, α_on = 0.9 (so the first phase's move chance is 1 − (1 − t)·2 and the last
# phase's is 2t).
@pytest.mark.parametrize("phase, t, s, p_reveal", [
    ("first", 0.8, 0.7, (0.6 - 0.4) / 0.6),       # MDLM steps from α = 0 to α_on
    ("first, crossing t_on", 0.6, 0.5, (0.2 - 0.1) / 0.2),  # the step stops at t_on (move chance 1 − α_on)
    ("last", 0.04, 0.02, (0.08 - 0.04) / 0.08),   # MDLM steps from α_on to 1
])
def test_remdm_loop_outside_the_loop_reveals_like_mdlm_and_never_remasks(phase, t, s, p_reveal):
    revealed, masked, remasked, _ = remdm_case("remdm_loop", t, s, None)
    assert remasked == 0, phase
    assert_binomial(revealed, masked, p_reveal, f"remdm_loop {phase} phase")


@pytest.mark.parametrize("eta", [None, 0.1])
def test_remdm_loop_inside_the_loop_holds_alpha_and_remasks_with_eta(eta):
    """t in (t_off, t_on]: α_t = α_s = α_on, σ = η: remask σ, reveal σ·α_on/(1 − α_on), so the masked share holds."""
    sigma = 0.02 if eta is None else eta
    for t, s in ((0.5, 0.49), (0.3, 0.2), (0.06, 0.05)):
        revealed, masked, remasked, decoded = remdm_case("remdm_loop", t, s, eta)
        assert_binomial(remasked, decoded, sigma, f"remdm_loop remasking t={t} eta={eta}")
        assert_binomial(revealed, masked, sigma * 0.9 / 0.1, f"remdm_loop reveal t={t} eta={eta}")


def test_remdm_loop_last_step_inside_the_loop_is_a_loop_step():
    """On a coarse grid the last step may fall inside the loop: it still holds α_on and remasks with η (the sampler's
    noise-removal forward finishes the sequence), it does not reveal everything."""
    x = half_decoded()
    ctx = context(x, peaked_logits(x.shape), 0.3, 0.2, SamplerConfig(algorithm="remdm_loop"), seed=2, last=True)
    revealed, masked, remasked, decoded = rates(ctx, UPDATE_RULES["remdm_loop"](ctx))
    assert_binomial(remasked, decoded, 0.02, "remdm_loop last-step remasking")
    assert_binomial(revealed, masked, 0.02 * 0.9 / 0.1, "remdm_loop last-step reveal")


# ----------------------------------------------------------------------------------------------- confidence orders
# Six masked positions with hand-chosen distributions over the 15 real tokens. Their orders differ per score:
#   position  distribution             top-1   margin   entropy (nats)
#   0         [.5, .5]                 .50      0        .693
#   1         [.55, .045 x 10]         .55      .505     1.724
#   2         [.9, .1]                 .90      .80      .325
#   3         [.35, .35, .3]           .35      0        1.096
#   4         [.45, .05 x 11]          .45      .40      2.007
#   5         [.48, .42, .1]           .48      .06      .947
DISTRIBUTIONS = [[.5, .5], [.55] + [.045] * 10, [.9, .1], [.35, .35, .3], [.45] + [.05] * 11, [.48, .42, .1]]
MOST_CONFIDENT_3 = {"confidence": {2, 1, 0}, "margin": {2, 1, 4}, "entropy": {2, 0, 5}}


def confidence_logits(order: list[int]) -> torch.Tensor:
    """Logits (1, 6, V): position j carries DISTRIBUTIONS[order[j]], its most likely token being order[j] + 1."""
    z = torch.full((1, len(order), V), NEG_INF)
    for j, d in enumerate(order):
        p = torch.tensor(DISTRIBUTIONS[d] + [0.0] * (V - 1 - len(DISTRIBUTIONS[d])))
        p = torch.roll(p, d + 1)  # a distinct argmax token per distribution
        z[0, j, :V - 1] = torch.where(p > 0, p.log(), torch.full_like(p, NEG_INF))
    return z


@pytest.mark.parametrize("algorithm", ["confidence", "margin", "entropy"])
def test_confidence_orders_reveal_the_most_confident_positions_first(algorithm):
    """t = 1 -> s = 0.5 reveals round(#active · (1 − s/t)) positions per row, the highest-scoring ones, each with its
    candidate (greedy: the argmax); a masked position outside the step counts neither as active nor as revealed."""
    orders = [[0, 1, 2, 3, 4, 5], [5, 3, 1, 4, 2, 0]]  # two rows, the same distributions at other positions
    z = torch.cat([confidence_logits(o) for o in orders])  # (2, 6, V)
    x = torch.full((2, 6), MASK)
    outside = torch.zeros_like(x, dtype=torch.bool)
    outside[1, 4] = True  # row 1: the most confident distribution (2) sits outside the step: 5 active, 2 revealed
    cfg = SamplerConfig(algorithm=algorithm, temperature=0.0)
    x_new = UPDATE_RULES[algorithm](context(x, z, 1.0, 0.5, cfg, outside=outside))
    want0 = MOST_CONFIDENT_3[algorithm]
    got0 = {orders[0][j] for j in range(6) if x_new[0, j] != MASK}
    assert got0 == want0, (algorithm, got0)
    # row 1 without distribution 2: round(5 · 0.5) = 2 reveals (round half to even), the best two of the rest
    got1 = {orders[1][j] for j in range(6) if x_new[1, j] != MASK}
    assert got1 == want0 - {2} and x_new[1, 4] == MASK, (algorithm, got1)
    revealed = x_new != MASK
    assert torch.equal(x_new[revealed], z.argmax(-1)[revealed])


@pytest.mark.parametrize("algorithm", ["confidence", "margin", "entropy"])
def test_confidence_orders_last_step_reveals_every_active_position(algorithm):
    z = confidence_logits([0, 1, 2, 3, 4, 5])
    x = torch.full((1, 6), MASK)
    x_new = UPDATE_RULES[algorithm](context(x, z, 0.2, 0.0, SamplerConfig(algorithm=algorithm, temperature=0.0),
                                            last=True))
    assert (x_new != MASK).all()


# ----------------------------------------------------------------------------------------------- threshold
@pytest.mark.parametrize("threshold, want0, want1", [
    (0.47, {0, 1, 2, 5}, {0, 1, 5}),  # top probabilities .5, .55, .9, .48 reach it (row 1: 2 is outside the step)
    (0.6, {2}, {1}),                  # only .9 reaches it; row 1: none does -> its most confident (.55) alone
    (0.95, {2}, {1}),                 # none reaches it: the most confident position of each row
])
def test_threshold_reveals_every_position_at_or_over_the_threshold_and_at_least_one(threshold, want0, want1):
    orders = [[0, 1, 2, 3, 4, 5], [5, 3, 1, 4, 2, 0]]
    z = torch.cat([confidence_logits(o) for o in orders])  # (2, 6, V)
    x = torch.full((2, 6), MASK)
    outside = torch.zeros_like(x, dtype=torch.bool)
    outside[1, 4] = True
    cfg = SamplerConfig(algorithm="threshold", threshold=threshold, temperature=0.0)
    x_new = UPDATE_RULES["threshold"](context(x, z, 1.0, 0.99, cfg, outside=outside))
    assert {orders[0][j] for j in range(6) if x_new[0, j] != MASK} == want0
    assert {orders[1][j] for j in range(6) if x_new[1, j] != MASK} == want1 and x_new[1, 4] == MASK
    revealed = x_new != MASK
    assert torch.equal(x_new[revealed], z.argmax(-1)[revealed])  # greedy: each position's top token
    # the block's last allowed step reveals every active position; a row without one is left as it is
    done = x.clone()
    done[1] = DECODED
    last = UPDATE_RULES["threshold"](context(done, z, 0.2, 0.0, cfg, outside=outside, last=True))
    assert not (last[0] == MASK).any() and torch.equal(last[1], done[1])
