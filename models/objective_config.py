"""The training objective's settings (torch-free: the training config and the CLI embed it as they are).

    ObjectiveConfig(kind="sm", p_sm=0.8, k=3, sm_lr=1e-2)   # the paper's language-model setting
    ObjectiveConfig(kind="sm", p_sm=0.5, k=1, schedule="dream", per_batch_t=True, t_min=0.2, t_max=0.8,
                    loss_norm="masked", min_one_masked=True)  # Dream's fine-tuning recipe

Invalid values raise ValueError("<field>: <problem>") (the config loader reports it under its section).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.names import OBJECTIVES, SCHEDULES, Objective, Schedule

LOSS_NORMS = ("tokens", "masked")


@dataclass
class ObjectiveConfig:
    """The training objective and the SM head's training settings (the training stage's ``objective:`` section)."""

    kind: Objective = field(default="sm", metadata={"doc": "binary (MDLM) | sm (soft-masking, two-pass) | "
                                                           "self_cond (self-conditioning baseline)"})
    p_sm: float = field(default=0.8, metadata={"doc": "probability that a global batch takes the two-pass feedback "
                                                      "step (0.8 in the paper's language models, 0.5 for Dream)"})
    k: int = field(default=3, metadata={"doc": "top-k tokens mixed into a still-masked position (3 for language "
                                               "models, 1 for code); sets ModelConfig.softmask_k"})
    sm_lr: float = field(default=1e-2, metadata={"doc": "learning rate of the SM head's parameter group (no weight "
                                                        "decay)"})
    schedule: Schedule = field(default="loglinear", metadata={"doc": "noise schedule: loglinear (MDLM) | cosine | "
                                                                     "dream (mask prob (1 − ε)t + ε, weight 1/t)"})
    eps: float = field(default=1e-3, metadata={"doc": "schedule epsilon and smallest t"})
    antithetic: bool = field(default=True, metadata={"doc": "antithetic t: one uniform draw per stratum of the "
                                                            "global batch (the paper's trainer)"})
    per_batch_t: bool = field(default=False, metadata={"doc": "one t for the whole global batch (Dream's collator); "
                                                              "overrides antithetic"})
    t_max: float = field(default=1.0, metadata={"doc": "largest t (Dream fine-tuning uses 0.8 with t_min 0.2)"})
    t_min: float | None = field(default=None, metadata={"doc": "smallest t (None = eps)"})
    loss_norm: Literal["tokens", "masked"] = field(default="tokens", metadata={
        "doc": "tokens: Σ w(t)·NLL over masked tokens / scored tokens (the MDLM per-token ELBO); masked: / masked "
               "tokens, i.e. (1/t)·mean NLL over the masked tokens (Dream's trainer)"})
    min_one_masked: bool = field(default=False, metadata={"doc": "a row that drew no [MASK] gets one (Dream)"})

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"kind: must be one of {OBJECTIVES}, got {self.kind!r}")
        if not 0.0 <= self.p_sm <= 1.0:
            raise ValueError(f"p_sm: must be in [0, 1], got {self.p_sm}")
        if self.k < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if self.sm_lr <= 0:
            raise ValueError(f"sm_lr: must be > 0, got {self.sm_lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < (self.t_min or self.eps) < self.t_max <= 1.0:
            raise ValueError("t_max: need 0 < t_min < t_max <= 1")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm: must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
