"""MDLM's diffusion transformer (DiT) in pure PyTorch, behind our backbone interface.

The network of the MDLM code (``models/dit.py`` of kuleshov-group/mdlm, also used by DUO and the soft-masking code),
computed with torch SDPA instead of flash-attn. It offers the core backbone's interface (``hidden``/``forward``/
``embed``/``lm_head``/``embed_input``/``blocks``/``init_parameters``), so ``DiffusionLM`` (SUBS, SM head, two-pass
feedback), the loss, the samplers, checkpoints, training and serving take it unchanged:

    h = E[x]  (B, L, d)        ids, or the SM head's sparse (ids, weights) as Σ w·E[ids]; untied input embedding
    c = SiLU(MLP(sin/cos_256(σ)))  (B, c)   σ = −log α_t if time-conditioned, else 0 (MDLM OWT, the SM paper)
    block: shift, scale, gate (x2) = Linear(c)      adaLN, zero-initialised: every block starts as the identity
           h = h + gate_a · Drop(Attn(LN(h)·(1 + scale_a) + shift_a))     rotary (rotate-half), full attention
           h = h + gate_m · Drop(MLP(LN(h)·(1 + scale_m) + shift_m))      GELU(tanh), width mlp_ratio·d
    out:   LN(h)·(1 + scale_f) + shift_f  -> Linear(d, V) with bias (zero-initialised)

LayerNorms have a weight and no bias and normalise in fp32, as MDLM's do. NOTE: with time conditioning off, c is
the same vector for every input, the image of σ = 0 under the learned MLP; its weights are real parameters.
Checkpoints in MDLM's own layout load through ``models.dit_loading`` (its docstring has the key mapping).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import backbone
from models.backbone import Gather, TokenInput, no_gather, rotary_tables, sparse_embed
from models.config import TransformerConfig
from models.diffusion_lm import DiffusionLM
from models.schedule import LogLinear

ATTENTION = ("sdpa", "flash_attn")


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class DiTConfig(TransformerConfig):
    """MDLM's DiT (``"backbone": "dit"`` in a checkpoint's config.json). Validated on construction (ValueError
    naming the field). MDLM's names: hidden_size/hidden_dim = d_model, n_blocks = n_layers, model.length =
    max_seq_len."""

    flavor: str = _f("custom", "name of the flavor this config was built from (informational)")
    vocab_size: int = _f(50258, "token ids, [MASK] included (MDLM OWT: GPT-2's 50257 + [MASK])")
    mask_token_id: int | None = _f(None, "id of [MASK]; None = vocab_size - 1 (MDLM appends it after the tokenizer)")
    d_model: int = _f(768, "hidden width")
    n_layers: int = _f(12, "number of DiT blocks")
    n_heads: int = _f(12, "attention heads (d_model / n_heads must be even: rotary pairs)")
    cond_dim: int = _f(128, "width of the conditioning vector c that drives every adaLN modulation")
    freq_dim: int = _f(256, "sinusoidal features of σ fed to the conditioning MLP (MDLM: 256, fixed)")
    mlp_ratio: int = _f(4, "MLP hidden width = mlp_ratio * d_model")
    max_seq_len: int = _f(1024, "longest sequence accepted (MDLM OWT: 1024)")
    dropout: float = _f(0.1, "dropout on both residual branches of every block (none on attention weights)")
    rope_base: float = _f(10000.0, "rotary position embedding base")
    time_conditioning: bool = _f(False, "condition on σ(t) = −log α_t (log-linear schedule); off = σ is 0 "
                                        "(MDLM OWT and the SM paper)")
    noise_eps: float = _f(1e-3, "ε of the log-linear schedule α_t = 1 − (1 − ε)·t that turns t into σ")
    softmask_k: int | None = _f(3, "top-k tokens mixed into a still-masked position; None = full vocab + "
                                   "learnable temperature")
    softmask_init_scale: float = _f(1e-6, "initial ω_s of the SM head (paper: 1e-6, SM off at init); a checkpoint's "
                                          "learned ω replace it")
    self_conditioning: bool = _f(False, "build the self-conditioning input projection (baseline objective)")
    norm_eps: float = _f(1e-5, "LayerNorm epsilon (MDLM: torch's default 1e-5)")
    vocab_pad_multiple: int = _f(1, "round the embedding / output rows up to a multiple of this many (64 keeps GPU "
                                    "matmuls on their fast kernels); padded ids are never predicted")
    attention: str = _f("sdpa", f"attention kernel, one of {ATTENTION}: sdpa = torch scaled_dot_product_attention "
                                "(every device; on CUDA it picks a flash kernel itself); flash_attn = the flash-attn "
                                "package when installed and the input is fp16/bf16 on CUDA, else sdpa")

    def __post_init__(self) -> None:
        self._validate({"cond_dim": self.cond_dim > 0, "freq_dim": self.freq_dim > 0 and self.freq_dim % 2 == 0,
                        "mlp_ratio": self.mlp_ratio > 0, "noise_eps": 0.0 < self.noise_eps < 1.0,
                        "attention": self.attention in ATTENTION})

    @classmethod
    def from_flavor(cls, name: str, **overrides: Any) -> "DiTConfig":
        if name not in DIT_FLAVORS:
            raise ValueError(f"unknown dit flavor {name!r}; known: {sorted(DIT_FLAVORS)}")
        return cls.from_dict({**DIT_FLAVORS[name], "flavor": name, **overrides})


# test: the golden fixture's size (tests/assets/mdlm_dit); debug: the core debug flavor's dimensions (CPU runs and the
# equal-size speed comparison); small: MDLM's OWT model (kuleshov-group/mdlm-owt, ~169M parameters with GPT-2).
DIT_FLAVORS: dict[str, dict[str, Any]] = {
    "test": dict(vocab_size=40, d_model=16, n_layers=2, n_heads=2, cond_dim=8, max_seq_len=64, dropout=0.0),
    "debug": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, cond_dim=64, max_seq_len=256, dropout=0.0),
    "small": dict(vocab_size=50258, mask_token_id=50257, d_model=768, n_layers=12, n_heads=12, cond_dim=128,
                  max_seq_len=1024, dropout=0.1),
}


# ------------------------------------------------------------------------------------------------------- layers
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x·(1 + scale) + shift in one pass; x (B, L, d), shift/scale (B, 1, d)


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension (GPT-NeoX style, MDLM's); x (B, nh, L, hd), cos/sin (L, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """Full (non-causal) softmax attention (B, nh, L, hd) -> (B, nh, L, hd), scale 1/sqrt(hd)."""
    if kernel == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:  # optional package: torch SDPA computes the same thing
            pass
        else:
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=False)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 (output in the input's dtype)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), None, self.eps).to(x.dtype)


class SigmaEmbedding(nn.Module):
    """σ (B,) -> sinusoidal features (B, freq_dim) -> MLP -> (B, cond_dim) (frequencies 10000^(-i/half), no scaling
    of σ: MDLM's TimestepEmbedder)."""

    def __init__(self, cond_dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]  # (B, half)
        feats = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class Attention(backbone.Attention):
    """The core's attention (packed qkv, no biases) with MDLM's rotary (rotate-half), no dropout on the attention
    weights, and the optional flash-attn kernel."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        self.dropout, self.kernel = 0.0, cfg.attention

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary_half(x, cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v, self.kernel)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1 = LayerNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(d, cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.ada = nn.Linear(cfg.cond_dim, 6 * d)  # adaLN: shift, scale, gate of attention and of the MLP
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).unsqueeze(1).chunk(6, dim=-1)  # (B, 1, d)
        x = torch.addcmul(x, gate_a, self.drop(self.attn(modulate(self.ln1(x), shift_a, scale_a), cos, sin)))
        return torch.addcmul(x, gate_m, self.drop(self.mlp(modulate(self.ln2(x), shift_m, scale_m))))


class DiTBackbone(nn.Module):
    """g_θ: tokens or soft-mask input (+ t) -> logits (B, L, V). Untied input/output embeddings."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.time_embed = SigmaEmbedding(cfg.cond_dim, cfg.freq_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.ada_f = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)  # adaLN of the output: shift, scale
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, gather: Gather = no_gather) -> None:
        """MDLM's initialisation: embedding and linears U(±1/sqrt(fan_in)) (torch's Linear default, kaiming(a=√5) for
        the embedding), every adaLN map and the output layer zero, LayerNorm weights one.

        Bounds come from the module sizes, never from the tensors, so ``gather(params)`` (a context making them whole
        and writable; DeepSpeed's GatheredParameters under ZeRO-3, see models.backbone.Backbone.init_parameters) is all
        a partitioned build needs.
        """
        zero = {id(m) for m in (*(b.ada for b in self.blocks), self.ada_f, self.lm_head)}
        for m in self.modules():
            params = list(m.parameters(recurse=False))
            if not params:
                continue
            with gather(params):
                if id(m) in zero:
                    for p in params:
                        p.zero_()
                elif isinstance(m, LayerNorm):
                    m.weight.fill_(1.0)
                else:  # Linear (weight + bias) and the embedding: fan_in = their input width
                    bound = 1.0 / math.sqrt(m.in_features if isinstance(m, nn.Linear) else m.embedding_dim)
                    for p in params:
                        p.uniform_(-bound, bound)

    def embed_input(self, inputs: TokenInput) -> torch.Tensor:
        if isinstance(inputs, tuple):
            ids, w = inputs
            return sparse_embed(self.embed.weight, ids, w)  # (B, L, d)
        return self.embed(inputs)  # (B, L, d)

    def sigma(self, t: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """σ (B,) of the diffusion times t (scalar or (B,)); zeros without time conditioning."""
        if not self.config.time_conditioning:
            return torch.zeros(batch, device=device)
        if t is None:
            raise ValueError("time_conditioning=True needs t")
        t = t.reshape(-1).float().to(device)
        return LogLinear(self.config.noise_eps).sigma(t.expand(batch) if t.numel() == 1 else t)

    def hidden(self, inputs: TokenInput, t: torch.Tensor | None = None,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        """Modulated final hidden states (B, L, d); lm_head maps them to logits."""
        h = self.embed_input(inputs)  # (B, L, d)
        if extra is not None:
            h = h + extra
        B, L, _ = h.shape
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.config.max_seq_len}")
        c = F.silu(self.time_embed(self.sigma(t, B, h.device)))  # (B, cond_dim)
        cos, sin = rotary_tables(L, self.config.head_dim, self.config.rope_base, h.device, h.dtype)  # (L, hd/2)
        for block in self.blocks:
            h = block(h, cos, sin, c)
        shift, scale = self.ada_f(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, d) each
        return modulate(self.ln_f(h), shift, scale)

    def forward(self, inputs: TokenInput, t: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(inputs, t, extra))  # (B, L, V)


def build(cfg: DiTConfig, partition: Callable[[], ContextManager] | None = None) -> DiffusionLM:
    """DiffusionLM with the DiT backbone (+ SM head). ``partition``: see :class:`models.DiffusionLM` (ZeRO-3 builds
    the backbone partitioned; its weights are then set by ``init_parameters(gather)``)."""
    with (partition or contextlib.nullcontext)():
        backbone = DiTBackbone(cfg)
    return DiffusionLM(cfg, backbone=backbone, partition=partition)
