"""Reading weights written by other code bases: safetensors, or ``torch.save`` files read by torch's weights-only
unpickler. Python's own pickle never runs.

    obj = read_weights_file(path)    # dict of tensors, or the nested dict a training framework saved

A ``torch.save`` file may name classes we never import: a Lightning checkpoint pickles its hyper-parameters (an
OmegaConf config, a tokenizer object) beside the tensors. For the one load, each such name is bound to
:class:`Opaque`, an inert placeholder (``torch.serialization.safe_globals``): tensors and plain containers come back
as saved, those objects come back as empty placeholders, and none of their code runs (the names are found by
``torch.serialization.get_unsafe_globals_in_checkpoint``, which only disassembles the pickle). Globals from modules
torch blocks outright (os, sys, posix, nt) still make the load fail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Opaque:
    """Stands in for an object of a class that a weights file names: takes any arguments and state, keeps nothing."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<opaque>"


def read_weights_file(path: str | Path) -> Any:
    """The object saved in ``path``: ``*.safetensors`` -> dict of tensors; anything else is read as a ``torch.save``
    file with ``weights_only=True`` (foreign objects as :class:`Opaque`, see the module docstring). CPU tensors.

    Raises ValueError (one line naming the file) when torch's weights-only unpickler refuses it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        zipped = True
    except ValueError:  # the legacy (pre-1.6, non-zip) format: no placeholders, torch's own allow-list only
        foreign, zipped = [], False
    try:
        with torch.serialization.safe_globals([(Opaque, name) for name in foreign]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # UnpicklingError, RuntimeError (not a torch file), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not readable as weights without running its code ({first})") from None
