"""Bidirectional transformer backbone (DiT-style, no causal mask) with rotary positions and SDPA.

Input is either token ids (B, L) or a soft-mask input ``(ids (B, L, K), weights (B, L, K))`` embedded sparsely as
Σ_k weights·E[ids] with ``embedding_bag`` (K rows gathered per position, never a dense (B, L, V) matmul).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import ModelConfig

TokenInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


Gather = Callable[[list[nn.Parameter]], ContextManager]


def no_gather(params: list[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Modules children-first, as ``nn.Module.apply`` visits them."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def sparse_embed(weight: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w[..., k] · weight[ids[..., k]]  for ids/w of shape (B, L, K) -> (B, L, d)."""
    B, L, K = ids.shape
    if weight.dtype in (torch.bfloat16, torch.float16):
        # embedding_bag has no CUDA backward for per-sample weights in bf16/fp16: gather K rows, weighted sum
        return (F.embedding(ids, weight) * w.unsqueeze(-1).to(weight.dtype)).sum(dim=-2)  # (B, L, K, d) -> (B, L, d)
    out = F.embedding_bag(ids.reshape(B * L, K), weight, per_sample_weights=w.reshape(B * L, K).to(weight.dtype),
                          mode="sum")  # (B*L, d)
    return out.view(B, L, -1)


def rotary_tables(seq_len: int, head_dim: int, base: float, device, dtype=torch.float32):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, L, hd); rotate interleaved pairs (x1, x2) by the angles of cos, sin (L, hd/2)
    if x.dtype == torch.float32 and not torch.compiler.is_compiling():
        # the same products as below as one complex multiply (one kernel instead of six; equal up to fp32 rounding,
        # bit-identical on CPU at the vectorised sizes); compiled blocks keep the real form, which inductor fuses
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (B, nh, L, hd/2) complex
        return torch.view_as_real(pairs * torch.complex(cos.float(), sin.float())).flatten(-2)
    x1, x2 = x[..., ::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, L, hd/2, 2)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)  # interleaved pairs

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hd)
        y = self.attend(self.rotate(q, cos, sin), self.rotate(k, cos, sin), v)  # (B, nh, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.ln1(x), cos, sin))
        return x + self.drop(self.mlp(self.ln2(x)))


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t in [0, 1] followed by an MLP (only built with time_conditioning)."""

    def __init__(self, d_model: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (B,) -> (B, 1, d)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1)).unsqueeze(1)


class Backbone(nn.Module):
    """g_θ: tokens or soft-mask input -> logits (B, L, V). Untied input/output embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.time_embed = TimeEmbedding(cfg.d_model) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_parameters()

    def init_parameters(self, gather: Gather = no_gather) -> None:
        """N(0, init_std) linears/embeddings, zero biases, GPT-2 scaled residual projections.

        ``gather(params)`` is a context manager that makes ``params`` whole and writable while they are initialised,
        one module at a time (ZeRO-3 builds the model partitioned; the trainer passes DeepSpeed's GatheredParameters).
        Same random stream as ``Module.apply`` order, so the default path is the constructor's exact init.
        """
        for m in _post_order(self):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                with gather([p for p in (m.weight, getattr(m, "bias", None)) if p is not None]):
                    nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                with gather([p]):
                    nn.init.normal_(p, mean=0.0, std=self.config.init_std / math.sqrt(2 * self.config.n_layers))

    def _rotary(self, L: int, device, dtype):
        if self._rope is None or self._rope[0].shape[0] < L or self._rope[0].device != device:
            self._rope = rotary_tables(max(L, self.config.max_seq_len), self.config.head_dim, self.config.rope_base, device)
        cos, sin = self._rope
        return cos[:L].to(dtype), sin[:L].to(dtype)

    def embed_input(self, inputs: TokenInput) -> torch.Tensor:
        if isinstance(inputs, tuple):
            ids, w = inputs
            return sparse_embed(self.embed.weight, ids, w)  # (B, L, d)
        return self.embed(inputs)  # (B, L, d)

    def forward(self, inputs: TokenInput, t: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(inputs, t, extra))  # (B, L, V)

    def hidden(self, inputs: TokenInput, t: torch.Tensor | None = None,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, L, d); lm_head maps them to logits."""
        h = self.embed_input(inputs)  # (B, L, d)
        if extra is not None:
            h = h + extra
        if self.time_embed is not None:
            if t is None:
                raise ValueError("time_conditioning=True needs t")
            h = h + self.time_embed(t.reshape(-1).expand(h.shape[0]) if t.numel() == 1 else t)
        B, L, _ = h.shape
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self._rotary(L, h.device, h.dtype)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.ln_f(h)
