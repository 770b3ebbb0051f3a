"""The SM-vs-binary experiment: ``softmask experiment --config configs/sm_vs_binary.yaml`` / ``run(ExperimentConfig)``.

The paper's continued-pretraining design: ONE binary MDLM base (``grid.base_steps``), then every objective of
``grid.objectives`` (soft-masking, binary, self-conditioning) continued from that base for the same number of
optimizer steps (``grid.continued_steps``), once per seed (the seed sets the data order and the noise). Optionally
the from-scratch budgets too (``grid.scratch_budgets``, ``grid.scratch_steps``):
- iso_update: every objective gets ``scratch_steps`` optimizer steps;
- iso_compute (the paper's definition): two-pass objectives get half the steps;
- flop_matched: steps / (1 + f), f = the objective's measured extra training FLOP fraction (torch FlopCounterMode on
  one micro-batch, forward + backward, one-pass vs two-pass, weighted by p_sm).
Every run trains with the training stage's loop: ``backend: inprocess`` runs it alone in a process
(``pipelines.train.run_local``), ``parallel`` runs at once as Ray tasks; ``backend: stage`` goes through Ray Train
(``pipelines.train.run``), one run at a time. Each run is then evaluated with ``pipelines.evaluate.run`` (ELBO one-
and two-pass, gate-open share, samples at every NFE budget), also as Ray tasks.
Idempotent: a trained run (its export) is not retrained, an evaluation whose inputs and code are unchanged is not
redone, a half-trained run resumes from its checkpoint. Writes ``<output>/results.json`` and the report
(``results_md``, with ``results.json`` beside it: one record per run, and the plots).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from infra.config import config_hash, field, from_dict, require, to_dict
from infra.storage import write_atomic
from models.names import OBJECTIVES
from pipelines.evaluate import EvalConfig

log = logging.getLogger("softmask.experiment")
BUDGETS = ("iso_update", "iso_compute", "flop_matched")


@dataclass
class GridSection:
    """Which runs to make."""

    objectives: list[str] = field(None, f"objectives continued from the base (subset of {OBJECTIVES}; binary is the "
                                        "reference)", factory=lambda: list(OBJECTIVES))
    seeds: list[int] = field(None, "seeds of every continued (and from-scratch) run; >= 3 for mean ± std",
                             factory=lambda: [0, 1, 2])
    base_steps: int = field(4000, "optimizer steps of the binary base every continuation starts from")
    base_seed: int = field(0, "seed of the base run")
    continued_steps: int = field(3000, "optimizer steps of every continuation (the same for every objective)")
    sm_warm_starts: list[float] = field(None, "ablation: SM continuations whose head starts at these ω_s instead of "
                                              "the paper's 1e-6 (does the loss keep an open head open?); empty = "
                                              "none", factory=list)
    scratch_budgets: list[str] = field(None, f"from-scratch runs at these budgets ({BUDGETS}); empty = none",
                                       factory=list)
    scratch_steps: int = field(0, "optimizer steps of a from-scratch binary run (the iso_update budget)")

    def __post_init__(self) -> None:
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        require(not bad and bool(self.objectives), "grid.objectives", f"must be a non-empty subset of {OBJECTIVES}")
        require("binary" in self.objectives, "grid.objectives", "must include binary (the reference)")
        bad = [b for b in self.scratch_budgets if b not in BUDGETS]
        require(not bad, "grid.scratch_budgets", f"must be a subset of {BUDGETS}, got {bad}")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "grid.seeds", "must be distinct")
        require(self.base_steps >= 1, "grid.base_steps", "must be >= 1")
        require(self.continued_steps >= 1, "grid.continued_steps", "must be >= 1")
        require(all(0 < w < 1 for w in self.sm_warm_starts), "grid.sm_warm_starts", "every ω_s must be in (0, 1)")
        require(not self.scratch_budgets or self.scratch_steps >= 2, "grid.scratch_steps",
                "must be >= 2 when scratch_budgets are given")


@dataclass
class ExperimentConfig:
    """The ``experiment:`` section."""

    name: str = field("sm_vs_binary", "experiment name (prefix of run names)")
    output: str = field("artifacts/experiments/sm_vs_binary", "root of runs, cells and results.json")
    results_md: str = field("", "markdown report (results.json and the plots go beside it, <stem>_*.png); empty = "
                                "<output>/results.md")
    backend: Literal["stage", "inprocess"] = field("inprocess", "inprocess = the training loop alone in a process "
                                                                "(pipelines.train.run_local), runs side by side as "
                                                                "Ray tasks; stage = Ray Train (pipelines.train.run)")
    parallel: int = field(2, "runs trained / evaluated at once (inprocess backend; one CPU each)")
    evaluate: bool = field(True, "evaluate every run and write the report (false: train only)")
    command: str = field("", "the command line that ran this experiment (recorded in the report)")
    tokenizer: dict[str, Any] = field(None, "pipelines.tokenizer_train.TokenizerTrainConfig (empty = use "
                                            "preprocess.tokenizer as is); trained once, reused when present",
                                      factory=dict)
    preprocess: dict[str, Any] = field(None, "pipelines.preprocess.PreprocessConfig of the corpus (its tokenizer "
                                             "defaults to tokenizer.output)", factory=dict)
    manifest: str = field("", "use this existing dataset instead of running preprocess")
    train: dict[str, Any] = field(None, "workers.train_config.TrainConfig base of every run (mode, run_name, steps, "
                                        "seed, objective.kind, data.manifest are set per run)", factory=dict)
    continue_train: dict[str, Any] = field(None, "overrides of `train` for the continued runs (e.g. optim.lr)",
                                           factory=dict)
    eval: dict[str, Any] = field(None, "pipelines.evaluate.EvalConfig of every run (checkpoint/manifest/seed set "
                                       "per run)", factory=dict)
    grid: GridSection = field(None, "the runs", factory=GridSection)

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(bool(self.manifest) or bool(self.preprocess), "preprocess", "give preprocess (or manifest)")
        require(self.parallel >= 1, "parallel", "must be >= 1")
        for k in ("checkpoint", "manifest"):
            require(k not in self.eval, f"eval.{k}", "is set per run")

    @property
    def report_path(self) -> Path:
        return Path(self.results_md) if self.results_md else Path(self.output) / "results.md"


@dataclass
class Cell:
    objective: str
    budget: str            # base | continued | warm | iso_update | iso_compute | flop_matched
    seed: int
    steps: int
    init: str = ""         # continued runs: the base export they start from
    init_omega_s: float = 0.0  # warm runs: the SM head's initial ω_s (0 = the model default, the paper's 1e-6)

    @property
    def name(self) -> str:
        warm = f"{self.init_omega_s:g}" if self.budget == "warm" else ""
        return f"{self.objective}-{self.budget}{warm}-s{self.seed}"


# ------------------------------------------------------------------------------------------------ budgets
def extra_flop_fraction(model_config: dict, objective: str, p_sm: float, rows: int, seq_len: int) -> float:
    """Measured extra training FLOPs of a two-pass objective vs binary: p · (F_two / F_one − 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import ModelConfig, build_model
    from models.objective import ObjectiveConfig, training_loss

    if objective == "binary":
        return 0.0
    model = build_model(ModelConfig.from_dict(model_config))
    x0 = torch.randint(0, model.config.mask_token_id, (rows, seq_len))
    obj = ObjectiveConfig(kind=objective, p_sm=p_sm)
    flops = {}
    for two in (False, True):
        with FlopCounterMode(display=False) as fc:
            loss, _ = training_loss(model, x0, obj, seed=0, step=0, two_pass=two)
            loss.backward()
        flops[two] = fc.get_total_flops()
        model.zero_grad(set_to_none=True)
    return p_sm * (flops[True] / flops[False] - 1.0)


def base_cell(cfg: ExperimentConfig) -> Cell:
    return Cell("binary", "base", cfg.grid.base_seed, cfg.grid.base_steps)


def plan_cells(cfg: ExperimentConfig, fractions: dict[str, float], base_export: str) -> list[Cell]:
    """The continued runs (seed-major: a run cut short still holds complete seed sets), then the from-scratch ones."""
    g = cfg.grid
    cells = [Cell(obj, "continued", seed, g.continued_steps, base_export) for seed in g.seeds for obj in g.objectives]
    cells += [Cell("sm", "warm", seed, g.continued_steps, base_export, w) for w in g.sm_warm_starts for seed in g.seeds]
    for b in BUDGETS:
        if b not in g.scratch_budgets:
            continue
        for obj in g.objectives:
            if obj == "binary" and b != "iso_update":
                continue  # binary's budget is the same in all three: trained once, the reference of each
            steps = {"iso_update": g.scratch_steps, "iso_compute": g.scratch_steps // 2,
                     "flop_matched": round(g.scratch_steps / (1.0 + fractions[obj]))}[b]
            cells += [Cell(obj, b, seed, max(1, steps)) for seed in g.seeds]
    return cells


# ------------------------------------------------------------------------------------------------ training
def train_config(cfg: ExperimentConfig, cell: Cell, manifest: str, out: Path):
    from infra.config import apply_overrides
    from workers.train_config import TrainConfig

    base = json.loads(json.dumps(cfg.train))
    if cell.init:
        flat = [f"{k}={json.dumps(v)}" for k, v in _flatten(cfg.continue_train).items()]
        base = apply_overrides(base, flat)
    if cell.init_omega_s:
        base = apply_overrides(base, [f"model.overrides.softmask_init_scale={cell.init_omega_s}"])
    base.update(run_name=f"{cfg.name}-{cell.name}", seed=cell.seed, steps=cell.steps,
                output_dir=str(out / "cells" / cell.name))
    base.setdefault("objective", {})["kind"] = cell.objective
    base.setdefault("data", {})["manifest"] = manifest
    base.setdefault("checkpoint", {}).setdefault("storage_path", str(out / "runs"))
    if cell.init:
        base.update(mode="continue", init_checkpoint=cell.init)
    return from_dict(TrainConfig, base)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _trained(tcfg) -> str | None:
    """The run's export when it holds the finished run (same steps and objective), else None."""
    export = Path(tcfg.resolved_output_dir, "export")
    if (export / "config.json").is_file():
        meta = json.loads((export / "config.json").read_text()).get("metadata", {})
        if meta.get("step") == tcfg.steps and meta.get("objective") == tcfg.objective.kind:
            return str(export)
    return None


def train_run(tcfg_dict: dict, backend: str) -> dict:
    """Train one run (a Ray task for the inprocess backend); returns {"export", "train_s"}."""
    from workers.train_config import TrainConfig

    tcfg = TrainConfig.from_dict(tcfg_dict)
    t0 = time.perf_counter()
    if backend == "inprocess":
        from pipelines.train import run_local

        res = run_local(tcfg)
    else:
        from pipelines.train import run as stage_run

        res = stage_run(tcfg, progress=False)
    return {"export": res.export_uri, "train_s": time.perf_counter() - t0}


def _map(fn, args: list[tuple], parallel: int, cpus: float = 1.0) -> list:
    """fn(*a) for every a: as Ray tasks (``parallel`` at once, a fresh worker process each) when parallel > 1."""
    if parallel <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    import ray

    task = ray.remote(num_cpus=cpus, max_calls=1)(fn)
    pending, results, queue = {}, {}, list(enumerate(args))
    while queue or pending:
        while queue and len(pending) < parallel:
            i, a = queue.pop(0)
            pending[task.remote(*a)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = ray.get(ref)
    return [results[i] for i in range(len(args))]


def train_cells(cfg: ExperimentConfig, cells: list[Cell], manifest: str, out: Path) -> dict[str, dict]:
    """{cell name: {"export", "train_s"}}: trains what is not trained yet."""
    done, todo = {}, []
    for cell in cells:
        tcfg = train_config(cfg, cell, manifest, out)
        export = _trained(tcfg)
        if export:
            done[cell.name] = {"export": export, "train_s": None}
        else:
            todo.append((cell, tcfg))
    for cell, _ in todo:
        log.info("run %s: training %d steps (%s)", cell.name, cell.steps, cfg.backend)
    parallel = cfg.parallel if cfg.backend == "inprocess" else 1
    results = _map(train_run, [(t.to_dict(), cfg.backend) for _, t in todo], parallel)
    done.update({cell.name: r for (cell, _), r in zip(todo, results)})
    return done


# ------------------------------------------------------------------------------------------------ data
def prepare_data(cfg: ExperimentConfig) -> str:
    """Train the tokenizer (once) and build the dataset (idempotent preprocessing stage); returns the manifest."""
    if cfg.manifest:
        return cfg.manifest
    from pipelines import preprocess as pp

    pcfg = dict(cfg.preprocess)
    if cfg.tokenizer:
        from pipelines.tokenizer_train import TokenizerTrainConfig
        from pipelines.tokenizer_train import run as tok_run

        tcfg = from_dict(TokenizerTrainConfig, cfg.tokenizer)
        if not Path(tcfg.output, "tokenizer.json").is_file():
            tok_run(tcfg)
        pcfg.setdefault("tokenizer", str(Path(tcfg.output).resolve()))
    pcfg.setdefault("progress", False)
    return pp.run(from_dict(pp.PreprocessConfig, pcfg)).root


# ------------------------------------------------------------------------------------------------ evaluation
def eval_code_version() -> str:
    """Hash of the code an evaluation depends on (the models package and the evaluation stage)."""
    from pipelines.lineage import code_version, digest

    return digest(code_version("models"), Path(__file__).with_name("evaluate.py").read_text())


CACHE_KEY = "cache_key.txt"  # beside eval.json: the inputs + code digest it was made from


def eval_run(ecfg_dict: dict, key: str) -> dict:
    """Evaluate one run (a Ray task when parallel); returns the report dict."""
    from pipelines.evaluate import run as evaluate

    report = evaluate(from_dict(EvalConfig, ecfg_dict))
    write_atomic(str(Path(report.output_dir) / CACHE_KEY), key)
    return report.to_dict()


def eval_cells(cfg: ExperimentConfig, cells: list[Cell], trained: dict, manifest: str, out: Path) -> dict[str, dict]:
    """{cell name: eval report}; an evaluation is redone only when its config, checkpoint or code changed."""
    version = eval_code_version()
    reports, todo = {}, []
    for cell in cells:
        ecfg = from_dict(EvalConfig, {**cfg.eval, "checkpoint": trained[cell.name]["export"], "manifest": manifest,
                                      "seed": cell.seed, "tag": cell.name,
                                      "output_dir": str(out / "cells" / cell.name / "eval")})
        key = config_hash({"eval": to_dict(ecfg), "code": version, "export": _export_digest(ecfg.checkpoint)})
        where = Path(ecfg.output_dir)
        if (where / "eval.json").is_file() and (where / CACHE_KEY).is_file() and \
                (where / CACHE_KEY).read_text() == key:
            reports[cell.name] = json.loads((where / "eval.json").read_text())
        else:
            todo.append((cell, (to_dict(ecfg), key)))
    results = _map(eval_run, [a for _, a in todo], cfg.parallel if cfg.backend == "inprocess" else 1)
    reports.update({cell.name: r for (cell, _), r in zip(todo, results)})
    return reports


def omega_gradient(export: str, manifest: str, objective: dict, rows: int, batch: int, seed: int = 0) -> dict:
    """∂L/∂(raw ω_s) of the two-pass SM loss at the run's final weights, one value per held-out batch: its mean, std
    and signal-to-noise ratio say whether the loss pushes the SM head open (mean < 0), closed (mean > 0) or nowhere
    (|mean| well under std / √batches)."""
    import numpy as np
    import torch

    from models import load_pretrained
    from models.objective import ObjectiveConfig, training_loss
    from workers.shard_io import DatasetManifest, read_split_table

    m = DatasetManifest.load(manifest)
    val = np.asarray(read_split_table(m, "validation").column("input_ids").to_pylist()[:rows], dtype=np.int64)
    model = load_pretrained(export)
    obj = ObjectiveConfig(**{**objective, "kind": "sm"})
    grads = []
    for i, b in enumerate(range(0, len(val) - batch + 1, batch)):
        model.zero_grad(set_to_none=True)
        loss, _ = training_loss(model, torch.as_tensor(val[b:b + batch]), obj, seed=seed, step=i, two_pass=True,
                                mask_id=model.mask_id)
        loss.backward()
        grads.append(float(model.sm_head.raw_scale.grad))
    g = np.asarray(grads)
    sd = float(g.std(ddof=1)) if len(g) > 1 else float("nan")
    return {"mean": float(g.mean()), "std": sd, "batches": len(g), "snr": float(g.mean() / (sd / len(g) ** 0.5)),
            "omega_s": float(model.sm_head.omega_s.detach())}


def omega_gradients(cfg: ExperimentConfig, cells: list[Cell], trained: dict, manifest: str, out: Path) -> dict:
    """{SM cell name: omega_gradient(...)}, cached beside each run's evaluation (redone when the export changes)."""
    res = {}
    for cell in (c for c in cells if c.objective == "sm"):
        export = trained[cell.name]["export"]
        f = out / "cells" / cell.name / "omega_grad.json"
        key = _export_digest(export)
        if f.is_file() and json.loads(f.read_text()).get("export_digest") == key:
            res[cell.name] = json.loads(f.read_text())
            continue
        obj = {k: v for k, v in cfg.train.get("objective", {}).items()}
        g = omega_gradient(export, manifest, obj, rows=int(cfg.eval.get("val_rows") or 1024),
                           batch=int(cfg.train.get("micro_batch", 32)))
        res[cell.name] = {**g, "export_digest": key}
        write_atomic(str(f), json.dumps(res[cell.name]))
    return res


def _export_digest(export: str) -> str:
    p = Path(export, "model.safetensors")
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


# ------------------------------------------------------------------------------------------------ driver
def plan_params(model_config: dict) -> int:
    """Parameters of the experiment's model (SM head included)."""
    from models import ModelConfig, build_model

    return build_model(ModelConfig.from_dict(model_config)).num_params()


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def run(cfg: ExperimentConfig) -> dict:
    """Run (or resume) the whole experiment; returns the summary also written to <output>/results.json."""
    from infra.ray_runtime import init_ray

    started = init_ray()  # preprocessing, the training stage and the parallel runs use one Ray
    try:
        return _run(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: ExperimentConfig) -> dict:
    from pipelines.experiment_report import write_results
    from workers.shard_io import DatasetManifest
    from workers.train_config import preflight

    t0 = time.perf_counter()
    hw = hardware()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(cfg)
    data_s = time.perf_counter() - t0
    base = base_cell(cfg)
    probe = train_config(cfg, base, manifest, out)
    probe.run_name = f"{cfg.name}-probe"  # never trained: preflight resolves the model without reading run state
    plan = preflight(probe)
    p_sm = probe.objective.p_sm
    fractions = {o: extra_flop_fraction(plan.model_config, o, p_sm, probe.micro_batch, plan.seq_len)
                 for o in cfg.grid.objectives}
    scratch = [c for c in plan_cells(cfg, fractions, "") if c.budget in BUDGETS]
    trained = train_cells(cfg, [base] + scratch, manifest, out)  # the base and the from-scratch runs side by side
    cells = plan_cells(cfg, fractions, trained[base.name]["export"])
    trained.update(train_cells(cfg, [c for c in cells if c.init], manifest, out))
    cells = [base] + cells
    train_s = time.perf_counter() - t0 - data_s
    if not cfg.evaluate:
        return {"name": cfg.name, "trained": trained, "train_s": train_s}
    reports = eval_cells(cfg, cells, trained, manifest, out)
    grads = omega_gradients(cfg, cells, trained, manifest, out)
    m = DatasetManifest.load(manifest)
    summary = {"name": cfg.name, "config": to_dict(cfg), "manifest": manifest, "backend": cfg.backend,
               "dataset": {"train_rows": m.num_rows("train"), "validation_rows": m.num_rows("validation"),
                           "seq_len": m.seq_len, "tokenizer": m.tokenizer.get("spec"),
                           "vocab_size": m.tokenizer.get("vocab_size"), "train_tokens": m.num_tokens("train")},
               "model_config": plan.model_config, "model_params": plan_params(plan.model_config),
               "extra_flop_fraction": fractions, "p_sm": p_sm,
               "hardware": hw, "data_s": data_s, "train_s": train_s, "wall_s": time.perf_counter() - t0,
               "cells": [{"cell": c.__dict__, "name": c.name, "export": trained[c.name]["export"],
                          "train_s": trained[c.name]["train_s"], "run_dir": str(out / "cells" / c.name),
                          "report": reports[c.name], "omega_grad": grads.get(c.name)} for c in cells]}
    write_atomic(str(out / "results.json"), json.dumps(summary, indent=1, default=float))
    write_results(summary, str(cfg.report_path))
    return summary
