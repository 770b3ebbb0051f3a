"""The SM-vs-binary experiment: ``softmask experiment configs/sm_vs_binary.yaml`` / ``run(ExperimentConfig)``.

Grid: objective {binary, sm, self_cond} x budget {iso_update, iso_compute, flop_matched} x seeds, plus a continued-
pretraining arm (the binary iso-update checkpoint of each seed -> +K steps binary vs +K steps SM). Binary is the
reference of every budget (its steps are ``base_steps`` in all three), so it is trained once per seed. Budgets:
- iso_update: every objective gets ``base_steps`` optimizer steps;
- iso_compute (the paper's definition): two-pass objectives get half the steps;
- flop_matched: steps / (1 + f), f = the objective's measured extra training FLOP fraction (torch FlopCounterMode on
  one micro-batch, forward + backward, one-pass vs two-pass, weighted by p_sm).
Every cell is trained through the training stage (``pipelines.train.run``: Ray Train + DeepSpeed; ``backend:
inprocess`` trains in this process with ``models.objective.training_loss`` instead) on the real corpus built by the
``tokenizer`` + ``preprocess`` sections, then evaluated with ``pipelines.evaluate.run`` at every NFE budget.
Idempotent: a cell whose eval.json exists (same cell config hash) is not redone; Ray Train resumes a half-trained run.
Writes ``<output>/results.json`` and the markdown report (``results_md``) with its plots.
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

from infra.config import ConfigError, config_hash, field, from_dict, require, to_dict
from pipelines.evaluate import EvalConfig, atomic_write

log = logging.getLogger("softmask.experiment")
OBJECTIVES = ("binary", "sm", "self_cond")
BUDGETS = ("iso_update", "iso_compute", "flop_matched")


@dataclass
class GridSection:
    """Which cells to run."""

    objectives: list[str] = field(None, "objectives compared (binary is the reference)",
                                  factory=lambda: ["binary", "sm", "self_cond"])
    budgets: list[str] = field(None, f"training budgets: {BUDGETS}", factory=lambda: list(BUDGETS))
    seeds: list[int] = field(None, "seeds (data order, noise, init); >= 3 for mean ± std",
                             factory=lambda: [0, 1, 2])
    base_steps: int = field(200, "optimizer steps of the binary reference (iso_update steps for every objective)")
    continued_steps: int = field(0, "continued-pretraining arm: +K steps from the binary iso_update checkpoint with "
                                    "binary and with SM (0 = no arm)")

    def __post_init__(self) -> None:
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        require(not bad and bool(self.objectives), "grid.objectives", f"must be a non-empty subset of {OBJECTIVES}")
        require("binary" in self.objectives, "grid.objectives", "must include binary (the reference)")
        bad = [b for b in self.budgets if b not in BUDGETS]
        require(not bad and bool(self.budgets), "grid.budgets", f"must be a non-empty subset of {BUDGETS}, got {bad}")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "grid.seeds", "must be distinct")
        require(self.base_steps >= 2, "grid.base_steps", "must be >= 2")
        require(self.continued_steps >= 0, "grid.continued_steps", "must be >= 0")


@dataclass
class ExperimentConfig:
    """The ``experiment:`` section."""

    name: str = field("sm_vs_binary", "experiment name (prefix of run names)")
    output: str = field("artifacts/experiments/sm_vs_binary", "root of runs, cells and results.json")
    results_md: str = field("docs/results.md", "markdown report (its plots go next to it, <stem>_*.png)")
    backend: Literal["stage", "inprocess"] = field("stage", "stage = pipelines.train.run (Ray Train + DeepSpeed); "
                                                            "inprocess = a plain loop in this process")
    command: str = field("", "the command line that ran this experiment (recorded in the report)")
    tokenizer: dict[str, Any] = field(None, "pipelines.tokenizer_train.TokenizerTrainConfig (empty = use "
                                            "preprocess.tokenizer as is); trained once, reused when present",
                                      factory=dict)
    preprocess: dict[str, Any] = field(None, "pipelines.preprocess.PreprocessConfig of the corpus (its tokenizer "
                                             "defaults to tokenizer.output)", factory=dict)
    manifest: str = field("", "use this existing dataset instead of running preprocess")
    train: dict[str, Any] = field(None, "workers.train_config.TrainConfig base of every cell (mode, run_name, steps, "
                                        "seed, objective.kind, data.manifest are set per cell)", factory=dict)
    eval: dict[str, Any] = field(None, "pipelines.evaluate.EvalConfig of every cell (checkpoint/manifest/seed set "
                                       "per cell)", factory=dict)
    grid: GridSection = field(None, "the grid", factory=GridSection)

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(bool(self.manifest) or bool(self.preprocess), "preprocess", "give preprocess (or manifest)")
        for k in ("checkpoint", "manifest"):
            require(k not in self.eval, f"eval.{k}", "is set per cell")


@dataclass
class Cell:
    objective: str
    budget: str            # iso_update | iso_compute | flop_matched | continued
    seed: int
    steps: int
    init: str = ""         # continued arm: the binary export it starts from

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.budget}-s{self.seed}"


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


def plan_cells(cfg: ExperimentConfig, fractions: dict[str, float]) -> list[Cell]:
    """Budget-major order (binary for every seed, then each objective x budget for every seed), so that a run cut
    short still holds complete seed sets of the first budgets."""
    g = cfg.grid
    cells = [Cell("binary", "iso_update", seed, g.base_steps) for seed in g.seeds]
    for b in BUDGETS:
        if b not in g.budgets:
            continue
        for obj in g.objectives:
            if obj == "binary":
                continue
            steps = {"iso_update": g.base_steps, "iso_compute": g.base_steps // 2,
                     "flop_matched": round(g.base_steps / (1.0 + fractions[obj]))}[b]
            cells += [Cell(obj, b, seed, max(1, steps)) for seed in g.seeds]
    if g.continued_steps:
        for seed in g.seeds:
            for obj in ("binary", "sm"):
                cells.append(Cell(obj, "continued", seed, g.continued_steps))
    return cells


# ------------------------------------------------------------------------------------------------ training
def _train_cfg(cfg: ExperimentConfig, cell: Cell, manifest: str, out: Path):
    from workers.train_config import TrainConfig

    base = json.loads(json.dumps(cfg.train))
    base.update(run_name=f"{cfg.name}-{cell.name}", seed=cell.seed, steps=cell.steps,
                output_dir=str(out / "cells" / cell.name))
    base.setdefault("objective", {})["kind"] = cell.objective
    base.setdefault("data", {})["manifest"] = manifest
    base.setdefault("checkpoint", {}).setdefault("storage_path", str(out / "runs"))
    if cell.budget == "continued":
        base.update(mode="continue", init_checkpoint=cell.init)
    return from_dict(TrainConfig, base)


def train_inprocess(tcfg, manifest_uri: str) -> str:
    """A plain single-process loop (no EMA) with the same objective, seeds and export layout as the stage."""
    import numpy as np
    import torch

    from models import ModelConfig, build_model, load_pretrained, save_pretrained
    from models.objective import ObjectiveConfig, training_loss
    from models.optim import param_groups
    from workers.shard_io import DatasetManifest, read_split_table
    from workers.train_config import preflight

    plan = preflight(tcfg)
    export = f"{tcfg.resolved_output_dir.rstrip('/')}/export"
    if Path(export, "config.json").is_file():
        meta = json.loads(Path(export, "config.json").read_text()).get("metadata", {})
        if meta.get("step") == tcfg.steps and meta.get("objective") == tcfg.objective.kind:
            return export
    torch.manual_seed(tcfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(ModelConfig.from_dict(plan.model_config))
    if tcfg.init_checkpoint:
        init = load_pretrained(tcfg.init_checkpoint)
        keep = {k: v for k, v in init.state_dict().items() if not k.startswith(("sm_head.", "sc_proj."))}
        model.load_state_dict(keep, strict=False)
    model.to(device)
    rows = np.asarray(read_split_table(DatasetManifest.load(manifest_uri), "train").column("input_ids").to_pylist())
    o = tcfg.objective
    obj = ObjectiveConfig(kind=o.kind, p_sm=o.p_sm, schedule=o.schedule)
    opt = torch.optim.AdamW(param_groups(model, tcfg.optim.lr, tcfg.optim.weight_decay, o.sm_lr))
    warmup = max(0, int(tcfg.optim.warmup_steps))  # linear warm-up, then constant (as the stage's default)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    rng = np.random.default_rng(tcfg.seed)
    order = rng.permutation(len(rows))
    model.train()
    for step in range(tcfg.steps):
        idx = [order[(step * tcfg.global_batch + i) % len(rows)] for i in range(tcfg.global_batch)]
        x0 = torch.as_tensor(rows[idx], dtype=torch.long, device=device)
        loss, _ = training_loss(model, x0, obj, seed=tcfg.seed, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, tcfg.steps // 5) == 0:
            log.info("%s: step %d/%d loss %.4f", tcfg.run_name, step + 1, tcfg.steps, float(loss))
    save_pretrained(model.cpu().eval(), export, metadata={"objective": o.kind, "step": tcfg.steps, "run_name":
                                                    tcfg.run_name, "mode": tcfg.mode, "trainer": "inprocess"})
    return export


def train_cell(cfg: ExperimentConfig, cell: Cell, manifest: str, out: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    tcfg = _train_cfg(cfg, cell, manifest, out)
    if cfg.backend == "inprocess":
        return train_inprocess(tcfg, manifest), time.perf_counter() - t0
    from pipelines.train import run as train_run

    res = train_run(tcfg)
    return res.export_uri, time.perf_counter() - t0


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


# ------------------------------------------------------------------------------------------------ driver
def _cell_eval(cfg: ExperimentConfig, cell: Cell, export: str, manifest: str, out: Path):
    from pipelines.evaluate import run as eval_run

    ecfg = from_dict(EvalConfig, {**cfg.eval, "checkpoint": export, "manifest": manifest, "seed": cell.seed,
                                  "tag": cell.name, "output_dir": str(out / "cells" / cell.name / "eval")})
    return eval_run(ecfg).to_dict()


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def run(cfg: ExperimentConfig) -> dict:
    """Run (or resume) the whole grid; returns the results dict also written to <output>/results.json."""
    started = False
    if cfg.backend == "stage" or not cfg.manifest:  # one Ray for preprocessing and every training run
        from infra.ray_runtime import init_ray

        started = init_ray()
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
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(cfg)
    data_s = time.perf_counter() - t0
    probe = _train_cfg(cfg, Cell("binary", "iso_update", cfg.grid.seeds[0], 1), manifest, out)
    probe.run_name = f"{cfg.name}-probe"  # never trained: preflight resolves the model without reading run state
    plan = preflight(probe)
    p_sm = probe.objective.p_sm
    fractions = {o: extra_flop_fraction(plan.model_config, o, p_sm, probe.micro_batch, plan.seq_len)
                 for o in cfg.grid.objectives}
    cells = plan_cells(cfg, fractions)
    done_path = out / "cells.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    results = []
    for cell in cells:
        if cell.budget == "continued":
            cell.init = str(out / "cells" / f"binary-iso_update-s{cell.seed}" / "export")
        key = config_hash({"cell": cell.__dict__, "train": cfg.train, "eval": cfg.eval, "manifest": manifest})
        if key in done:
            results.append(done[key])
            continue
        log.info("cell %s: training %d steps (%s)", cell.name, cell.steps, cfg.backend)
        export, train_s = train_cell(cfg, cell, manifest, out)
        t1 = time.perf_counter()
        rep = _cell_eval(cfg, cell, export, manifest, out)
        rec = {"cell": cell.__dict__, "export": export, "train_s": train_s, "eval_s": time.perf_counter() - t1,
               "report": rep}
        results.append(rec)
        done[key] = rec
        atomic_write(done_path, json.dumps(done, indent=1))
    m = DatasetManifest.load(manifest)
    summary = {"name": cfg.name, "config": to_dict(cfg), "manifest": manifest, "backend": cfg.backend,
               "dataset": {"train_rows": m.num_rows("train"), "validation_rows": m.num_rows("validation"),
                           "seq_len": m.seq_len, "tokenizer": m.tokenizer.get("spec"),
                           "vocab_size": m.tokenizer.get("vocab_size"), "train_tokens": m.num_tokens("train")},
               "model_config": plan.model_config, "extra_flop_fraction": fractions, "p_sm": p_sm,
               "hardware": hardware(), "data_s": data_s, "wall_s": time.perf_counter() - t0,
               "cells": results}
    atomic_write(out / "results.json", json.dumps(summary, indent=1, default=float))
    write_results(summary, cfg.results_md)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.experiment CONFIG.yaml [experiment.key=value ...]``"""
    from infra.config import apply_overrides, load_yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main.__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data = apply_overrides(load_yaml(argv[0]), argv[1:])
    if "experiment" not in data:
        raise ConfigError(f"{argv[0]}: needs an `experiment:` section")
    sec = dict(data["experiment"])
    sec.setdefault("command", "python -m pipelines.experiment " + " ".join(argv))
    summary = run(from_dict(ExperimentConfig, sec, "experiment"))
    print(json.dumps({"results_md": sec.get("results_md", "docs/results.md"), "wall_s": summary["wall_s"],
                      "cells": len(summary["cells"])}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
