"""Generative perplexity: decoded samples re-tokenised for a causal evaluator LM and scored by it.

    res = generative_perplexity(evaluator, texts, context_length=128, batch_size=8)
    res.ppl        # exp(Σ NLL / Σ scored tokens) over all texts (token-weighted)
    res.per_text   # per-text perplexities

Each text is tokenised by the evaluator's tokenizer, prefixed with its BOS (or EOS) token so that the first word is
scored too, and cut into windows of at most ``context_length`` tokens (each window scored independently; every token
of a text is scored exactly once). Windows are padded on the right and batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class GenPPLResult:
    ppl: float                 # token-weighted perplexity over all texts
    mean_nll: float            # Σ NLL / Σ tokens (nats)
    tokens: int                # scored evaluator tokens
    per_text: list[float] = field(default_factory=list)  # per-text perplexity (nan for empty texts)
    context_length: int = 0


def _prefix_id(tok) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return None


def _windows(ids: list[int], context_length: int, prefix: int | None) -> list[tuple[list[int], int]]:
    """Split one text into (input ids, #leading context tokens that are not scored) windows.

    Window k holds ``[prev token] + chunk`` so that every chunk token is predicted from real context; the first
    window's context token is the BOS/EOS prefix (when the tokenizer has one).
    """
    out = []
    step = context_length - 1
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        ctx = ids[start - 1] if start > 0 else prefix
        if ctx is None:  # no prefix token: the first token of the text is context, not scored
            out.append((chunk, 1))
        else:
            out.append(([ctx] + chunk, 1))
    return [(w, c) for w, c in out if len(w) > c]


@torch.no_grad()
def token_nlls(evaluator, texts: list[str], context_length: int = 128, batch_size: int = 8) -> list[tuple[float, int]]:
    """(Σ NLL in nats, #scored tokens) per text."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    tok, model = evaluator.tokenizer, evaluator.model
    prefix = _prefix_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = []  # (text index, window ids, n context)
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for w, c in _windows(ids, context_length, prefix):
            items.append((i, w, c))
    sums = [[0.0, 0] for _ in texts]
    items.sort(key=lambda it: len(it[1]))  # similar lengths together: less padding
    device = evaluator.device
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        width = max(len(w) for _, w, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        score = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions whose token is scored
        for r, (_, w, c) in enumerate(chunk):
            x[r, :len(w)] = torch.tensor(w)
            att[r, :len(w)] = 1
            score[r, c:len(w)] = True
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits.float()  # (B, W, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:].to(device), reduction="none")  # (B, W-1)
        nll = (nll * score[:, 1:].to(device)).sum(1).cpu()
        for r, (i, _, _) in enumerate(chunk):
            sums[i][0] += float(nll[r])
            sums[i][1] += int(score[r, 1:].sum())
    return [(s, n) for s, n in sums]


def generative_perplexity(evaluator, texts: list[str], context_length: int = 128, batch_size: int = 8) -> GenPPLResult:
    """Perplexity of ``texts`` under the evaluator LM (lower = more fluent to the evaluator)."""
    if not texts:
        raise ValueError("generative_perplexity: no texts")
    per = token_nlls(evaluator, texts, context_length, batch_size)
    total = sum(s for s, _ in per)
    n = sum(k for _, k in per)
    if n == 0:
        raise ValueError("generative_perplexity: the texts hold no evaluator tokens")
    mean = total / n
    return GenPPLResult(ppl=math.exp(mean), mean_nll=mean, tokens=n, context_length=context_length,
                        per_text=[math.exp(s / k) if k else float("nan") for s, k in per])
