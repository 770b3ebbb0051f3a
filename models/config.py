"""Model configuration and named flavors (debug / tiny / small)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


class ConfigDict:
    """Serialisation of the model config dataclasses: ``to_dict`` / ``from_dict`` (unknown keys named) / ``to_json``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class TransformerConfig(ConfigDict):
    """What every transformer config of ours shares (fields vocab_size, mask_token_id, d_model, n_layers, n_heads,
    max_seq_len, dropout, softmask_k, softmask_init_scale, vocab_pad_multiple): their validation and the derived sizes."""

    def _validate(self, extra: dict[str, bool]) -> None:
        """[MASK] defaults to the last id; ValueError naming every field whose check (shared + ``extra``) fails."""
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        checks = {
            "vocab_size": self.vocab_size >= 2,
            "mask_token_id": 0 <= self.mask_token_id < self.vocab_size,
            "d_model": self.d_model > 0 and self.d_model % max(self.n_heads, 1) == 0,
            "n_heads": self.n_heads > 0 and (self.d_model // self.n_heads) % 2 == 0,
            "n_layers": self.n_layers > 0,
            "max_seq_len": self.max_seq_len > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "softmask_k": self.softmask_k is None or 1 <= self.softmask_k < self.vocab_size,
            "vocab_pad_multiple": self.vocab_pad_multiple >= 1,
            "softmask_init_scale": 0.0 < self.softmask_init_scale < 1.0,
            **extra,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {type(self).__name__} field(s) {bad}: {self}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices (>= vocab_size)."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class ModelConfig(TransformerConfig):
    """Bidirectional transformer diffusion LM. Validated on construction (ValueError naming the field)."""

    flavor: str = _f("custom", "name of the flavor this config was built from (informational)")
    vocab_size: int = _f(8192, "number of token ids, [MASK] and other specials included")
    mask_token_id: int | None = _f(None, "id of [MASK]; None means vocab_size - 1")
    d_model: int = _f(256, "hidden width")
    n_layers: int = _f(4, "number of transformer blocks")
    n_heads: int = _f(4, "attention heads (d_model must be divisible by n_heads)")
    mlp_ratio: int = _f(4, "MLP hidden width = mlp_ratio * d_model")
    max_seq_len: int = _f(256, "longest sequence the rotary cache is built for")
    dropout: float = _f(0.0, "dropout on attention probabilities and residual branches")
    rope_base: float = _f(10000.0, "rotary position embedding base")
    time_conditioning: bool = _f(False, "add an embedding of the diffusion time t to every position (off: as MDLM OWT)")
    softmask_k: int | None = _f(3, "top-k tokens mixed into a still-masked position; None = full vocab + learnable temperature")
    softmask_init_scale: float = _f(1e-6, "initial ω_s of the SM head (paper: 1e-6, SM off at init)")
    self_conditioning: bool = _f(False, "build the self-conditioning input projection (baseline objective)")
    init_std: float = _f(0.02, "std of the normal weight init")
    norm_eps: float = _f(1e-5, "LayerNorm epsilon")
    vocab_pad_multiple: int = _f(1, "round the embedding / output matrices up to a multiple of this many rows (64 keeps "
                                    "GPU matmuls on their fast kernels); padded ids are never predicted")

    def __post_init__(self) -> None:
        self._validate({})

    @classmethod
    def from_flavor(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in FLAVORS:
            raise ValueError(f"unknown model flavor {name!r}; known: {sorted(FLAVORS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**{**FLAVORS[name], "flavor": name, **overrides})


# ~1M params with a 1k vocab (CPU tests); ~17M with an 8k vocab (CPU demo); DiT-small of the paper (~169M with GPT-2).
FLAVORS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    "tiny": dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, max_seq_len=512),
    "small": dict(vocab_size=50258, mask_token_id=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                  dropout=0.1, vocab_pad_multiple=64),
}
