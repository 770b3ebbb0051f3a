"""The names every layer agrees on, in one torch-free place: configs, the CLI, Serve validation and docs read them.

The implementations register under exactly these names (``models.objective``, ``models.schedule``,
``models.sampling_rules``, ``models.sampling``) and check it when they are imported.
"""
from __future__ import annotations

from typing import Literal

OBJECTIVES = ("binary", "sm", "self_cond")
"""Training objectives: binary MDLM, soft-masking (two-pass), self-conditioning (the reviewers' baseline)."""
Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]  (the same names as a type)

SCHEDULES = ("loglinear", "cosine", "dream")
"""Noise schedules (models.schedule.SCHEDULES)."""
Schedule = Literal[SCHEDULES]  # type: ignore[valid-type]  (the same names as a type)

ALGORITHMS = ("ancestral", "remdm_cap", "remdm_loop", "confidence", "margin", "entropy", "threshold")
"""Sampler update rules (models.sampling_rules.UPDATE_RULES)."""
Algorithm = Literal[ALGORITHMS]  # type: ignore[valid-type]  (the same names as a type)

CACHE_MODES = ("none", "prefix", "dual")
"""Key/value cache of semi-autoregressive sampling (models.kv_cache): none; prefix = each block's later steps recompute
the block and everything after it; dual = the block only (cached prefix and suffix)."""
CacheMode = Literal[CACHE_MODES]  # type: ignore[valid-type]  (the same names as a type)

TRANSPARENCY = ("none", "linear", "stepwise")
"""SM transparency schedules while sampling (models.sampling.TRANSPARENCY)."""
Transparency = Literal[TRANSPARENCY]  # type: ignore[valid-type]  (the same names as a type)

TOP_P_RULES = ("mdlm", "dream")
"""Nucleus boundary: mdlm keeps tokens while the cumulative probability is <= p (always the first), as the paper's
language-model code; dream also keeps the token that crosses p, as Dream's (and Hugging Face's) sampler."""
TopPRule = Literal[TOP_P_RULES]  # type: ignore[valid-type]  (the same names as a type)

TRANSFER_RULES = ("round", "dream")
SAMPLER_PRESETS = ("mdlm_lm", "dream_code")  # models.sampling.PRESETS: the papers' sampler settings by task
"""How many positions a confidence rule reveals per step: round = round(#masked · (1 − s/t)) per sample, at least
one; dream = floor(batch-mean #masked · (1 − s/t)), possibly none, as Dream's sampler (all on the last step in both)."""
TransferRule = Literal[TRANSFER_RULES]  # type: ignore[valid-type]  (the same names as a type)


def check_registry(kind: str, names: tuple[str, ...], registry) -> None:
    """Raise if an implementation registry does not hold exactly the declared names (called at import)."""
    if tuple(registry) != names:
        raise RuntimeError(f"{kind}: registry {tuple(registry)} differs from models.names {names}")
