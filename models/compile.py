"""torch.compile applied to a finished model, per transformer block (torchtitan style).

Blocks see fixed shapes (B, L, d) every step, so each compiles once; the rest of the model (the soft-mask head, the
masked-row gather of pass 1, the loss) keeps eager execution and its data-dependent shapes.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile every block of ``model.backbone.blocks`` in place; returns how many were compiled."""
    blocks = getattr(getattr(model, "backbone", model), "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no backbone.blocks ModuleList to compile")
    for block in blocks:
        block.compile(**compile_kwargs)  # in place: parameter names (and checkpoints) stay unchanged
    return len(blocks)
