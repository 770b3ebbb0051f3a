"""``train_loop(config, session)``: the per-worker function of the Ray Train TorchTrainer (and, with a
``workers.train_session.LocalSession``, the same loop alone in the calling process).

config = {"train": TrainConfig.to_dict(), "plan": RunPlan.to_dict()} (rebuilt here; no globals).
One optimizer step = ``grad_accum`` micro-batches per rank. Every random choice derives from (seed, micro-step, rank):
the objective's t/masks and two-pass coin (rank-consistent, so ZeRO-3 ranks make identical forward calls), dropout
(re-seeded per micro-step) and the data order (cursor = micro-batches consumed). A checkpoint therefore only needs the
engine state, the EMA, the step and the cursor to replay a run exactly.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict

from workers.train_config import RunPlan, TrainConfig


def _setup_process(cfg: TrainConfig):
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import torch

    threads = cfg.scaling.torch_threads or max(1, round(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    return torch


def _build_model(cfg: TrainConfig, plan: RunPlan, ds_cfg: dict):
    """The DiffusionLM of the plan, initialised from ``init_checkpoint`` when set; frozen backbone if asked.

    Backbones whose registry spec builds partitioned (core, dit) are, under ZeRO-3, built partitioned (``zero.Init``:
    no rank holds the whole model) and their weights then initialised / loaded module by module through gathered
    parameters; the others (hf) are built whole and partitioned by ``deepspeed.initialize``.
    """
    from models.registry import config_from_dict, get_spec

    from infra.deepspeed import gather_for_init, partitioned_init
    from workers import checkpointing

    import torch

    torch.manual_seed(cfg.seed)  # identical init on every rank and in every run (rank 0's is broadcast anyway)
    spec = get_spec(plan.backbone)
    if spec.build_partitioned is None:
        return _with_adapters(_build_registered_model(cfg, plan), cfg, plan.backbone)
    # Partitioned construction under ZeRO-3, except with adapters: peft (DoRA's magnitude) reads whole base weights
    # when it injects them; such a model is built whole and partitioned by deepspeed.initialize instead.
    zero3 = cfg.deepspeed.zero_stage == 3 and cfg.finetune.lora_r == 0
    model = spec.build_partitioned(config_from_dict(plan.model_config, plan.backbone),
                                   (lambda: partitioned_init(ds_cfg)) if zero3 else None)
    if zero3:
        model.init_parameters(gather=gather_for_init)
    if cfg.init_checkpoint:
        # A binary (or unknown) source keeps the fresh SM head (ω_s ≈ 0): the model starts as the binary one.
        checkpointing.init_from_export(model, cfg.init_checkpoint, keep_sm_head=plan.init_objective == "sm",
                                       gather=gather_for_init if zero3 else None)
    return _with_adapters(model, cfg, plan.backbone)


def _build_registered_model(cfg: TrainConfig, plan: RunPlan):
    """A backbone built whole (models.registry, e.g. hf): the init checkpoint's weights, or a fresh init.

    Built whole on every rank; ZeRO-3 partitions it in ``deepspeed.initialize``. A source trained without SM (an
    AR import, a binary run) gets a fresh SM head (ω_s ≈ 0), as for the core backbone.
    """
    from models.registry import build_from_config, config_from_dict
    from models.softmask import SoftMaskHead

    from workers import checkpointing

    mcfg = config_from_dict(plan.model_config, plan.backbone)
    if not cfg.init_checkpoint:
        return build_from_config(mcfg)
    model = checkpointing.load_export(cfg.init_checkpoint)
    model.config = mcfg
    if plan.init_objective != "sm" or model.sm_head.k != mcfg.softmask_k:
        model.sm_head = SoftMaskHead(k=mcfg.softmask_k)
    return model


def _with_adapters(model, cfg: TrainConfig, backbone: str = "core"):
    """Frozen backbone and/or LoRA/DoRA adapters (fine-tuning options; a no-op by default)."""
    from workers.train_adapters import DEFAULT_TARGETS, apply_adapters

    ft = cfg.finetune
    if ft.freeze_backbone or ft.lora_r > 0:
        apply_adapters(model, ft.freeze_backbone, ft.lora_r, ft.lora_alpha, ft.use_dora,
                       ft.lora_targets or DEFAULT_TARGETS[backbone])
    return model


class _SftProbe:
    """Forward pre-hook counting [MASK]ed prompt (loss_mask 0) and response (loss_mask 1) tokens of x_t."""

    def __init__(self, module, mask_id: int):
        self.mask_id, self.loss_mask = mask_id, None
        self.prompt_masked = self.response_masked = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.loss_mask is not None and args:
            masked = args[0] == self.mask_id  # (B, L)
            lm = self.loss_mask.to(masked.device)
            self.prompt_masked += int((masked & (lm == 0)).sum())
            self.response_masked += int((masked & (lm == 1)).sum())


def _head_values(engine) -> dict[str, float]:
    """ω_s, ω_a, ω_b of the SM head (read from full fp32 values: ZeRO-3 partitions even these scalars)."""
    from infra.deepspeed import full_fp32_params
    from models.softmask import SoftMaskHead

    head = engine.module.sm_head
    probe = SoftMaskHead(k=head.k)
    own = dict(probe.named_parameters())
    full = full_fp32_params(engine, {f"sm_head.{n}" for n in own})
    probe.load_state_dict({n.removeprefix("sm_head."): v.detach().cpu().reshape(own[n.removeprefix("sm_head.")].shape)
                           for n, v in full})
    return probe.values()


def _allreduce_mean(torch, values: dict[str, float], world: int, device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    # values may be device tensors (training_loss metrics): one stack, one read-back for all of them
    buf = torch.stack([torch.as_tensor(values[k], device=device).to(torch.float64).reshape(()) for k in keys])
    if world > 1:
        dist.all_reduce(buf)
    return {k: float(v) / world for k, v in zip(keys, buf.tolist())}


def _validate(torch, engine, batches, obj, cfg: TrainConfig, world: int) -> dict[str, float]:
    """Validation ELBO perplexity bound over the fixed validation batches (single pass, and two-pass for SM)."""
    import torch.distributed as dist
    from models.objective import validation_nll

    if not batches:
        return {}
    modes = [("val_ppl", False)] + ([("val_ppl_two_pass", True)] if obj.kind != "binary" else [])
    engine.eval()
    sums = []
    for _, two_pass in modes:
        nll, n = 0.0, 0
        for i, (x0, lm) in enumerate(batches):
            s, c = validation_nll(engine, x0.to(engine.device), obj, seed=cfg.seed, step=i, two_pass=two_pass,
                                  loss_mask=None if lm is None else lm.to(engine.device))
            nll, n = nll + s, n + c
        sums += [nll, n]
    engine.train()
    buf = torch.tensor(sums, dtype=torch.float64, device=engine.device)
    if world > 1:
        dist.all_reduce(buf)
    vals = buf.tolist()
    return {name: math.exp(min(vals[2 * i] / max(vals[2 * i + 1], 1), 50.0)) for i, (name, _) in enumerate(modes)}


def train_loop(config: dict, session=None) -> None:
    """Ray Train per-worker entry point (see the module docstring); ``session``: where it runs
    (``workers.train_session``: a Ray Train worker by default, or a :class:`~workers.train_session.LocalSession`)."""
    cfg = TrainConfig.from_dict(config["train"])
    plan = RunPlan(**config["plan"])
    torch = _setup_process(cfg)
    from models.ema import EMA, checksum
    from models.compile import compile_model
    from models.objective import token_nll, training_loss, uses_two_pass
    from models.optim import param_groups

    from infra.deepspeed import (NamedTensors, build_ds_config, build_engine, full_fp32_params, global_grad_norm,
                                 grad_norm_before_step, register_external_parameter)
    from workers import checkpointing
    from workers.train_data import LocalShardReader, RayDataBatches, _seed, validation_batches
    from workers.train_metrics import MetricsSink

    t_start = time.perf_counter()
    if session is None:
        from workers.train_session import RaySession

        session = RaySession()
    rank, world = session.rank, session.world
    obj = cfg.objective

    ds_cfg = build_ds_config(cfg.deepspeed, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world_size=world,
                             on_gpu=cfg.scaling.use_gpu)
    model = _build_model(cfg, plan, ds_cfg)
    # in place, after adapters: parameter names and checkpoints stay as they are
    nll = compile_model(model) if cfg.model.compile else token_nll
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.objective.sm_lr)
    t_engine = time.perf_counter()
    engine = build_engine(model, groups, ds_cfg, cfg.deepspeed, schedule=cfg.optim.schedule,
                          warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.steps,
                          min_lr_ratio=cfg.optim.min_lr_ratio)
    t_engine = time.perf_counter() - t_engine
    # The soft-mask input is embedded from backbone.embed.weight outside embed.forward: ZeRO-3 must gather it there.
    register_external_parameter(engine, engine.module.backbone, engine.module.backbone.embed.weight)
    # DoRA layers read their base layer's weight (for the magnitude norm) outside base_layer.forward: same for them.
    for module in engine.module.modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_magnitude_vector"):
            register_external_parameter(engine, module, module.base_layer.weight)
    ema, ema_names = None, None
    if cfg.ema_decay > 0:
        ema = EMA(NamedTensors(full_fp32_params(engine)), cfg.ema_decay)
        ema_names = set(ema.shadow)

    step, cursor, attempt = 0, 0, 0
    ckpt = session.checkpoint()
    if ckpt is not None:
        state = checkpointing.restore(engine, ema, ckpt, device=str(engine.device))
        step, cursor, attempt = int(state["step"]), int(state["cursor"]), int(state.get("attempt", 0)) + 1

    output = cfg.resolved_output_dir
    sink = MetricsSink(output, enabled=rank == 0, attempt=attempt)
    with_mask = plan.data_mode == "sft"
    if cfg.data.loader == "ray_data":
        data = RayDataBatches(session.dataset_shard("train"), micro_batch=cfg.micro_batch,
                              with_mask=with_mask, start_cursor=cursor)
    else:
        data = LocalShardReader(plan.train_uris, micro_batch=cfg.micro_batch, rank=rank, world=world, seed=cfg.seed,
                                shuffle=cfg.data.shuffle, with_mask=with_mask)
    val = validation_batches(plan.val_uris, micro_batch=cfg.micro_batch, rank=rank, world=world,
                             n_batches=cfg.data.val_batches, with_mask=with_mask)
    pids = [None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(pids, os.getpid())
    else:
        pids = [os.getpid()]
    sink.log(step, {"setup_s": time.perf_counter() - t_start, "engine_s": t_engine, "world": world, "pids": pids,
                    "compiled": cfg.model.compile,
                    "ema_checksum": checksum(ema.state_dict()) if ema is not None else None}, kind="setup")
    probe = _SftProbe(engine.module, engine.module.mask_id) if with_mask else None
    accum, tokens_per_step = cfg.grad_accum, cfg.global_batch * plan.seq_len
    eval_due = (lambda s: s == cfg.steps or (cfg.eval_every and s % cfg.eval_every == 0))
    last: dict = {}

    while step < cfg.steps:
        t0 = time.perf_counter()
        acc: dict[str, float] = defaultdict(float)
        logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        head = _head_values(engine) if logged else None  # ω before the step: the gate the step's inputs met
        for micro in range(accum):
            gstep = step * accum + micro  # objective / coin / dropout index: identical on every rank
            x0, lm = data.batch(cursor)
            cursor += 1
            x0 = x0.to(engine.device)
            lm = lm.to(engine.device) if lm is not None else None
            if probe is not None:
                probe.loss_mask = lm
            torch.manual_seed(_seed(cfg.seed, gstep, rank, "dropout"))
            two_pass = uses_two_pass(obj, cfg.seed, gstep)
            loss, m = training_loss(engine, x0, obj, seed=cfg.seed, step=gstep, rank=rank, world=world,
                                    loss_mask=lm, two_pass=two_pass, nll=nll,
                                    gate_centre=head["omega_b"] if head else None)
            engine.backward(loss)
            pre_norm = grad_norm_before_step(engine) if micro == accum - 1 else None
            engine.step()
            for k in ("loss", "lambda_mean", "gate_open", "two_pass", "masked_frac"):
                if k in m:  # lambda_mean/gate_open: per the micro-step's kind, which is the same on every rank
                    acc[k] += m[k] / accum
        step += 1
        if ema is not None:
            ema.update(NamedTensors(full_fp32_params(engine, ema_names)))
        if probe is not None:
            acc["sft_prompt_masked"], acc["sft_response_masked"] = probe.prompt_masked, probe.response_masked
            probe.prompt_masked = probe.response_masked = 0
        means = _allreduce_mean(torch, dict(acc), world, engine.device)
        dt = time.perf_counter() - t0
        lrs = engine.get_lr()
        rec = dict(means, lr=lrs[0], grad_norm=global_grad_norm(engine, pre_norm), step_time_s=dt,
                   tokens_per_s=tokens_per_step / dt, tokens_per_s_per_worker=tokens_per_step / dt / world)
        if probe is not None:  # counts, not means
            rec["sft_prompt_masked"] *= world
            rec["sft_response_masked"] *= world
        if logged:
            rec.update(_head_values(engine))  # ω after the step (any objective: a binary run keeps the init)
            if cfg.objective.kind == "sm":
                rec["sm_lr"] = lrs[-1]
            sink.log(step, rec)
        last = {"step": step, "loss": rec["loss"]}
        if eval_due(step):
            vals = _validate(torch, engine, val, obj, cfg, world)
            if vals:
                sink.log(step, vals, kind="val")
                last.update(vals)
        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            sink.sync()
            state = {"step": step, "cursor": cursor, "attempt": attempt, "world": world,
                     "rng": "derived from (seed, micro-step, rank)", "train_config": cfg.to_dict(),
                     "plan": plan.to_dict(), "model_config": plan.model_config}
            checkpointing.save(engine, ema, state, dict(last), rank, session.report)

    metadata = {"objective": cfg.objective.kind, "step": step, "run_name": cfg.run_name, "mode": cfg.mode,
                "data_manifest": cfg.data.manifest, "seed": cfg.seed}
    if cfg.finetune.lora_r > 0:
        metadata["adapters"] = {"kind": "dora" if cfg.finetune.use_dora else "lora", "r": cfg.finetune.lora_r,
                                "alpha": cfg.finetune.lora_alpha, "merged": True}
    checkpointing.export(engine, ema, plan.model_config, f"{output.rstrip('/')}/export", metadata, rank,
                         use_ema=cfg.checkpoint.export_ema, prepare=lambda m: _with_adapters(m, cfg, plan.backbone),
                         backbone=plan.backbone)
    sink.plot()
    sink.sync()
    sink.close()
