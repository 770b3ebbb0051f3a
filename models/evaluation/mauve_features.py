"""MAUVE on the evaluator LM's features: the last layer's hidden state at each text's last token.

    feats = last_token_features(evaluator, texts, max_tokens=128)      # (N, d) float32 numpy
    res = mauve_score(p_feats, q_feats, num_buckets=8, seed=25)         # res.mauve in (0, 1]

Causal-LM last-token features see word order (sentence-embedding features barely do: tests/test_evaluate.py checks
that real-vs-shuffled text scores far below real-vs-real with these features). MAUVE depends on sample size and on the quantisation, so the bucket count and
the seed are fixed by the caller and returned with the score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@torch.no_grad()
def last_token_features(evaluator, texts: list[str], max_tokens: int = 128, batch_size: int = 8) -> np.ndarray:
    """(N, hidden) features: final-layer hidden state at the last of the first ``max_tokens`` tokens of each text."""
    if not texts:
        raise ValueError("last_token_features: no texts")
    tok, model = evaluator.tokenizer, evaluator.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][: max_tokens - (prefix is not None)]
        rows.append(([prefix] if prefix is not None else []) + ids)
    if any(len(r) == 0 for r in rows):
        raise ValueError("last_token_features: a text has no tokens")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = evaluator.device
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(rows[i]) for i in idx)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(rows[i])] = torch.tensor(rows[i])
            att[r, :len(rows[i])] = 1
        hs = model(input_ids=x.to(device), attention_mask=att.to(device), output_hidden_states=True).hidden_states[-1]
        last = att.sum(1) - 1  # (B,) index of each row's last real token
        feats = hs[torch.arange(len(idx)), last.to(device)].float().cpu().numpy()  # (B, hidden)
        for r, i in enumerate(idx):
            out[i] = feats[r]
    return out


@dataclass
class MauveResult:
    mauve: float
    num_buckets: int
    seed: int
    n_p: int
    n_q: int


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, num_buckets: int = 8, seed: int = 25,
                mauve_scaling_factor: float = 5.0) -> MauveResult:
    """MAUVE(p, q) with mauve-text on precomputed features (fixed bucket count and seed)."""
    import mauve

    p, q = np.asarray(p_features, dtype=np.float32), np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"mauve_score: features must be (N, d) with equal d, got {p.shape} and {q.shape}")
    if min(len(p), len(q)) < num_buckets:
        raise ValueError(f"mauve_score: {len(p)} / {len(q)} samples are fewer than num_buckets={num_buckets}")
    out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                              mauve_scaling_factor=mauve_scaling_factor, verbose=False)
    return MauveResult(mauve=float(out.mauve), num_buckets=num_buckets, seed=seed, n_p=len(p), n_q=len(q))
