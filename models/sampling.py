"""Samplers for masked diffusion LMs, every one with soft-masking on or off.

    out = sample(model, SamplerConfig(steps=64, algorithm="ancestral"), num_samples=4, length=128, seed=0)

At most one forward pass per denoising step. With ``soft_mask`` the previous step's *unfiltered* prediction is fed
back through the model's SM head, so SM adds no forward pass. As the paper's code: the time grid runs from 1 to
``t_eps`` (1e-5), then the positions still masked get one noise-removal forward (with SM feedback) and its argmax; a
step whose update changed no token lets the next step reuse its prediction without a forward (``cache_unchanged``),
and ``out.nfe`` counts the forwards that ran. Prompt / fixed positions are never changed; no [MASK] remains at the end.

The output layer runs only where a prediction is read (``MaskedLogits``): the still-masked positions with soft-masking
(their feedback), the current block's masked positions without it. Decoded and prompt positions cost the backbone only.

Fast decoding: ``algorithm="threshold"`` reveals every confident position per step (a block ends when complete), and
``cache`` "prefix" / "dual" runs each block's later steps on the block (+ suffix) only through the approximate
key/value cache of ``models.kv_cache``; ``out.positions`` counts the positions the backbone computed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from models.diffusion_lm import MaskedLogits
from models.kv_cache import check_cacheable, lookback, predict_window, window
from models.names import (ALGORITHMS, CACHE_MODES, SAMPLER_PRESETS, TOP_P_RULES, TRANSFER_RULES,
                          TRANSPARENCY as TRANSPARENCY_NAMES, check_registry)
from models.sampling_rules import PER_ROW, UPDATE_RULES, StepContext
from models.softmask import FeedbackStats

EOS_POLICIES = ("none", "pad_after_eos")

# Transparency scheduling (the paper's Dream ablation): ω_s of the SM head is scaled by a function of frac, the
# fraction of a sample's generated positions still masked before a step (1 at the first step, -> 0 at the last).
TRANSPARENCY: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "none": None,                                   # ω_s as learned
    "linear": lambda frac: frac,                    # ω_s · frac
    "stepwise": lambda frac: (frac > 0.5).float(),  # ω_s while more than half is masked, then 0 (binary)
}
check_registry("transparency schedules", TRANSPARENCY_NAMES, TRANSPARENCY)


@dataclass
class SamplerConfig:
    steps: int = field(default=128, metadata={"doc": "denoising steps (NFE budget) over the whole sequence; each of "
                                                     "the blocks gets steps // blocks. threshold: a per-block cap (a "
                                                     "block ends when complete, its last allowed step reveals all "
                                                     "that is left)"})
    algorithm: str = field(default="ancestral", metadata={"doc": f"update rule: one of {ALGORITHMS}"})
    soft_mask: bool = field(default=True, metadata={"doc": "feed the previous prediction back through the SM head"})
    temperature: float = field(default=1.0, metadata={"doc": "softmax temperature of the sampling copy (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"doc": "nucleus mass kept on the sampling copy (1 = off)"})
    top_p_rule: str = field(default="mdlm", metadata={"doc": f"nucleus boundary, one of {TOP_P_RULES}: mdlm keeps "
                                                             "tokens while the cumulative probability <= top_p "
                                                             "(always the first; the paper's code), dream also keeps "
                                                             "the token that crosses it"})
    t_eps: float = field(default=1e-5, metadata={"doc": "the time grid runs from 1 to t_eps (the paper's 1e-5, Dream's "
                                                        "1e-3); what is still masked then gets the noise-removal "
                                                        "forward and its argmax"})
    transfer_rule: str = field(default="round", metadata={"doc": f"confidence rules, one of {TRANSFER_RULES}: round "
                                                                 "reveals round(#masked · (1 − s/t)) per sample (at "
                                                                 "least 1); dream floor(batch mean · (1 − s/t)) as "
                                                                 "Dream's sampler"})
    block_length: int | None = field(default=None, metadata={"doc": "semi-autoregressive block size (None = one block)"})
    threshold: float = field(default=0.9, metadata={"doc": "algorithm threshold: each step reveals every masked "
                                                           "position of the block whose drawn token has probability "
                                                           ">= threshold (at least the most confident one); 1 = one "
                                                           "per step"})
    cache: str = field(default="none", metadata={"doc": f"key/value cache of block decoding, one of {CACHE_MODES} "
                                                        "(models.kv_cache): refreshed by a full forward at each "
                                                        "block's first step; later steps recompute the block and "
                                                        "everything after it (prefix) or the block only (dual). "
                                                        "Approximate; our Backbone / DiTBackbone without time "
                                                        "conditioning, HF Llama / Qwen2 decoders"})
    eta: float | None = field(default=None, metadata={"doc": "ReMDM remasking η (None = the paper's value: 0.04 for "
                                                              "remdm_cap, 0.02 for remdm_loop)"})
    loop_t_on: float = field(default=0.55, metadata={"doc": "remdm_loop: time the loop phase starts (grid 1 -> 0)"})
    loop_t_off: float = field(default=0.05, metadata={"doc": "remdm_loop: time the loop phase ends"})
    loop_alpha_on: float = field(default=0.9, metadata={"doc": "remdm_loop: share of tokens decoded during the loop"})
    eos_id: int | None = field(default=None, metadata={"doc": "EOS id used by eos_policy"})
    eos_policy: str = field(default="none", metadata={"doc": "none | pad_after_eos (everything after the first "
                                                             "generated EOS becomes EOS)"})
    cache_unchanged: bool = field(default=True, metadata={"doc": "reuse the last prediction when a step changed no "
                                                                 "token, without a forward (the paper's code; models "
                                                                 "without time conditioning); NFE counts forwards run"})
    transparency: str = field(default="none", metadata={"doc": "SM transparency scheduling: none | linear (ω_s · "
                                                           "masked fraction) | stepwise (ω_s while over half is "
                                                           "masked, then 0); soft-masking models only"})

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.algorithm not in UPDATE_RULES:
            problems.append(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p_rule not in TOP_P_RULES:
            problems.append(f"top_p_rule must be one of {TOP_P_RULES}, got {self.top_p_rule!r}")
        if self.transfer_rule not in TRANSFER_RULES:
            problems.append(f"transfer_rule must be one of {TRANSFER_RULES}, got {self.transfer_rule!r}")
        if not 0 <= self.t_eps < 1:
            problems.append(f"t_eps must be in [0, 1), got {self.t_eps}")
        if not 0 < self.threshold <= 1:
            problems.append(f"threshold must be in (0, 1], got {self.threshold}")
        if self.cache not in CACHE_MODES:
            problems.append(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.block_length is not None and self.block_length < 1:
            problems.append(f"block_length must be >= 1, got {self.block_length}")
        if self.eos_policy not in EOS_POLICIES:
            problems.append(f"eos_policy must be one of {EOS_POLICIES}, got {self.eos_policy!r}")
        if self.eta is not None and not 0 <= self.eta <= 1:
            problems.append(f"eta must be in [0, 1], got {self.eta}")
        if not 0 < self.loop_t_off < self.loop_t_on < 1:
            problems.append(f"remdm_loop needs 0 < loop_t_off < loop_t_on < 1, got {self.loop_t_off}, {self.loop_t_on}")
        if not 0 < self.loop_alpha_on < 1:
            problems.append(f"loop_alpha_on must be in (0, 1), got {self.loop_alpha_on}")
        elif self.algorithm == "remdm_loop" and self.remdm_eta(0.02) > (1 - self.loop_alpha_on) / self.loop_alpha_on:
            problems.append(f"remdm_loop needs eta <= (1 - loop_alpha_on) / loop_alpha_on = "
                            f"{(1 - self.loop_alpha_on) / self.loop_alpha_on:.4g} (a reveal probability <= 1)")
        if self.transparency not in TRANSPARENCY:
            problems.append(f"transparency must be one of {tuple(TRANSPARENCY)}, got {self.transparency!r}")
        if self.eos_policy != "none" and self.eos_id is None:
            problems.append("eos_policy pad_after_eos needs eos_id")
        if problems:
            raise ValueError("invalid SamplerConfig: " + "; ".join(problems))

    def remdm_eta(self, paper_default: float) -> float:
        """η of a ReMDM rule: the configured one, else the paper's value for that rule."""
        return paper_default if self.eta is None else self.eta

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplerConfig":
        """The settings of :data:`PRESETS` ``name``, then ``overrides`` (e.g. steps, soft_mask)."""
        if name not in PRESETS:
            raise ValueError(f"unknown sampler preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The papers' sampler settings by task. mdlm_lm: the SM paper's language-model evaluation (ancestral steps on the
# grid 1 -> 1e-5, nucleus 0.9 with its boundary rule, then the noise-removal forward). dream_code: Dream's sampler as
# the SM paper's code evaluation runs it (entropy-ordered unmasking, temperature 0.1, top-p 0.9 keeping the crossing
# token, Dream's transfer count int(masked * (1 - s/t)) with everything left on the last step, grid 1 -> 1e-3).
PRESETS: dict[str, dict] = {
    "mdlm_lm": dict(algorithm="ancestral", top_p=0.9, top_p_rule="mdlm", temperature=1.0, t_eps=1e-5,
                    transfer_rule="round"),
    "dream_code": dict(algorithm="entropy", top_p=0.9, top_p_rule="dream", temperature=0.1, t_eps=1e-3,
                       transfer_rule="dream"),
}
check_registry("sampler presets", SAMPLER_PRESETS, PRESETS)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (N, L) long
    nfe: int              # forwards that ran
    trajectory: list[torch.Tensor] | None = None  # per step (N, L), when requested
    lambda_mean: float | None = None  # mean λ over every position soft-masking fed (None: no SM feedback ran)
    gate_open: float | None = None    # share of those positions whose SM gate was open (>= 0.5)
    positions: int = 0  # sequence positions the backbone computed, summed over rows and forwards


def _initial_state(num_samples, length, mask_id, prompt_ids, fixed_tokens, fixed_mask, device):
    x = torch.full((num_samples, length), mask_id, dtype=torch.long, device=device)
    fixed = torch.zeros((num_samples, length), dtype=torch.bool, device=device)
    if prompt_ids is not None:
        if len(prompt_ids) != num_samples:
            raise ValueError(f"prompt_ids has {len(prompt_ids)} rows, expected num_samples={num_samples}")
        for i, p in enumerate(prompt_ids):
            p = torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1)
            if p.numel() > length:
                raise ValueError(f"prompt {i} has {p.numel()} tokens, longer than length={length}")
            if (p == mask_id).any():
                raise ValueError(f"prompt {i} contains the [MASK] id")
            x[i, :p.numel()] = p
            fixed[i, :p.numel()] = True
    if fixed_tokens is not None:
        fm = fixed_mask.to(device).bool() if fixed_mask is not None else fixed_tokens != mask_id
        x = torch.where(fm, fixed_tokens.to(device), x)
        fixed |= fm
    return x, fixed


def _per_row(cfg: SamplerConfig, per_row: dict | None, num_samples: int, device) -> dict[str, torch.Tensor] | None:
    """Validated per-row settings {name: (N,) float32}; each row's values must make a valid SamplerConfig."""
    if not per_row:
        return None
    unknown = set(per_row) - set(PER_ROW)
    if unknown:
        raise ValueError(f"per_row: {sorted(unknown)} cannot differ between rows (only {PER_ROW} can)")
    for name, values in per_row.items():
        if len(values) != num_samples:
            raise ValueError(f"per_row[{name!r}] has {len(values)} values, expected num_samples={num_samples}")
    for row in set(zip(*per_row.values())):
        dataclasses.replace(cfg, **dict(zip(per_row, row)))  # raises naming the bad value
    return {name: torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
            for name, values in per_row.items()}


def _blocks(length: int, block_length: int | None) -> list[tuple[int, int]]:
    if not block_length or block_length >= length:
        return [(0, length)]
    return [(a, min(a + block_length, length)) for a in range(0, length, block_length)]


def _pad_after_eos(x: torch.Tensor, fixed: torch.Tensor, eos_id: int) -> torch.Tensor:
    gen_eos = (x == eos_id) & ~fixed
    after = torch.cumsum(gen_eos.int(), dim=1) > 0  # at or after the first generated EOS
    return torch.where(after & ~fixed, torch.full_like(x, eos_id), x)


@torch.no_grad()
def sample(model, cfg: SamplerConfig, num_samples: int, length: int, prompt_ids=None, seed: int = 0,
           on_step: Callable[[int, torch.Tensor], None] | None = None, fixed_tokens: torch.Tensor | None = None,
           fixed_mask: torch.Tensor | None = None, return_trajectory: bool = False,
           per_row: dict[str, list[float]] | None = None) -> SampleOutput:
    """Generate ``num_samples`` sequences of ``length`` tokens (prompt included). Same seed => same tokens.
    ``per_row`` {name: one value per sample} overrides ``cfg``'s temperature / top_p / threshold row by row (how Serve
    decodes requests that differ only in them together)."""
    if num_samples < 1 or length < 1:
        raise ValueError("num_samples and length must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mask_id = model.mask_id
    gen = torch.Generator(device=device).manual_seed(int(seed))
    knobs = _per_row(cfg, per_row, num_samples, device)
    x, fixed = _initial_state(num_samples, length, mask_id, prompt_ids, fixed_tokens, fixed_mask, device)
    rule = UPDATE_RULES[cfg.algorithm]
    schedule = TRANSPARENCY[cfg.transparency] if cfg.soft_mask else None
    if schedule is not None and getattr(model, "sc_proj", None) is not None:
        raise ValueError(f"transparency {cfg.transparency!r} scales the SM head's ω_s; this model is self-conditioning")
    back = 0
    if cfg.cache != "none":
        check_cacheable(model)
        back = lookback(model)
    generated = (~fixed).sum(1).clamp(min=1)  # (N,) positions each sample generates

    def feedback(masked: torch.Tensor) -> dict:
        """The forward's SM inputs: the previous prediction, and the transparency factor of each sample."""
        if not cfg.soft_mask:
            return {}
        if schedule is None or prev_logits is None:
            return {"prev_logits": prev_logits}
        return {"prev_logits": prev_logits, "sm_scale": schedule((masked & ~fixed).sum(1) / generated)}  # (N,)

    blocks = _blocks(length, cfg.block_length)
    steps_per_block = max(1, cfg.steps // len(blocks))
    reuse = cfg.cache_unchanged and not model.config.time_conditioning  # same x -> same prediction
    prev_logits, nfe, step_idx, fed, computed, kv = None, 0, 0, None, 0, None
    # (the block's refresh prediction, the window span): a cached step's prediction covers its window only, and what
    # lies outside stays the refresh's; the two are merged when a full forward feeds the whole prediction back
    outside: tuple[MaskedLogits, tuple[int, int]] | None = None
    trajectory = [] if return_trajectory else None
    positions = torch.arange(length, device=device)

    def forward(x: torch.Tensor, t: float, rows: torch.Tensor | None, masked: torch.Tensor,
                span: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (M, V) of ``rows`` (None: the masked positions); with ``span`` through the key/value cache (a
        refresh when it is the whole sequence)."""
        nonlocal nfe, fed, computed, kv, prev_logits, outside
        if outside is not None and span in (None, (0, length)):  # a full forward: feedback reads every position
            prev_logits, outside = outside[0].update(prev_logits, *outside[1]), None
        if span is None:
            t_vec = torch.full((num_samples,), t, device=device)
            z, stats = model(x, t_vec, rows=rows, masked_only=rows is None, with_stats=True, **feedback(masked))
        else:
            refresh = span == (0, length)
            z, stats, kv = predict_window(model, x, rows, span, None if refresh else kv, **feedback(masked))
        nfe += 1
        computed += num_samples * (length if span is None else span[1] - span[0])
        if stats is not None and stats.rows:
            fed = stats if fed is None else fed + stats
        return z

    for a, b in blocks:
        in_block = (positions >= a) & (positions < b)  # (L,)
        ts = torch.linspace(1.0, cfg.t_eps, steps_per_block + 1, dtype=torch.float64)
        cached = None  # a cached prediction may not cover the next block's positions
        for i in range(steps_per_block):
            masked = x == mask_id
            active = masked & in_block & ~fixed
            if not active.any():
                break  # block already complete (e.g. fully prompted)
            t, s = float(ts[i]), float(ts[i + 1])
            span = None if cfg.cache == "none" else (0, length) if i == 0 else window(cfg.cache, (a, b), length, back)
            if cached is not None:
                logits = cached
            else:
                rows = masked if cfg.soft_mask else active  # where this prediction will be read
                if span is not None:  # (B, L): a cached step reads the recomputed positions only
                    rows = rows & (positions >= span[0]) & (positions < span[1])
                logits = MaskedLogits(rows, forward(x, t, rows, masked, span), tokens=x)
                if span not in (None, (0, length)) and outside is None:
                    outside = (prev_logits, span)  # the refresh's prediction, read outside the span
            ctx = StepContext(x=x, logits=logits, t=t, s=s, active=active, decoded=~masked & in_block & ~fixed,
                              mask_id=mask_id, cfg=cfg, generator=gen, last=(i == steps_per_block - 1),
                              per_row=knobs)
            x_new = rule(ctx)
            cached = logits if reuse and bool((x_new == x).all()) else None
            x, prev_logits = x_new, logits
            step_idx += 1
            if trajectory is not None:
                trajectory.append(x.clone())
            if on_step is not None:
                on_step(step_idx, x)
    masked = x == mask_id
    if masked.any():  # noise removal: one forward with the feedback of the last prediction, then argmax
        z = forward(x, cfg.t_eps, None, masked)  # (M, V)
        x = x.masked_scatter(masked, z.argmax(-1))
    if cfg.eos_policy == "pad_after_eos":
        x = _pad_after_eos(x, fixed, cfg.eos_id)
    model.train(was_training)
    means = fed.means() if fed is not None else {"lambda_mean": None, "gate_open": None}
    return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory, positions=computed, **means)
