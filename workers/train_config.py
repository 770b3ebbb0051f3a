"""Typed configuration of the training stage (``softmask train``), and the driver-side preflight checks.

``TrainConfig`` travels to every Ray Train worker as a plain dict (``to_dict``) and is rebuilt there with
``TrainConfig.from_dict`` (no globals). Field-level problems raise ``ConfigError`` in ``__post_init__``; problems that
need the dataset manifest or a checkpoint on storage (``seq_len`` > model max, missing manifest, checkpoint whose model
config differs) are raised by :func:`preflight` before any worker starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from infra.config import ConfigError, field, from_dict, require, to_dict
from infra.deepspeed import DeepSpeedConfig
from models.objective_config import ObjectiveConfig

MODES = ("pretrain", "continue", "finetune")


@dataclass
class ModelSection:
    """Which network to train."""

    backbone: Literal["core", "hf", "dit"] = field(
        "core", "core = our transformer (models.DiffusionLM, flavor + overrides); hf = a transformers decoder (Qwen2, "
                "Llama, ...) used as a diffusion LM (models.hf_backbone): its architecture comes from init_checkpoint "
                "(a `softmask hf-import` export) or hf_config; dit = MDLM's DiT (models.dit): from init_checkpoint (a "
                "`softmask mdlm-import` export of MDLM / soft-masking weights) or, in mode pretrain, the flavor")
    flavor: str = field("debug", "model flavor: core = models.FLAVORS (debug, tiny, small), dit = "
                                 "models.dit.DIT_FLAVORS (test, debug, small); unused when init_checkpoint gives the "
                                 "architecture (hf, dit)")
    overrides: dict[str, Any] = field(None, "config fields overriding the flavor or the init checkpoint (core: "
                                            "ModelConfig, e.g. {dropout: 0.0}; hf: HFDiffusionConfig, e.g. "
                                            "{max_seq_len: 512}; dit: DiTConfig); vocab_size and mask_token_id always "
                                            "come from the dataset tokenizer", factory=dict)
    hf_config: dict[str, Any] = field(None, "hf, mode pretrain: transformers config of a randomly initialised model "
                                            "(model_type, hidden_size, ...; vocab_size >= the tokenizer's)",
                                      factory=dict)
    compile: bool = field(False, "torch.compile every transformer block, the SM head's entropy and the per-token "
                                 "loss (models.compile.compile_model; core and dit backbones, ZeRO 0-2): for GPU "
                                 "runs; on CPU the first steps spend ~20 s or more compiling")

    def __post_init__(self) -> None:
        require(not (self.compile and self.backbone == "hf"), "compile", "is only available for backbones core and dit")
        if self.backbone != "hf":
            require(not self.hf_config, "hf_config", "only applies to backbone hf")
        elif self.hf_config:
            require("model_type" in self.hf_config, "hf_config", "needs model_type (e.g. qwen2, llama)")


@dataclass
class DataSection:
    """Where the token shards come from and how workers read them."""

    manifest: str = field("", "dataset manifest written by `softmask preprocess` (local dir/file or s3:// URI)")
    loader: Literal["local", "ray_data"] = field("local", "local = deterministic per-rank reader over the manifest's "
                                                          "shards (exact resume); ray_data = Ray Data streaming split "
                                                          "(get_dataset_shard), resumed by skipping batches")
    shuffle: bool = field(True, "reshuffle training rows every epoch (seeded; local loader)")
    val_batches: int = field(2, "validation micro-batches per rank at every evaluation")


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = field(3e-4, "peak learning rate of the backbone")
    weight_decay: float = field(0.0, "AdamW weight decay on matrices (embeddings, norms, biases, SM head: none)")
    warmup_steps: int = field(0, "linear warmup steps")
    schedule: Literal["constant", "cosine"] = field("constant", "after warmup: constant (paper) or cosine decay")
    min_lr_ratio: float = field(0.1, "cosine floor as a fraction of the peak lr")

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")


@dataclass
class ScalingSection:
    """Ray Train workers."""

    num_workers: int = field(2, "data-parallel training workers (one process each)")
    cpus_per_worker: float = field(0.5, "CPUs reserved per worker; keep it fractional on small machines so Ray Data "
                                        "tasks still find a CPU (a full 2-CPU allocation deadlocks silently)")
    use_gpu: bool = field(False, "one GPU per worker (nccl) instead of CPU workers (gloo)")
    torch_threads: int = field(0, "torch intra-op threads per worker (0 = max(1, round(cpus_per_worker)))")

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0")


@dataclass
class CheckpointSection:
    """Run identity, checkpoints and fault tolerance."""

    storage_path: str = field("runs", "Ray Train storage root (local path or s3://bucket/prefix); checkpoints go to "
                                      "<storage_path>/<run_name>/checkpoint_<step>")
    every: int = field(100, "save a checkpoint every N optimizer steps (and at the last step)")
    keep_last: int = field(2, "keep only the K most recent checkpoints")
    max_failures: int = field(2, "worker failures survived by restoring the latest checkpoint (-1 = unlimited)")
    export_ema: bool = field(True, "final export holds the EMA backbone weights (the SM head as trained)")

    def __post_init__(self) -> None:
        require(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        require(self.max_failures >= -1, "max_failures", "must be >= -1")


@dataclass
class FinetuneSection:
    """Options of ``mode: finetune`` (and a frozen backbone in any mode)."""

    freeze_backbone: bool = field(False, "train only the SM head (+ LoRA adapters when lora_r > 0)")
    lora_r: int = field(0, "LoRA rank on the attention/MLP linears via peft (0 = off)")
    lora_alpha: float = field(16.0, "LoRA scaling alpha")
    use_dora: bool = field(False, "DoRA (weight-decomposed LoRA) instead of plain LoRA")
    lora_targets: list[str] | None = field(None, "module name suffixes that get adapters; None = the backbone's "
                                                 "default (core, dit: qkv, proj, mlp.0, mlp.2; hf: q/k/v/o_proj)")

    def __post_init__(self) -> None:
        require(self.lora_r >= 0, "lora_r", "must be >= 0")


@dataclass
class TrainConfig:
    """One training run: pretrain from scratch, continue from a checkpoint, or fine-tune on SFT data."""

    mode: Literal["pretrain", "continue", "finetune"] = field("pretrain", "pretrain from scratch | continue from "
                                                                          "init_checkpoint | finetune on SFT data")
    run_name: str = field("softmask-train", "run name; the same name + storage_path resumes the run")
    init_checkpoint: str = field("", "export directory (config.json + model.safetensors) that initialises continue/"
                                     "finetune; a binary checkpoint gets a fresh SM head (ω_s ≈ 0)")
    output_dir: str = field("", "where metrics.jsonl, TensorBoard events, the export and the plot go (local or "
                                "s3://); empty = <storage_path>/<run_name>/output")
    seed: int = field(0, "seed of every random choice (t, masks, coin, dropout, data order): derived from "
                         "(seed, step, rank)")
    steps: int = field(1000, "optimizer steps in total (a resumed run continues up to this)")
    micro_batch: int = field(8, "sequences per worker per forward/backward")
    global_batch: int = field(16, "sequences per optimizer step over all workers; grad accumulation = "
                                  "global_batch / (micro_batch * num_workers)")
    ema_decay: float = field(0.9999, "EMA decay of the backbone weights (0 disables the EMA)")
    eval_every: int = field(100, "validation every N steps (and at the last step); 0 = only at the end")
    log_every: int = field(1, "append a metrics line every N steps")
    model: ModelSection = field(None, "model flavor and overrides", factory=ModelSection)
    objective: ObjectiveConfig = field(None, "training objective", factory=ObjectiveConfig)
    data: DataSection = field(None, "dataset", factory=DataSection)
    optim: OptimSection = field(None, "optimizer and schedule", factory=OptimSection)
    scaling: ScalingSection = field(None, "Ray Train workers", factory=ScalingSection)
    checkpoint: CheckpointSection = field(None, "checkpoints, resume, fault tolerance", factory=CheckpointSection)
    deepspeed: DeepSpeedConfig = field(None, "DeepSpeed engine", factory=DeepSpeedConfig)
    finetune: FinetuneSection = field(None, "fine-tuning options", factory=FinetuneSection)

    def __post_init__(self) -> None:
        require(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a non-empty name without '/'")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.micro_batch >= 1, "micro_batch", f"must be >= 1, got {self.micro_batch}")
        per_step = self.micro_batch * self.scaling.num_workers
        require(self.global_batch >= per_step and self.global_batch % per_step == 0, "global_batch",
                f"{self.global_batch} is not a multiple of micro_batch * scaling.num_workers = "
                f"{self.micro_batch} * {self.scaling.num_workers}")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(bool(self.data.manifest), "data.manifest", "is required (a dataset written by softmask preprocess)")
        if self.mode == "pretrain":
            require(not self.init_checkpoint, "init_checkpoint", "must be empty for mode pretrain (use mode continue)")
        else:
            require(bool(self.init_checkpoint), "init_checkpoint", f"is required for mode {self.mode}")
        ft = self.finetune
        if ft.freeze_backbone and ft.lora_r == 0:
            require(self.objective.kind == "sm", "finetune.freeze_backbone",
                    f"with objective {self.objective.kind} and no LoRA nothing would be trained")
        if self.deepspeed.zero_stage == 3 and ft.lora_r == 0:
            require(not ft.freeze_backbone, "finetune.freeze_backbone", "a frozen backbone without adapters is not "
                                                                        "supported with deepspeed.zero_stage 3 (use "
                                                                        "stage 2, or LoRA/DoRA)")
        require(not (self.model.compile and self.deepspeed.zero_stage == 3), "model.compile",
                "is not supported with deepspeed.zero_stage 3 (its parameter gathering hooks; use stage 0-2)")
        if self.deepspeed.offload_optimizer:
            require(self.scaling.use_gpu, "deepspeed.offload_optimizer", "offloads to CPU memory: only meaningful "
                                                                         "with scaling.use_gpu")
        if self.deepspeed.precision == "bf16" and not self.scaling.use_gpu:
            pass  # allowed (slow) - DeepSpeed bf16 runs on the CPU accelerator

    # ------------------------------------------------------------------------------------------ derived
    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.scaling.num_workers)

    @property
    def storage_run_uri(self) -> str:
        return f"{self.checkpoint.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def resolved_output_dir(self) -> str:
        return self.output_dir or f"{self.storage_run_uri}/output"

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data)


# ------------------------------------------------------------------------------------------------ preflight
@dataclass
class RunPlan:
    """What preflight resolved on the driver; travels to the workers next to the TrainConfig."""

    model_config: dict          # models.ModelConfig.to_dict() of the model to build
    seq_len: int                # rows of the dataset
    data_mode: str              # pretrain | sft
    train_uris: list[str]
    val_uris: list[str]
    init_objective: str         # objective the init checkpoint was trained with ("" = none / unknown)
    resume_step: int            # step of the checkpoint a same-name run resumes from (0 = fresh)
    backbone: str = "core"      # models.registry name of model_config's type

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _hf_model_config(cfg: TrainConfig, tokenizer: dict, init: dict | None):
    """HFDiffusionConfig for backbone hf: the init checkpoint's architecture, or ``model.hf_config`` (pretrain)."""
    from models.hf_backbone import HFDiffusionConfig

    vocab, mask_id = int(tokenizer["vocab_size"]), int(tokenizer["mask_id"])
    over = dict(cfg.model.overrides)
    for key in ("hf_config", "mask_token_id", "adapters", "base_checkpoint"):
        require(key not in over, f"model.overrides.{key}", "cannot be overridden")
    if init is not None:
        require(init.get("backbone") == "hf", "init_checkpoint", "model.backbone hf needs an HF-backed export "
                                                                 "(`softmask hf-import` or an hf training run)")
        base = dict(init["model"], adapters=None, base_checkpoint=None)
        require(base["mask_token_id"] == mask_id, "data.manifest",
                f"tokenizer mask id {mask_id} differs from the checkpoint's {base['mask_token_id']}: preprocess with "
                f"the checkpoint's tokenizer")
    else:
        require(bool(cfg.model.hf_config), "model.hf_config", "backbone hf in mode pretrain needs hf_config")
        base = {"hf_config": cfg.model.hf_config, "mask_token_id": mask_id, "source": "config"}
    try:
        mcfg = HFDiffusionConfig.from_dict({**base, **over, "softmask_k": cfg.objective.k})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    require(mcfg.vocab_size >= vocab, "model", f"the HF model has {mcfg.vocab_size} embedding rows, fewer than the "
                                               f"tokenizer's {vocab} ids")
    require(cfg.objective.kind != "self_cond", "objective.kind", "self_cond is not available for backbone hf")
    return mcfg


def _core_model_config(cfg: TrainConfig, tokenizer: dict, init: dict | None = None):
    from models import ModelConfig

    overrides = dict(cfg.model.overrides)
    for key in ("vocab_size", "mask_token_id"):
        require(key not in overrides, f"model.overrides.{key}", "comes from the dataset's tokenizer; do not set it")
    overrides.update(vocab_size=int(tokenizer["vocab_size"]), mask_token_id=int(tokenizer["mask_id"]),
                     softmask_k=cfg.objective.k, self_conditioning=cfg.objective.kind == "self_cond")
    try:
        return ModelConfig.from_flavor(cfg.model.flavor, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def _dit_model_config(cfg: TrainConfig, tokenizer: dict, init: dict | None = None):
    """DiTConfig for backbone dit: the init checkpoint's architecture (continue / finetune), else the flavor's; the
    vocabulary and [MASK] of the dataset's tokenizer (a checkpoint that disagrees is refused by check_model_match)."""
    from models.dit import DIT_FLAVORS, DiTConfig

    over = dict(cfg.model.overrides)
    for key in ("vocab_size", "mask_token_id"):
        require(key not in over, f"model.overrides.{key}", "comes from the dataset's tokenizer; do not set it")
    if init is not None:
        require(init.get("backbone") == "dit", "init_checkpoint", "model.backbone dit needs a dit export (`softmask "
                                                                  "mdlm-import` or a dit training run)")
        base = dict(init["model"])
    else:
        require(cfg.model.flavor in DIT_FLAVORS, "model.flavor", f"{cfg.model.flavor!r} is not a dit flavor "
                                                                 f"({', '.join(sorted(DIT_FLAVORS))})")
        base = {**DIT_FLAVORS[cfg.model.flavor], "flavor": cfg.model.flavor}
    fields = {**base, **over, "vocab_size": int(tokenizer["vocab_size"]), "mask_token_id": int(tokenizer["mask_id"]),
              "softmask_k": cfg.objective.k, "self_conditioning": cfg.objective.kind == "self_cond"}
    try:
        return DiTConfig.from_dict(fields)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


# model.backbone -> (cfg, dataset tokenizer record, init checkpoint config.json or None) -> the model config to build
MODEL_CONFIGS = {"core": _core_model_config, "hf": _hf_model_config, "dit": _dit_model_config}


def _model_config(cfg: TrainConfig, tokenizer: dict, init: dict | None = None):
    return MODEL_CONFIGS[cfg.model.backbone](cfg, tokenizer, init)


def _comparable(model_cfg: dict) -> dict:
    """Fields that must agree between a checkpoint and the model we build (flavor name / k / dropout may differ)."""
    ignore = {"flavor", "dropout", "softmask_k", "softmask_init_scale", "self_conditioning", "init_std",
              "adapters", "base_checkpoint", "source", "dtype", "attn_implementation", "max_seq_len", "attention"}
    return {k: v for k, v in model_cfg.items() if k not in ignore}


def check_model_match(expected: dict, found: dict, where: str, field_name: str) -> None:
    a, b = _comparable(expected), _comparable(found)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    require(not diff, field_name, f"{where} was trained with a different model: " +
            ", ".join(f"{k}={b.get(k)!r} (configured {a.get(k)!r})" for k in diff))


def preflight(cfg: TrainConfig) -> RunPlan:
    """Every check that needs the manifest, the model flavor or storage; raises ConfigError naming the field.

    Runs on the driver before any worker starts.
    """
    from workers import checkpointing
    from workers.shard_io import DatasetManifest

    try:
        manifest = DatasetManifest.load(cfg.data.manifest)
    except FileNotFoundError as e:
        raise ConfigError(f"data.manifest: not found: {cfg.data.manifest} ({e})") from None
    except Exception as e:  # a malformed manifest
        raise ConfigError(f"data.manifest: cannot be read: {cfg.data.manifest}: {e}") from None
    data_mode = getattr(manifest, "mode", "pretrain")
    if cfg.mode == "finetune":
        require(data_mode == "sft", "data.manifest", f"mode finetune needs an sft dataset (loss_mask), got {data_mode}")
    train_uris, val_uris = list(manifest.shard_uris("train")), list(manifest.shard_uris("validation"))
    require(bool(train_uris), "data.manifest", "has no train shards")
    init = checkpointing.read_export(cfg.init_checkpoint) if cfg.init_checkpoint else None
    mcfg = _model_config(cfg, manifest.tokenizer, init)
    seq_len = int(manifest.seq_len)
    require(seq_len <= mcfg.max_seq_len, "data.manifest",
            f"seq_len {seq_len} exceeds the max_seq_len {mcfg.max_seq_len} of model flavor {cfg.model.flavor!r} "
            f"(set model.overrides.max_seq_len or re-pack the data)")
    init_objective = ""
    if init is not None:
        require(init.get("backbone", "core") == cfg.model.backbone, "init_checkpoint",
                f"is a {init.get('backbone', 'core')!r} export but model.backbone is {cfg.model.backbone!r}")
        check_model_match(mcfg.to_dict(), init["model"], f"init_checkpoint {cfg.init_checkpoint}", "init_checkpoint")
        init_objective = str(init.get("metadata", {}).get("objective", ""))
    resume_step = 0
    state = checkpointing.latest_train_state(cfg.storage_run_uri)
    if state is not None:
        resume_step = int(state["step"])
        check_model_match(mcfg.to_dict(), state["model_config"], f"checkpoint of run {cfg.run_name!r}", "run_name")
        old = TrainConfig.from_dict(state["train_config"])
        for name, now, before in (("scaling.num_workers", cfg.scaling.num_workers, old.scaling.num_workers),
                                  ("deepspeed.zero_stage", cfg.deepspeed.zero_stage, old.deepspeed.zero_stage),
                                  ("micro_batch", cfg.micro_batch, old.micro_batch),
                                  ("global_batch", cfg.global_batch, old.global_batch),
                                  ("objective.kind", cfg.objective.kind, old.objective.kind)):
            require(now == before, name, f"is {now!r} but the checkpoint of run {cfg.run_name!r} (step {resume_step}) "
                                         f"was written with {before!r}; use a new run_name")
        require((cfg.ema_decay > 0) == (old.ema_decay > 0), "ema_decay",
                f"is {cfg.ema_decay!r} but the checkpoint of run {cfg.run_name!r} (step {resume_step}) was written "
                f"with {old.ema_decay!r}: an EMA cannot be switched on or off on resume; use a new run_name")
    return RunPlan(model_config=mcfg.to_dict(), seq_len=seq_len, data_mode=data_mode, train_uris=train_uris,
                   val_uris=val_uris, init_objective=init_objective, resume_step=resume_step,
                   backbone=cfg.model.backbone)


def dumps(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
