"""DeepSpeed glue: typed config section -> DeepSpeed config dict -> engine.

This is the only module that knows about ZeRO stages, bf16 and optimizer offload. It receives a finished
``nn.Module`` and its parameter groups and never imports ``models`` (imports point down only).

NOTE: the optimizer is always a client ``torch.optim.AdamW`` handed to ``deepspeed.initialize``. DeepSpeed's own
FusedAdam / DeepSpeedCPUAdam JIT-compile C++ ops for minutes on a CPU machine (stack-notes §2); with
``offload_optimizer`` we set ``zero_force_ds_cpu_optimizer: false`` so that the client AdamW steps the offloaded
fp32 master weights instead. Importing this module imports neither torch nor deepspeed (no side effects).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

from infra.config import field, require


@dataclass
class DeepSpeedConfig:
    """How the model is sharded and stepped by DeepSpeed (the section ``deepspeed:`` of a training recipe)."""

    zero_stage: int = field(2, "ZeRO stage: 0 = plain data parallel, 1 = optimizer states sharded, 2 = + gradients, "
                               "3 = + parameters")
    precision: Literal["auto", "bf16", "fp32"] = field("auto", "auto = bf16 on GPU, fp32 on CPU; bf16 also works on "
                                                             "CPU but is slow there")
    grad_clip: float = field(1.0, "clip the global gradient L2 norm to this value (0 disables clipping)")
    activation_checkpointing: bool = field(False, "recompute each transformer block in the backward pass (less "
                                                  "activation memory, about +30% compute)")
    offload_optimizer: bool = field(False, "ZeRO-Offload: keep fp32 master weights and Adam states in CPU memory "
                                           "(stage >= 1; stepped by the client torch AdamW, never DeepSpeedCPUAdam)")
    check_grad_overflow: bool = field(True, "bf16: test every gradient for inf/NaN before the step and skip the "
                                            "step if any (DeepSpeed's default; costs ~5 kernel launches per parameter "
                                            "tensor and a host sync every step)")
    overlap_comm: bool = field(False, "overlap gradient reduction with the backward pass (GPU; no gain on gloo)")
    reduce_bucket_size: int = field(50_000_000, "elements per gradient reduce bucket (ZeRO 1-3)")
    stage3_prefetch_bucket_size: int = field(20_000_000, "elements of parameters prefetched ahead (ZeRO-3)")
    stage3_param_persistence_threshold: int = field(100_000, "ZeRO-3 keeps parameters smaller than this many "
                                                             "elements unpartitioned")
    stage3_max_live_parameters: int = field(20_000_000, "ZeRO-3: most gathered parameter elements alive at once "
                                                        "(DeepSpeed's default 1e9 keeps a whole small model gathered)")
    stage3_max_reuse_distance: int = field(20_000_000, "ZeRO-3: keep a gathered parameter only if it is reused "
                                                       "within this many elements of fetches")
    sub_group_size: int = field(100_000_000, "ZeRO-3: optimizer step works on parameter groups of this many elements")
    adam_betas: tuple[float, float] = field((0.9, 0.999), "AdamW (beta1, beta2)")
    adam_eps: float = field(1e-8, "AdamW epsilon")
    fused_adam: Literal["auto", "on", "off"] = field("auto", "torch AdamW's fused kernel: one pass over each "
                                                            "parameter tensor instead of a chain of foreach kernels "
                                                            "(~10 reads/writes of the fp32 states); auto = on CUDA")

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer",
                "needs zero_stage >= 1 (ZeRO-Offload shards the optimizer)")
        require(self.reduce_bucket_size > 0, "reduce_bucket_size", "must be > 0")
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
                f"must be two numbers in [0, 1), got {self.adam_betas}")
        require(self.adam_eps > 0, "adam_eps", "must be > 0")


def resolve_bf16(ds: DeepSpeedConfig, on_gpu: bool) -> bool:
    """Whether the engine runs in bf16 (``precision: auto`` -> bf16 exactly when on GPU)."""
    return ds.precision == "bf16" or (ds.precision == "auto" and on_gpu)


def build_ds_config(ds: DeepSpeedConfig, *, micro_batch: int, grad_accum: int, world_size: int,
                    on_gpu: bool) -> dict:
    """The DeepSpeed JSON config for one run. ``train_batch_size = micro_batch * grad_accum * world_size``."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=ds.overlap_comm,
                    reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.reduce_bucket_size)
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=ds.stage3_max_live_parameters,
                    stage3_max_reuse_distance=ds.stage3_max_reuse_distance, sub_group_size=ds.sub_group_size)
        zero.pop("allgather_bucket_size")
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "bf16": ({"enabled": True, "check_grad_overflow": ds.check_grad_overflow} if resolve_bf16(ds, on_gpu)
                 else {"enabled": False}),
        "zero_allow_untested_optimizer": True,      # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,       # offload with the client AdamW (no cpu_adam JIT compile)
        "steps_per_print": 10 ** 9,                 # we log ourselves
        "wall_clock_breakdown": False,
    }
    return cfg


# ------------------------------------------------------------------------------------------- LR schedule
def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of each group's base lr at optimizer step ``s``: linear warmup, then constant or cosine decay.

    Applied to every param group alike, so the SM head keeps its own (larger) base lr.
    """
    def constant(s: int) -> float:
        return min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    def cosine(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedules = {"constant": constant, "cosine": cosine}
    if schedule not in schedules:
        raise ValueError(f"schedule: must be one of {sorted(schedules)}, got {schedule!r}")
    return schedules[schedule]


# ----------------------------------------------------------------------------------------------- engine
def apply_activation_checkpointing(model, block_list_names: tuple[str, ...] = ("blocks", "layers", "h")) -> int:
    """Wrap every block of the model's block lists with ``torch.utils.checkpoint`` (non-reentrant).

    Finds each ``nn.ModuleList`` whose attribute name is in ``block_list_names`` anywhere in the module tree, so
    it works on any backbone without naming it. Returns the number of wrapped blocks (0 = nothing found).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if name not in block_list_names or not isinstance(child, torch.nn.ModuleList):
                continue
            for block in child:
                inner = block.forward

                def fwd(*args, _inner=inner, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                    return _inner(*args, **kwargs)

                block.forward = fwd
                wrapped += 1
    return wrapped


def promote_scalar_params(model) -> list[str]:
    """Give every 0-dim parameter the shape (1,) in place; returns their names.

    NOTE: DeepSpeed 0.19.8 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails on 0-dim tensors
    ("self.dim() cannot be 0 to view Float as Byte"); the SM head's ω scalars are 0-dim. Elementwise math broadcasts
    (1,) like (), and exports reshape back to the model's own shapes (see ``match_shapes``).
    """
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


def cast_outside_partitions(model, ds_config: dict) -> list[str]:
    """Under bf16/fp16, give the parameters of a model built with ``zero.Init`` that were created outside it (the SM
    head's scalars) the half dtype of the partitioned ones, in place; returns their names.

    NOTE: DeepSpeed 0.19.8 casts nothing when the model was built partitioned (it takes every parameter to be at the
    configured dtype already), and ZeRO-3's partition defragmentation asserts one dtype for all parameters. Below
    stage 3, or without half precision, nothing changes (the engine casts the whole model itself).
    """
    import torch

    half = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else
            torch.float16 if ds_config.get("fp16", {}).get("enabled") else None)
    params = list(model.named_parameters())
    if half is None or not any(hasattr(p, "ds_id") for _, p in params):
        return []
    names = []
    for name, p in params:
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != half:
            p.data = p.data.to(half)
            names.append(name)
    return names


def match_shapes(state_dict: dict, reference: dict) -> dict:
    """``state_dict`` with each tensor reshaped to the reference tensor's shape when only the shape differs."""
    out = {}
    for k, v in state_dict.items():
        ref = reference.get(k)
        out[k] = v.reshape(ref.shape) if ref is not None and ref.shape != v.shape and ref.numel() == v.numel() else v
    return out


def build_optimizer(param_groups: list[dict], ds: DeepSpeedConfig, device_type: str = "cpu"):
    """Client torch AdamW over the given groups (each group keeps its own lr / weight_decay); fused per
    ``ds.fused_adam`` (``auto``: when the optimizer steps on ``device_type`` "cuda", i.e. without CPU offload)."""
    import torch

    groups = [dict(g) for g in param_groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty or frozen")
    fused = ds.fused_adam == "on" or (ds.fused_adam == "auto" and device_type == "cuda" and not ds.offload_optimizer)
    return torch.optim.AdamW(groups, betas=tuple(ds.adam_betas), eps=ds.adam_eps, fused=fused or None)


def build_engine(model, param_groups: list[dict], ds_config: dict, ds: DeepSpeedConfig, *,
                 schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 1, min_lr_ratio: float = 0.0):
    """``deepspeed.initialize`` with a client AdamW and a LambdaLR schedule; returns the engine.

    Reuses the torch.distributed process group that Ray Train (or torchrun) already created. The scheduler is stepped
    by the engine at every optimizer step, and both live in the engine's checkpoint.
    """
    import deepspeed
    import torch

    promote_scalar_params(model)
    cast_outside_partitions(model, ds_config)
    if ds.activation_checkpointing:
        apply_activation_checkpointing(model)
    from deepspeed.accelerator import get_accelerator

    optimizer = build_optimizer(param_groups, ds, get_accelerator().device_name())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps,
                                                                      min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


@contextlib.contextmanager
def gathered_params(engine, params=None, modifier_rank: int | None = None):
    """Full (unpartitioned) parameters inside the block under ZeRO-3; a no-op for stages 0-2.

    Collective: every rank must enter it with the same parameters.
    """
    if zero_stage(engine) != 3:
        yield
        return
    import deepspeed

    params = list(params if params is not None else engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def full_state_dict(engine) -> dict:
    """A CPU copy of the module's full state dict on every rank (gathers ZeRO-3 partitions; collective)."""
    with gathered_params(engine):
        return {k: v.detach().to("cpu", copy=True).float() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in engine.module.state_dict().items()}


def global_grad_norm(engine, fallback: float | None = None) -> float:
    """The pre-clipping global gradient norm of the last optimizer step; ``fallback`` (see
    :func:`grad_norm_before_step`) where DeepSpeed did not record one (ZeRO stage 0), else nan."""
    value = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if value != value and fallback is not None:
        return float(fallback)
    return value


def grad_norm_before_step(engine) -> float | None:
    """Global L2 norm of the (already averaged) gradients, read between ``engine.backward`` and ``engine.step`` on an
    accumulation boundary. Only for ZeRO stage 0, whose engine keeps whole gradients on the parameters and does not
    record the norm itself; None otherwise."""
    import torch

    if engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def partitioned_init(ds_config: dict):
    """Context to build a model already partitioned across ranks (ZeRO-3 ``deepspeed.zero.Init``): no rank ever
    holds the whole model. A no-op context below stage 3. Needs the process group (Ray Train sets it up)."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return contextlib.nullcontext()
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
    # zero.Init reads only the ZeRO/precision sections; the batch fields would be re-checked against its own world view
    init_cfg = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
    return deepspeed.zero.Init(config_dict_or_path=init_cfg)


def gather_for_init(params: list) -> "contextlib.AbstractContextManager":
    """Make ZeRO-3 partitioned ``params`` whole and writable (rank 0's values win, broadcast on exit); a no-op for
    ordinary parameters. Used to initialise or load weights into a model built under :func:`partitioned_init`."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def register_external_parameter(engine, module, param) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses ``param`` owned by another module (a no-op below stage 3)."""
    if zero_stage(engine) == 3:
        import deepspeed

        deepspeed.zero.register_external_parameter(module, param)


def full_fp32_params(engine, names=None) -> list[tuple[str, "object"]]:
    """[(name, full fp32 tensor)] of the module's parameters (all, or those in ``names``), for reading only.

    Below stage 3 these are the live parameters. Under ZeRO-3 each one is assembled from the optimizer's fp32
    partitions (``safe_get_full_fp32_param``, a collective per parameter: every rank must call this with the same
    names). NOTE: this deliberately avoids ``GatheredParameters`` inside the training loop, which re-partitions
    persistent parameters on exit and breaks ZeRO-3's cached prefetch trace ("tracing error ... expected the next N
    parameters in the parameter fetch queue") when the forward graph changes between steps (two-pass SM steps).
    """
    pairs = [(n, p) for n, p in engine.module.named_parameters() if names is None or n in names]
    if zero_stage(engine) != 3:
        return pairs
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for n, p in pairs:
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"ZeRO-3 has no fp32 copy of parameter {n} (frozen parameters are not supported)")
        out.append((n, full))
    return out


class NamedTensors:
    """A stand-in module exposing ``named_parameters()`` over given (name, tensor) pairs (e.g. for an EMA update)."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def named_parameters(self):
        return iter(self._pairs)


# ------------------------------------------------------------------------------------------- memory estimate
def estimate_zero3_memory(n_params: int, num_gpus_per_node: int, num_nodes: int, offload: bool, *,
                          largest_layer_params: int | None = None, buffer_factor: float = 1.5,
                          gpu_memory_gib: float | None = None) -> dict:
    """ZeRO-3 model-state memory per GPU and per node's CPU, from DeepSpeed's own estimator.

    Calls ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` (the function behind DeepSpeed's
    printed ``estimate_zero3_model_states_mem_needs_all_cold`` table) for our setting: the model is built under
    ``zero.Init`` (:func:`partitioned_init`, ``zero_init=True``) and ``offload`` moves the optimizer states and fp32
    master weights to CPU memory (``DeepSpeedConfig.offload_optimizer``; parameters stay on the GPUs). ``table`` has
    every variant DeepSpeed prints. ``largest_layer_params`` (gathered whole, 4 bytes/param) defaults to 10% of
    ``n_params``, about the embedding matrix of 1-10B LMs (Qwen2.5/Dream-7B: 152064 x 3584 = 545M of 7.6B).
    NOTE: model states only (bf16 params + grads, fp32 master + Adam moments, 18 bytes/param over all GPUs):
    activations, the (B, L, V) fp32 logits and allocator slack come on top. With a frozen backbone (LoRA/DoRA) only the
    adapters carry optimizer states, so the figure is an upper bound there.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    require(n_params > 0, "n_params", f"must be > 0, got {n_params}")
    require(num_gpus_per_node >= 1 and num_nodes >= 1, "num_gpus_per_node", "GPUs per node and nodes must be >= 1")
    largest = int(largest_layer_params if largest_layer_params is not None else max(1, n_params // 10))
    gib = 2 ** 30

    def one(cpu_offload: bool, offload_params: bool, zero_init: bool = True) -> dict:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=int(n_params), largest_layer_params=largest, num_gpus_per_node=num_gpus_per_node,
            num_nodes=num_nodes, cpu_offload=cpu_offload, cpu_offload_params=offload_params, zero_init=zero_init,
            additional_buffer_factor=buffer_factor)
        return {"offload_optimizer": "cpu" if cpu_offload else "none", "offload_param": "cpu" if offload_params
                else "none", "zero_init": zero_init, "per_gpu_bytes": int(gpu), "per_node_cpu_bytes": int(cpu),
                "per_gpu_gib": round(gpu / gib, 2), "per_node_cpu_gib": round(cpu / gib, 2)}

    table = [one(o, p, z) for o in (True, False) for p in (True, False) if o or not p for z in (True, False)]
    chosen = one(offload, False, True)
    out = {"n_params": int(n_params), "largest_layer_params": largest, "num_gpus_per_node": num_gpus_per_node,
           "num_nodes": num_nodes, "total_gpus": num_gpus_per_node * num_nodes, "offload": offload,
           "buffer_factor": buffer_factor, **chosen, "largest_layer_gib": round(4 * largest / gib, 2), "table": table,
           "fits": None if gpu_memory_gib is None else chosen["per_gpu_gib"] <= gpu_memory_gib}
    out["summary"] = _memory_summary(3, out, gpu_memory_gib)
    return out


def estimate_zero2_memory(n_params: int, num_gpus_per_node: int, num_nodes: int, offload: bool, *,
                          buffer_factor: float = 1.5, gpu_memory_gib: float | None = None) -> dict:
    """ZeRO-2 model-state memory per GPU and per node's CPU, from DeepSpeed's own estimator
    (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``, the function behind its printed
    ``estimate_zero2_model_states_mem_needs_all_cold`` table): bf16 parameters whole on every GPU (2 bytes/param), bf16
    and fp32 gradients, fp32 master weights and Adam moments sharded over all GPUs (16 bytes/param in total), or, with
    ``offload``, those in CPU memory. NOTE: model states only; activations and the (B, L, V) logits come on top.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    require(n_params > 0, "n_params", f"must be > 0, got {n_params}")
    require(num_gpus_per_node >= 1 and num_nodes >= 1, "num_gpus_per_node", "GPUs per node and nodes must be >= 1")
    gib = 2 ** 30
    cpu, gpu = estimate_zero2_model_states_mem_needs(int(n_params), num_gpus_per_node, num_nodes, cpu_offload=offload,
                                                     additional_buffer_factor=buffer_factor)
    out = {"n_params": int(n_params), "num_gpus_per_node": num_gpus_per_node, "num_nodes": num_nodes,
           "total_gpus": num_gpus_per_node * num_nodes, "offload": offload, "buffer_factor": buffer_factor,
           "per_gpu_bytes": int(gpu), "per_node_cpu_bytes": int(cpu), "per_gpu_gib": round(gpu / gib, 2),
           "per_node_cpu_gib": round(cpu / gib, 2),
           "fits": None if gpu_memory_gib is None else gpu / gib <= gpu_memory_gib}
    out["summary"] = _memory_summary(2, out, gpu_memory_gib)
    return out


def _memory_summary(stage: int, est: dict, gpu_memory_gib: float | None) -> str:
    """One line for an estimate of :func:`estimate_zero2_memory` / :func:`estimate_zero3_memory`."""
    n = est["n_params"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    fit = "" if gpu_memory_gib is None else f" ({'fits' if est['fits'] else 'does NOT fit'} {gpu_memory_gib:g} GiB GPUs)"
    return (f"ZeRO-{stage} model states (DeepSpeed estimator) for {size} params on {est['num_nodes']} node(s) x "
            f"{est['num_gpus_per_node']} GPU(s), offload_optimizer={'cpu' if est['offload'] else 'none'}: "
            f"{est['per_gpu_gib']:.2f} GiB per GPU, {est['per_node_cpu_gib']:.2f} GiB CPU per node{fit}; activations "
            f"and logits come on top")
