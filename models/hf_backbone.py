"""Any ``transformers`` decoder-only causal LM (Qwen2, Llama, ...) as a masked diffusion LM.

    model = HFDiffusionLM(cfg, causal_lm)          # built by models.hf_loading (dir / GGUF / config dict / checkpoint)
    logits = model(x_t, t, two_pass=..., prev_logits=...)   # the DiffusionLM interface, unchanged

``HFDiffusionLM`` *is* a :class:`models.DiffusionLM` (same forward, SUBS, SM head, feedback, pass-1 row gather); only
its backbone differs: :class:`HFBackbone` wraps the causal LM and offers the core backbone's interface
(``hidden``/``forward``/``embed``/``lm_head``/``embed_input``), so the loss, the samplers, the checkpoint format, the
training stage and the Serve deployment work with it unchanged.
- Attention is bidirectional: ``config.is_causal = False`` (transformers 5 builds a bidirectional mask, or none) and
  every attention module's ``is_causal`` flag is cleared (SDPA / flash kernels then run non-causally).
- Input is always ``inputs_embeds``: token ids through the embedding module, the SM head's sparse (ids, weights) form
  as Σ w·E[ids] (``models.backbone.sparse_embed``; k+1 rows gathered per position).
- ``shift_logits`` (Dream's AR→diffusion recipe): the prediction for token i comes from position i−1's output
  (position 0 keeps its own), so an AR checkpoint's next-token head is reused as is.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from models.backbone import sparse_embed
from models.config import ConfigDict
from models.diffusion_lm import DiffusionLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class HFDiffusionConfig(ConfigDict):
    """Config of an HF-backed diffusion LM (``"backbone": "hf"`` in a checkpoint's config.json)."""

    hf_config: dict = _f(None, "transformers config (PretrainedConfig.to_dict()): rebuilds the architecture offline")
    mask_token_id: int = _f(None, "id of [MASK] (the tokenizer's mask token, or a row appended to the embeddings)")
    shift_logits: bool = _f(True, "Dream-style: token i is predicted from position i-1 (checkpoints adapted from AR)")
    softmask_k: int | None = _f(1, "top-k tokens mixed into a still-masked position (paper, code models: 1)")
    softmask_init_scale: float = _f(1e-6, "initial ω_s of the SM head (paper: 1e-6, SM off at init)")
    max_seq_len: int | None = _f(None, "longest sequence trained / served (None: max_position_embeddings)")
    dtype: str = _f("float32", f"parameter dtype when the model is built: one of {sorted(DTYPES)}")
    attn_implementation: str = _f("sdpa", "transformers attention kernel: sdpa | eager | flash_attention_2")
    trust_remote_code: bool = _f(False, "allow the checkpoint's own modelling code (only for unknown model_types)")
    source: str = _f("", "where the weights came from (HF dir / GGUF / 'config'); remote-code models rebuild from it")
    adapters: dict | None = _f(None, "models.adapters.AdapterConfig of unmerged LoRA/DoRA adapters in the checkpoint")
    base_checkpoint: str | None = _f(None, "adapter-only checkpoint: softmask HF checkpoint dir holding the frozen "
                                           "base weights (model.safetensors then holds only adapters + SM head)")
    flavor: str = _f("hf", "informational name (reported by the Serve deployment)")

    def __post_init__(self) -> None:
        if isinstance(self.hf_config, dict):  # JSON-canonical (int dict keys become str), so it compares after I/O
            self.hf_config = json.loads(json.dumps(self.hf_config, sort_keys=True))
        if self.max_seq_len is None and isinstance(self.hf_config, dict):
            self.max_seq_len = int(self.hf_config.get("max_position_embeddings") or 2048)
        checks = {
            "hf_config": isinstance(self.hf_config, dict) and "model_type" in self.hf_config
                         and int(self.hf_config.get("vocab_size") or 0) >= 2,
            "mask_token_id": isinstance(self.mask_token_id, int)
                             and 0 <= self.mask_token_id < int((self.hf_config or {}).get("vocab_size") or 0),
            "softmask_k": self.softmask_k is None or 1 <= self.softmask_k,
            "softmask_init_scale": 0.0 < self.softmask_init_scale < 1.0,
            "max_seq_len": isinstance(self.max_seq_len, int) and self.max_seq_len > 0,
            "dtype": self.dtype in DTYPES,
            "adapters": self.adapters is None or isinstance(self.adapters, dict),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid HFDiffusionConfig field(s) {bad}")

    # Read by the samplers / Serve deployment / DiffusionLM like the core ModelConfig's fields.
    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def d_model(self) -> int:
        return int(self.hf_config["hidden_size"])

    time_conditioning = property(lambda self: False, doc="HF backbones take no time input")
    self_conditioning = property(lambda self: False, doc="no self-conditioning projection")


def make_bidirectional(causal_lm: nn.Module) -> int:
    """Full (non-causal) attention in place; returns how many modules had an ``is_causal`` flag cleared."""
    causal_lm.config.is_causal = False  # transformers 5: create_causal_mask -> bidirectional mask (or None)
    n = 0
    for module in causal_lm.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False  # SDPA / flash: `is_causal` of an attention call comes from this flag
            n += 1
    return n


class HFBackbone(nn.Module):
    """g_θ over a transformers causal LM: tokens or sparse soft input -> final hidden (B, L, d) -> logits (B, L, V).

    NOTE: ``embed`` and ``lm_head`` are properties (not registered twice), so state-dict keys are the causal LM's,
    prefixed ``lm.``; the ZeRO-3 external-parameter registration on ``backbone.embed.weight`` works as for the core.
    """

    def __init__(self, causal_lm: nn.Module, shift_logits: bool):
        super().__init__()
        self.lm = causal_lm
        self.shift_logits = shift_logits
        if make_bidirectional(causal_lm) == 0:
            raise ValueError(f"{type(causal_lm).__name__}: found no attention module with an is_causal flag")

    @property
    def embed(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (what models.compile.compile_blocks compiles)."""
        return self.lm.get_decoder().layers

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def init_parameters(self, gather=None) -> None:
        """Re-run transformers' own per-module init, each module's parameters made whole by ``gather(params)``
        (a context manager; see models.backbone.Backbone.init_parameters). Destroys pretrained weights."""
        gather = gather or (lambda params: contextlib.nullcontext())
        for m in self.lm.modules():
            with gather(list(m.parameters(recurse=False))):
                self.lm._init_weights(m)

    def embed_input(self, inputs) -> torch.Tensor:
        if isinstance(inputs, tuple):
            ids, w = inputs  # (B, L, K) each
            h = sparse_embed(self.embed.weight, ids, w)  # (B, L, d)
            scale = getattr(self.embed, "embed_scale", None)  # e.g. Gemma scales inside the embedding's forward
            return h if scale is None else h * torch.as_tensor(scale, dtype=h.dtype, device=h.device)
        return self.embed(inputs)  # (B, L, d)

    def hidden(self, inputs, t: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, L, d), already shifted when ``shift_logits`` (t is ignored)."""
        h = self.embed_input(inputs)  # (B, L, d)
        if extra is not None:
            h = h + extra
        out = self.lm.get_decoder()(inputs_embeds=h, attention_mask=None, use_cache=False).last_hidden_state
        if self.shift_logits:  # position i reads position i-1's output; position 0 keeps its own
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)  # (B, L, d)
        return out

    def forward(self, inputs, t: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(inputs, t, extra))  # (B, L, V)


class HFDiffusionLM(DiffusionLM):
    """DiffusionLM whose backbone is a transformers causal LM (see the module docstring)."""

    def __init__(self, cfg: HFDiffusionConfig, causal_lm: nn.Module):
        if causal_lm.get_input_embeddings().weight.shape[0] != cfg.vocab_size:
            raise ValueError(f"causal LM has {causal_lm.get_input_embeddings().weight.shape[0]} embedding rows, "
                             f"config says vocab_size={cfg.vocab_size}")
        super().__init__(cfg, backbone=HFBackbone(causal_lm, cfg.shift_logits))

    @property
    def causal_lm(self) -> nn.Module:
        return self.backbone.lm

