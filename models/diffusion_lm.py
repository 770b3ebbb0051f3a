"""DiffusionLM = backbone g_θ + SM head (+ optional self-conditioning projection), SUBS output.

forward(x_t, t, two_pass=False, prev_logits=None, masked_only=False) -> logits (B, L, V) with the [MASK] logit
suppressed.
- prev_logits given (sampling): the previous step's prediction is fed back (SM or self-conditioning); no extra pass.
  Either dense (B, L, V) or a :class:`MaskedLogits` (only the rows that were masked); feedback reaches the positions
  masked now that have a previous prediction, any other masked position (e.g. one remasked by ReMDM) is pure [MASK].
- two_pass=True (training): pass 1 under no_grad on the same x_t with pure masks gives the feedback, pass 2 runs with
  gradients to the backbone and the SM scalars (ω reach the loss only through λ in pass 2).
- with_stats=True: returns (logits, stats), stats the SM head's :class:`models.softmask.FeedbackStats` of this
  forward's feedback (λ and the gate-open count over the fed rows), None when nothing was fed back.
- masked_only=True: logits (M, V) of the still-masked rows of x_t only (row-major, = logits[x_t == mask]); the output
  layer and everything after it then run on ~half the positions (the loss reads nothing else); ``rows`` may then pass
  ``flat_rows(x_t == mask)`` in, computed once by the caller. Otherwise ``rows`` (B, L) bool, or its flat indices (M,)
  from ``models.softmask.flat_rows``, selects any other set of positions the same way (the samplers ask for the ones
  they read).
Unmasked positions carry their token over (SUBS); consumers (loss, samplers) only read masked rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from models.backbone import Backbone, Gather, no_gather, sparse_embed
from models.config import ModelConfig
from models.softmask import FeedbackStats, SoftMaskHead, flat_rows

NEG_INF = -1e6  # finite "−∞" for the [MASK] logit (as MDLM): keeps softmax/entropy NaN-free


@dataclass
class MaskedLogits:
    """A prediction kept only where it is read: ``z`` (M, V) holds the logits of the True positions of ``rows`` (B, L),
    in row-major order (= dense[rows]). The samplers keep their predictions in this form.

    ``tokens`` (B, L), when given, are the input tokens of the forward that made the prediction: under SUBS its output
    at a position that was not masked is the one-hot of that token (log-probability 0 there, −∞ elsewhere). Feedback
    reads that one-hot at a position decoded then and remasked since (ReMDM), as the paper's code does."""

    rows: torch.Tensor  # (B, L) bool
    z: torch.Tensor     # (M, V)
    tokens: torch.Tensor | None = None  # (B, L) long

    def at(self, sel: torch.Tensor) -> torch.Tensor:
        """Logits (M', V) of the positions ``sel`` (B, L) bool, row-major; every one of them must be in ``rows``."""
        if bool((sel & ~self.rows).any()):
            raise ValueError("MaskedLogits.at: some selected positions have no logits (not in rows)")
        return self.z[sel[self.rows]]

    def window(self, a: int, e: int) -> "MaskedLogits":
        """The prediction of positions [a, e) only, as a MaskedLogits over (B, e − a)."""
        inside = torch.zeros_like(self.rows)
        inside[:, a:e] = True
        tokens = None if self.tokens is None else self.tokens[:, a:e]
        return MaskedLogits(self.rows[:, a:e], self.z[inside[self.rows]], tokens)  # (M', V)

    def update(self, new: "MaskedLogits", a: int, e: int) -> "MaskedLogits":
        """A windowed step's prediction ``new`` (rows inside positions [a, e) only) merged into this one: ``new`` in
        [a, e), this prediction outside it; ``tokens`` are the new ones."""
        keep = self.rows.clone()
        keep[:, a:e] = False  # (B, L)
        rows = keep | new.rows
        z = new.z.new_empty((int(rows.sum()), new.z.shape[-1]))  # (M, V), row-major over rows
        z[keep[rows]] = self.z[keep[self.rows]].to(z.dtype)
        z[new.rows[rows]] = new.z
        return MaskedLogits(rows, z, new.tokens)


class DiffusionLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None,
                 partition: Callable[[], ContextManager] | None = None):
        """``partition()``: a context the large modules are built in (the trainer passes ZeRO-3's ``zero.Init``);
        the SM head's scalars are always built outside it, as ordinary parameters."""
        super().__init__()
        self.config = cfg
        self.mask_id = cfg.mask_token_id
        partition = partition or contextlib.nullcontext
        # Any module with the Backbone interface (hidden/forward/embed/lm_head) may stand in, e.g. models.hf_backbone.
        with partition():
            self.backbone = backbone if backbone is not None else Backbone(cfg)
        self.sm_head = SoftMaskHead(k=cfg.softmask_k, omega_s=cfg.softmask_init_scale)
        # Self-conditioning baseline (Analog-Bits style): projected top-k estimate of x̂0 added at ALL positions.
        with partition():
            self.sc_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.self_conditioning else None
        if self.sc_proj is not None:
            nn.init.zeros_(self.sc_proj.weight)  # starts as the binary model (partitioned: redone by init_parameters)

    def init_parameters(self, gather: Gather = no_gather) -> None:
        """Re-run the constructor's initialisation with each module's parameters made whole by ``gather``.

        For a model built partitioned (DeepSpeed ZeRO-3 ``zero.Init``: a parent's post-construction init would only
        see empty partitions). The SM head's scalars are set in its own constructor and are left as they are.
        """
        self.backbone.init_parameters(gather)
        if self.sc_proj is not None:
            with gather([self.sc_proj.weight]):
                nn.init.zeros_(self.sc_proj.weight)

    def _predict(self, inputs, t, extra=None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V), or (M, V) for the positions selected by ``rows``: a boolean (B, L) mask, or the flat
        row-major indices (M,) of its True positions (``flat_rows``; gathers by index never wait for the device)."""
        if rows is None:
            logits = self.backbone(inputs, t, extra)  # (B, L, V)
        else:
            h = self.backbone.hidden(inputs, t, extra)  # (B, L, d)
            h = h[rows] if rows.dtype == torch.bool else h.flatten(0, 1).index_select(0, rows)  # (M, d)
            return self.logits_of(h)  # (M, V)
        return self._subs(logits)

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states h (..., d): the output layer, then SUBS."""
        return self._subs(self.backbone.lm_head(h))

    def _subs(self, logits: torch.Tensor) -> torch.Tensor:
        logits[..., self.mask_id] = NEG_INF  # SUBS: never predict [MASK]
        if logits.shape[-1] > self.config.vocab_size:
            logits[..., self.config.vocab_size:] = NEG_INF  # padding rows (vocab_pad_multiple) are not tokens
        return logits

    def _previous_rows(self, masked: torch.Tensor, prev: MaskedLogits) -> tuple[torch.Tensor, torch.Tensor]:
        """(fed (B, L) bool, z (M, V)): the positions masked now that have a previous prediction, and its logits —
        a stored row, or the SUBS one-hot of the token a position held when predicted (remasked since)."""
        has = masked & prev.rows  # masked now and predicted while masked
        z = prev.z.detach()[has[prev.rows]]  # (M_has, V)
        hard = None if prev.tokens is None else masked & ~prev.rows & (prev.tokens != self.mask_id)
        if hard is None or not bool(hard.any()):
            return has, z
        fed = has | hard
        zf = z.new_full((int(fed.sum()), z.shape[-1]), NEG_INF)  # (M, V)
        soft = has[fed]  # (M,): rows that have stored logits (the others are one-hot)
        zf[soft] = z
        zf[(~soft).nonzero().squeeze(1), prev.tokens[hard]] = 0.0  # log p = 0 on the token held, −∞ elsewhere
        return fed, zf

    def feedback_input(self, x_t: torch.Tensor, prev_logits: torch.Tensor | MaskedLogits,
                       sm_scale: torch.Tensor | None = None):
        """Build the pass-2 input from a (detached) previous prediction, dense (B, L, V) or :class:`MaskedLogits`.
        Only positions masked in x_t read it. ``sm_scale`` (B,): per-sample factor on ω_s (SM transparency
        scheduling; SM head only). Returns (inputs, extra, stats)."""
        masked = x_t == self.mask_id  # (B, L)
        if isinstance(prev_logits, MaskedLogits):
            fed, z = self._previous_rows(masked, prev_logits)
        else:
            fed, z = masked, prev_logits.detach()[masked]
        if self.sc_proj is not None:
            k = self.config.softmask_k or 1
            top_z, top_ids = torch.topk(z.float(), k, dim=-1)  # (M, k)
            B, L = x_t.shape
            ids = x_t.unsqueeze(-1).expand(B, L, k).clone()  # elsewhere the input token itself is certain (SUBS)
            pi = torch.zeros(B, L, k, device=x_t.device, dtype=torch.float32)
            pi[..., 0] = 1.0
            ids[fed], pi[fed] = top_ids, torch.softmax(top_z, dim=-1)
            estimate = sparse_embed(self.backbone.embed.weight, ids, pi)  # (B, L, d)
            return x_t, self.sc_proj(estimate), None
        ids, w, stats = self.sm_head.mix(x_t, fed, z, scale=sm_scale)  # (B, L, k+1) each
        return (ids, w), None, stats

    @torch.no_grad()
    def _pass_one_sm_input(self, x_t: torch.Tensor, t, flat: torch.Tensor) -> torch.Tensor:
        """Pass 1 for SM training: logits (M, V) only for the still-masked rows ``flat`` (the head reads nothing
        else)."""
        z = self.backbone.lm_head(self.backbone.hidden(x_t, t).flatten(0, 1).index_select(0, flat))  # (M, V)
        z[:, self.mask_id] = NEG_INF
        if z.shape[-1] > self.config.vocab_size:
            z[:, self.config.vocab_size:] = NEG_INF  # padding columns: not tokens, out of the entropy and the top-k
        return z

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | None = None, *, two_pass: bool = False,
                prev_logits: torch.Tensor | MaskedLogits | None = None, masked_only: bool = False,
                rows: torch.Tensor | None = None, sm_scale: torch.Tensor | None = None, with_stats: bool = False):
        if masked_only:  # ``rows`` may bring flat_rows(x_t == mask) in already (the training loss has it)
            rows = flat_rows(x_t == self.mask_id) if rows is None else rows  # (M,): this forward's one host wait
        stats: FeedbackStats | None = None
        if prev_logits is None and two_pass and self.sc_proj is None:
            masked = x_t == self.mask_id  # (B, L)
            flat = rows if masked_only else flat_rows(masked)
            z = self._pass_one_sm_input(x_t, t, flat)  # pass 1: same x_t, pure masks, current θ, no grad
            ids, w, stats = self.sm_head.mix(x_t, masked, z, flat)  # grads reach ω through w only
            del z
            logits = self._predict((ids, w), t, rows=rows)  # pass 2
        else:
            if prev_logits is None and two_pass:
                with torch.no_grad():  # self-conditioning: the estimate is read at the masked positions only
                    sel = x_t == self.mask_id
                    prev_logits = MaskedLogits(sel, self._predict(x_t, t, rows=sel))
            if prev_logits is None:
                logits = self._predict(x_t, t, rows=rows)
            else:
                inputs, extra, stats = self.feedback_input(x_t, prev_logits, sm_scale)
                logits = self._predict(inputs, t, extra, rows=rows)
        return (logits, stats) if with_stats else logits

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.backbone.embed.weight.numel()
        return n


def build_model(cfg: ModelConfig, partition: Callable[[], ContextManager] | None = None) -> DiffusionLM:
    """Our own backbone + SM head. ``partition``: see :class:`DiffusionLM` (ZeRO-3 builds the backbone partitioned)."""
    return DiffusionLM(cfg, partition=partition)
