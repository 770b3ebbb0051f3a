"""Diversity of samples: unigram entropy of token ids (per sample, averaged) and distinct-n."""
from __future__ import annotations

import math
from collections import Counter

import torch


def unigram_entropy(tokens: torch.Tensor | list[list[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's token-id unigram distribution.

    Low values flag degenerate, repetitive samples (e.g. the same word repeated); fluent English at 128 tokens sits
    near 4-4.5 nats.
    """
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    if not rows:
        raise ValueError("unigram_entropy: no samples")
    ents = []
    for row in rows:
        if not row:
            continue
        counts = Counter(row)
        n = len(row)
        ents.append(-sum(c / n * math.log(c / n) for c in counts.values()))
    return sum(ents) / len(ents) if ents else 0.0


def distinct_n(tokens: torch.Tensor | list[list[int]], n: int = 2) -> float:
    """Unique n-grams / all n-grams over all samples."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
