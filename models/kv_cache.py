"""Block-wise approximate key/value cache for semi-autoregressive sampling on our own backbone.

Attention is bidirectional, so a key/value pair depends on every position's input: no cache is exact once any
input changes. The approximation (as Fast-dLLM's, training-free): at the first step of each block the sampler runs the
full forward and keeps every layer's rotated keys and values (``KVCache``); the block's later steps recompute only a
window of positions and attend to the cached keys/values everywhere else:

    prefix: window = [block start, L)     the prefix before the block is read from the cache
    dual:   window = [block start, block end)   the prefix AND the suffix after the block are read from the cache

What is exact: a step whose inputs equal those of the block's refresh forward (e.g. one step per block) gives the
no-cache prediction, and so does the refresh step itself. What is approximate: within a block, the cached positions
keep the keys/values of the refresh forward, i.e. tokens decoded in the block are not seen by the cached prefix and
suffix (their hidden states are not recomputed), and with soft-masking the soft inputs of cached positions stay frozen
at refresh time (the masked positions after the block are fed the prediction of the refresh forward; with ``dual``
that prediction also feeds them at the next block's refresh).

The forward is re-run layer by layer from the backbone's own modules (``LAYERS``: our ``Backbone`` and the MDLM-style
``DiTBackbone`` without time conditioning — ln1, attn.qkv, attn.rotate, attn.attend, attn.proj, ln2, mlp, adaLN — and
the transformers decoders of ``HF_MODEL_TYPES`` — each decoder layer's own forward, its attention reading and writing
the keys/values through the ``update`` call of transformers' Cache protocol), so the weights and the arithmetic are
those of the backbone's ``hidden``. An HF backbone with Dream's shift predicts token i from position i−1: its window
starts one position early (``lookback``), and the window's first position reads the refresh's output before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.backbone import Backbone, TokenInput, rotary_tables
from models.dit import DiTBackbone, modulate
from models.hf_backbone import HFBackbone
from models.names import CACHE_MODES

# transformers decoders whose layers run on a window (full attention, rotary positions, layer(h, position_embeddings,
# cache) calling cache.update with the rotated keys/values)
HF_MODEL_TYPES = ("llama", "qwen2")


@dataclass
class KVCache:
    """Every layer's keys and values of one full forward, rotary applied: ``keys[i]``, ``values[i]`` (B, nh, L, hd)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    outputs: torch.Tensor | None = None  # a shifted backbone's unshifted final hidden states (B, L, d)


def check_cacheable(model) -> None:
    """Raise ValueError (naming the ``cache`` field) when ``model`` cannot decode with a key/value cache."""
    backbone = getattr(model, "backbone", None)
    if type(backbone) not in LAYERS:
        raise ValueError(f"cache: key/value caching needs the project's Backbone, DiTBackbone or an HF decoder "
                         f"({', '.join(HF_MODEL_TYPES)}), this model has {type(backbone).__name__} (use cache='none')")
    if isinstance(backbone, HFBackbone):
        hf = backbone.lm.config
        if hf.model_type not in HF_MODEL_TYPES or "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            raise ValueError(f"cache: key/value caching of HF backbones needs a full-attention decoder of type "
                             f"{HF_MODEL_TYPES}, this one is {hf.model_type!r} (sliding window layers: "
                             f"{'sliding_attention' in (getattr(hf, 'layer_types', None) or ())}; use cache='none')")
    if model.config.time_conditioning:
        raise ValueError("cache: key/value caching needs a model without time conditioning (its keys/values change "
                         "with t at every step; use cache='none')")


def lookback(model) -> int:
    """Positions a window starts before its block: 1 for a backbone predicting token i from position i−1 (Dream's
    shift), so that the block's first prediction is recomputed too; else 0."""
    return int(bool(getattr(model.backbone, "shift_logits", False)))


def window(mode: str, block: tuple[int, int], length: int, back: int = 0) -> tuple[int, int]:
    """Positions [start, end) a non-refresh step of ``block`` recomputes under cache ``mode`` (``back``: the
    model's :func:`lookback`)."""
    a, b = max(0, block[0] - back), block[1]
    ends = {"none": (0, length), "prefix": (a, length), "dual": (a, b)}
    assert tuple(ends) == CACHE_MODES
    return ends[mode]


def _slice_input(inputs: TokenInput, a: int, e: int) -> TokenInput:
    if isinstance(inputs, tuple):
        return tuple(u[:, a:e] for u in inputs)  # ids, weights (B, w, K)
    return inputs[:, a:e]  # (B, w)


def _splice(k: torch.Tensor, v: torch.Tensor, i: int, start: int, cache: KVCache | None, keys, values):
    """Layer ``i``'s keys/values to attend to, from the window's fresh rotated ones k, v (B, nkv, w, hd): a refresh
    (``cache`` None) appends them to ``keys``/``values``; otherwise they are written over the window's positions of
    the cached ones (B, nkv, L, hd), in place (a copy of the window, not of the sequence)."""
    if cache is None:
        keys.append(k.contiguous())
        values.append(v.contiguous())
        return keys[-1], values[-1]
    ck, cv, w = cache.keys[i], cache.values[i], k.shape[2]
    ck[:, :, start:start + w] = k
    cv[:, :, start:start + w] = v
    return ck, cv


class _HFCacheView:
    """The ``update`` of transformers' Cache protocol, which an HF attention module calls with its rotated
    keys/values and layer index, answered by ``splice(k, v, i)``."""

    def __init__(self, splice):
        self.splice = splice

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.splice(key_states, value_states, layer_idx)


def _attention(attn, x: torch.Tensor, cos, sin, i: int, splice):
    """Attention of the window's normalised inputs x (B, w, d) over layer ``i``'s keys/values from ``splice``."""
    B, w, _ = x.shape
    q, k, v = attn.qkv(x).view(B, w, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, w, hd)
    q, k = attn.rotate(q, cos, sin), attn.rotate(k, cos, sin)
    k, v = splice(k, v, i)  # (B, nh, L or w, hd)
    y = attn.attend(q, k, v)  # (B, nh, w, hd)
    return attn.proj(y.transpose(1, 2).reshape(B, w, -1))  # (B, w, d)


def _own_layers(backbone: Backbone, h, L: int, start: int, splice) -> torch.Tensor:
    """Backbone.hidden's blocks and final norm on the window h (B, w, d)."""
    cos, sin = backbone._rotary(L, h.device, h.dtype)  # (L, hd/2)
    cos, sin = cos[start:start + h.shape[1]], sin[start:start + h.shape[1]]
    for i, block in enumerate(backbone.blocks):
        h = h + _attention(block.attn, block.ln1(h), cos, sin, i, splice)
        h = h + block.mlp(block.ln2(h))
    return backbone.ln_f(h)


def _dit_layers(backbone: DiTBackbone, h, L: int, start: int, splice) -> torch.Tensor:
    """DiTBackbone.hidden's adaLN blocks and modulated final norm on the window h (B, w, d); σ = 0 (no time
    conditioning), so the conditioning is the same at every step."""
    B, w, _ = h.shape
    c = F.silu(backbone.time_embed(backbone.sigma(None, B, h.device)))  # (B, cond_dim)
    cos, sin = rotary_tables(L, backbone.config.head_dim, backbone.config.rope_base, h.device, h.dtype)
    cos, sin = cos[start:start + w], sin[start:start + w]  # (w, hd/2)
    for i, block in enumerate(backbone.blocks):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.ada(c).unsqueeze(1).chunk(6, dim=-1)  # (B, 1, d)
        h = torch.addcmul(h, gate_a, _attention(block.attn, modulate(block.ln1(h), shift_a, scale_a), cos, sin, i,
                                                splice))
        h = torch.addcmul(h, gate_m, block.mlp(modulate(block.ln2(h), shift_m, scale_m)))
    shift, scale = backbone.ada_f(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, d) each
    return modulate(backbone.ln_f(h), shift, scale)


def _hf_layers(backbone: HFBackbone, h, L: int, start: int, splice) -> torch.Tensor:
    """The HF decoder's layers and final norm on the window h (B, w, d) at positions [start, start + w), unshifted:
    each layer's own forward with the decoder's rotary tables at those positions; no mask (bidirectional, every key
    visible; the attention modules' is_causal flags are cleared)."""
    decoder = backbone.lm.get_decoder()
    pos = torch.arange(start, start + h.shape[1], device=h.device)[None]  # (1, w)
    rope = decoder.rotary_emb(h, pos)  # cos, sin (1, w, hd)
    view = _HFCacheView(splice)
    for layer in decoder.layers[:decoder.config.num_hidden_layers]:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope, cache=view, use_cache=True)
    return decoder.norm(h)


# backbone type -> its layers after the input embedding, run on a window of positions (the weights and the
# arithmetic of that backbone's own hidden())
LAYERS = {Backbone: _own_layers, DiTBackbone: _dit_layers, HFBackbone: _hf_layers}


def _max_len(backbone) -> int:
    return backbone.lm.config.max_position_embeddings if isinstance(backbone, HFBackbone) else \
        backbone.config.max_seq_len


def hidden_window(backbone, inputs: TokenInput, start: int, cache: KVCache | None,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    """Final hidden states (B, w, d) of the window of ``inputs`` (B, w[, K]) that starts at position ``start``.

    ``cache`` None: a refresh — ``inputs`` is the whole sequence (start 0); returns its hidden states and the new
    cache. Otherwise the window's queries attend to its own fresh keys/values and to the cached ones outside it;
    returns the same cache, whose window positions now hold this window's keys/values (written in place). Every step
    of a block recomputes the same window and overwrites them again; a caller that runs different windows on one
    refresh gives each its own :func:`copy_cache`."""
    h = backbone.embed_input(inputs)  # (B, w, d)
    if extra is not None:
        h = h + extra
    if cache is None and start != 0:
        raise ValueError("a cache refresh runs the whole sequence (start 0)")
    L = h.shape[1] if cache is None else cache.keys[0].shape[2]
    if L > _max_len(backbone):
        raise ValueError(f"sequence length {L} exceeds max_seq_len {_max_len(backbone)}")
    keys, values = [], []

    def splice(k, v, i):
        return _splice(k, v, i, start, cache, keys, values)

    h = LAYERS[type(backbone)](backbone, h, L, start, splice)
    raw = None
    if getattr(backbone, "shift_logits", False):  # position i reads position i−1's output (position 0 its own)
        raw, before = h, h[:, :1] if start == 0 else cache.outputs[:, start - 1:start]
        h = torch.cat([before, h[:, :-1]], dim=1)  # (B, w, d)
    return h, (KVCache(keys, values, raw) if cache is None else cache)


def copy_cache(cache: KVCache) -> KVCache:
    """An independent copy of ``cache`` (windows write into the one they are given)."""
    return KVCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values],
                   None if cache.outputs is None else cache.outputs.clone())


def predict_window(model, x: torch.Tensor, rows: torch.Tensor, span: tuple[int, int], cache: KVCache | None,
                   prev_logits=None, sm_scale: torch.Tensor | None = None):
    """The sampler's forward on positions ``span`` = [a, e) of x (B, L): logits (M, V) of ``rows`` (B, L) bool (every
    True inside the span), the feedback stats, and the cache (new when ``cache`` is None: then span is [0, L)).

    Feedback (``prev_logits``, a MaskedLogits over the whole sequence) is built for the span's positions only; it is
    the same input :meth:`DiffusionLM.forward` builds there."""
    a, e = span
    if bool(rows[:, :a].any()) or bool(rows[:, e:].any()):
        raise ValueError("predict_window: rows outside the recomputed span")
    xw = x[:, a:e]  # (B, w)
    if prev_logits is None:
        inputs, extra, stats = xw, None, None
    else:
        inputs, extra, stats = model.feedback_input(xw, prev_logits.window(a, e), sm_scale)
    h, cache = hidden_window(model.backbone, inputs, a, cache, extra)  # (B, w, d)
    return model.logits_of(h[rows[:, a:e]]), stats, cache  # (M, V)
