"""torch.compile applied to a finished model, per transformer block (torchtitan style), and to the loss.

Blocks see fixed shapes (B, L, d) every step, so each compiles once; the rest of the model (the soft-mask head, the
masked-row gather of pass 1) keeps eager execution and its data-dependent shapes. The per-token cross-entropy is
compiled separately with a dynamic row count (the number of masked rows changes every step).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models.objective import token_nll
from models.softmask import neg_entropy


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile every block of ``model.backbone.blocks`` in place; returns how many were compiled."""
    blocks = getattr(getattr(model, "backbone", model), "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no backbone.blocks ModuleList to compile")
    for block in blocks:
        block.compile(**compile_kwargs)  # in place: parameter names (and checkpoints) stay unchanged
    return len(blocks)


def compiled_token_nll(**compile_kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`models.objective.token_nll` compiled for any number of rows: the fp32 cast, log-sum-exp and target
    gather fuse into one reduction over the bf16 logits and the backward into one elementwise kernel, where eager
    PyTorch writes and re-reads fp32 (M, V) temporaries (~50 bytes per logit per step on a 50k vocabulary).
    Pass it as ``training_loss(..., nll=...)``."""
    return torch.compile(token_nll, dynamic=True, **compile_kwargs)


def compile_softmask_head(model: nn.Module, **compile_kwargs) -> None:
    """Compile the SM head's entropy (−H over the full vocabulary of every still-masked row, once per two-pass step):
    one fused reduction over the bf16 logits instead of fp32 cast, log-softmax, exp and dot as separate passes."""
    model.sm_head.neg_entropy_fn = torch.compile(neg_entropy, dynamic=True, **compile_kwargs)


def compile_model(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Everything above applied to a finished DiffusionLM (core backbone): the blocks and the SM head's entropy in
    place; returns the compiled per-token loss to pass as ``training_loss(..., nll=...)``."""
    compile_blocks(model)
    compile_softmask_head(model)
    return compiled_token_nll()
