"""Training stage driver: ``run(TrainConfig) -> TrainResult`` (Ray Train TorchTrainer + DeepSpeed in the workers).

Resume: the same ``run_name`` + ``checkpoint.storage_path`` restores the latest checkpoint of that run (Ray Train V2
restores it into ``ray.train.get_checkpoint()``; ``resume_from_checkpoint=`` raises in Ray 2.60). A worker that dies
mid-run makes the trainer restart the worker group from the latest checkpoint, up to ``checkpoint.max_failures``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from infra.config import ConfigError
from workers.train_config import RunPlan, TrainConfig, preflight


@dataclass
class TrainResult:
    """Where a finished run left its artefacts."""

    run_name: str
    run_uri: str                     # <storage_path>/<run_name>: Ray Train state + checkpoint_<step> directories
    checkpoint_uri: str | None       # latest training checkpoint (DeepSpeed shards + train_state.json)
    export_uri: str                  # consolidated export (models.load_pretrained)
    output_uri: str                  # metrics.jsonl, tensorboard/, training_curves.png
    metrics: dict = field(default_factory=dict)  # metrics reported with the last checkpoint (step, loss, val_ppl...)
    resumed_from_step: int = 0
    wall_s: float = 0.0

    @property
    def metrics_uri(self) -> str:
        return f"{self.output_uri.rstrip('/')}/metrics.jsonl"

    @property
    def plot_uri(self) -> str:
        return f"{self.output_uri.rstrip('/')}/training_curves.png"


def _storage(cfg: TrainConfig):
    """(storage_path, storage_filesystem) for RunConfig; S3 goes through the s3fs filesystem of workers.shard_io."""
    from infra.storage import is_remote

    path = cfg.checkpoint.storage_path
    if not is_remote(path):
        import os

        return os.path.abspath(path.removeprefix("file://")), None
    import pyarrow.fs

    from infra.storage import filesystem

    fs, bucket_path = filesystem(path)
    return bucket_path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: TrainConfig, plan: RunPlan):
    """The TorchTrainer of a run (not started)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from infra.ray_runtime import torch_trainer_class
    from workers.train_loop import train_loop

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_fs = _storage(cfg)
    datasets = None
    if cfg.data.loader == "ray_data":
        cols = ["input_ids", "loss_mask"] if plan.data_mode == "sft" else ["input_ids"]
        read_fs = None
        if plan.train_uris and "://" in plan.train_uris[0]:
            import pyarrow.fs

            from infra.storage import filesystem

            read_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem(plan.train_uris[0])[0]))
            uris = [u.split("://", 1)[1] for u in plan.train_uris]
        else:
            uris = list(plan.train_uris)
        ds = ray.data.read_parquet(uris, columns=cols, filesystem=read_fs, num_cpus=0.25)
        if cfg.data.shuffle:
            ds = ds.random_shuffle(seed=cfg.seed)
        datasets = {"train": ds}
    return torch_trainer_class()(
        train_loop,
        train_loop_config={"train": cfg.to_dict(), "plan": plan.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
        datasets=datasets,
    )


def zero_memory_estimate(cfg: TrainConfig, plan: RunPlan) -> dict | None:
    """DeepSpeed's model-state memory estimate for this run under its ZeRO stage (2 or 3; None for 0 and 1, which
    DeepSpeed has no estimator for), parameters counted on the meta device (no memory, no weights read), the world
    taken as one node of ``scaling.num_workers`` ranks."""
    import torch

    from infra.deepspeed import estimate_zero2_memory, estimate_zero3_memory
    from models.registry import build_from_config, config_from_dict

    stage = cfg.deepspeed.zero_stage
    if stage not in (2, 3):
        return None
    with torch.device("meta"):
        model = build_from_config(config_from_dict(plan.model_config, plan.backbone))
    n_params = sum(p.numel() for p in model.parameters())
    if stage == 2:
        return estimate_zero2_memory(n_params, cfg.scaling.num_workers, 1, cfg.deepspeed.offload_optimizer)
    largest = max(p.numel() for p in model.parameters())
    return estimate_zero3_memory(n_params, cfg.scaling.num_workers, 1, cfg.deepspeed.offload_optimizer,
                                 largest_layer_params=largest)


def _absolute_local_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative local paths (init_checkpoint, data.manifest, checkpoint.storage_path, output_dir) name places under
    the driver's working directory; Ray workers run elsewhere, so they travel to them absolute (URIs stay as they are)."""
    import dataclasses
    import os

    from infra.storage import is_remote

    def absolute(path: str) -> str:
        return os.path.abspath(path.removeprefix("file://")) if path and not is_remote(path) else path

    return dataclasses.replace(
        cfg, init_checkpoint=absolute(cfg.init_checkpoint), output_dir=absolute(cfg.output_dir),
        data=dataclasses.replace(cfg.data, manifest=absolute(cfg.data.manifest)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=absolute(cfg.checkpoint.storage_path)))


def run(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; raises ConfigError before any worker starts on bad input.

    ``progress``: print each metrics line of the run (every ``log_every`` steps, validations, restores) on this
    process's stdout while it trains (:class:`pipelines.train_progress.ProgressPrinter`).
    """
    import contextlib

    import ray

    from infra.ray_runtime import init_ray
    from pipelines.train_progress import ProgressPrinter

    t0 = time.perf_counter()
    cfg = _absolute_local_paths(cfg)
    plan = preflight(cfg)
    estimate = zero_memory_estimate(cfg, plan)
    if estimate is not None:
        print(f"softmask train: {estimate['summary']}", file=sys.stderr, flush=True)
    init_ray(accelerator="gpu" if cfg.scaling.use_gpu else "cpu")
    if not ray.is_initialized():  # pragma: no cover - init_ray either starts or joins Ray
        raise RuntimeError("Ray did not start")
    trainer = build_trainer(cfg, plan)
    printer = ProgressPrinter(f"{cfg.resolved_output_dir.rstrip('/')}/metrics.jsonl", cfg.steps) if progress else None
    with printer or contextlib.nullcontext():
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    ckpt = result.checkpoint
    ckpt_uri = None
    if ckpt is not None:
        ckpt_uri = ckpt.path if "://" not in cfg.checkpoint.storage_path else \
            f"{cfg.checkpoint.storage_path.split('://')[0]}://{ckpt.path}"
    out = cfg.resolved_output_dir
    return TrainResult(run_name=cfg.run_name, run_uri=cfg.storage_run_uri, checkpoint_uri=ckpt_uri,
                       export_uri=f"{out.rstrip('/')}/export", output_uri=out, metrics=dict(result.metrics or {}),
                       resumed_from_step=plan.resume_step, wall_s=time.perf_counter() - t0)


def run_local(cfg: TrainConfig, *, progress: bool = False) -> TrainResult:
    """The same training loop as :func:`run`, alone in this process (no Ray Train): one rank, DeepSpeed on a
    single-rank gloo group, checkpoints in the same ``<storage_path>/<run_name>/checkpoint_<step>`` layout (a rerun
    resumes from the newest), the same metrics, export and result. For one-process jobs: the experiment's cells
    (which Ray runs side by side as tasks), tests, a debugging session."""
    import contextlib

    from pipelines.train_progress import ProgressPrinter
    from workers.checkpointing import list_checkpoints
    from workers.train_loop import train_loop
    from workers.train_session import LocalSession

    t0 = time.perf_counter()
    cfg = _absolute_local_paths(cfg)
    if cfg.scaling.num_workers != 1:
        raise ConfigError(f"scaling.num_workers: a local run has one rank, got {cfg.scaling.num_workers}")
    plan = preflight(cfg)
    printer = ProgressPrinter(f"{cfg.resolved_output_dir.rstrip('/')}/metrics.jsonl", cfg.steps) if progress else None
    with LocalSession(cfg.checkpoint.storage_path, cfg.run_name, cfg.checkpoint.keep_last) as session, \
            printer or contextlib.nullcontext():
        train_loop({"train": cfg.to_dict(), "plan": plan.to_dict()}, session=session)
    ckpts = list_checkpoints(str(session.run_dir))
    out = cfg.resolved_output_dir
    return TrainResult(run_name=cfg.run_name, run_uri=str(session.run_dir),
                       checkpoint_uri=ckpts[-1][1] if ckpts else None, export_uri=f"{out.rstrip('/')}/export",
                       output_uri=out, resumed_from_step=plan.resume_step, wall_s=time.perf_counter() - t0)


__all__ = ["ConfigError", "TrainConfig", "TrainResult", "build_trainer", "run", "run_local"]
