"""Continue one run of the SM-vs-binary experiment past the experiment's budget, in a folder of its own (the
experiment's runs stay as they are), and print its SM head trajectory as JSON.

    python benchmarks/extend_run.py --config configs/sm_vs_binary.yaml --cell sm-continued-s0 --steps 6000 \
        --out artifacts/experiments/sm_vs_binary_extended

The first call copies the cell's newest checkpoint into ``--out``; a later call with more ``--steps`` resumes from the
newest checkpoint there. The training loop, data order and noise are the experiment's (same seed, same config).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sm_vs_binary.yaml")
    ap.add_argument("--cell", required=True, help="an experiment cell, e.g. sm-continued-s0")
    ap.add_argument("--steps", type=int, required=True, help="total optimizer steps of the extended run")
    ap.add_argument("--out", default="artifacts/experiments/sm_vs_binary_extended")
    ap.add_argument("--every", type=int, default=250, help="trajectory points every N steps")
    args = ap.parse_args(argv)

    from infra.config import from_dict, load_yaml
    from pipelines.experiment import Cell, ExperimentConfig, base_cell, plan_cells, train_config
    from pipelines.train import run_local
    from workers.checkpointing import list_checkpoints

    cfg = from_dict(ExperimentConfig, load_yaml(args.config)["experiment"])
    src_out = Path(cfg.output).resolve()
    base = base_cell(cfg)
    cells = {c.name: c for c in [base] + plan_cells(cfg, {o: 0.0 for o in cfg.grid.objectives},
                                                    str(src_out / "cells" / base.name / "export"))}
    if args.cell not in cells:
        ap.error(f"--cell: {args.cell!r} is not a cell of {args.config} (cells: {sorted(cells)})")
    cell = cells[args.cell]
    src = train_config(cfg, cell, cfg.manifest or str(Path(cfg.preprocess["output"]).resolve()), src_out)
    if args.steps <= src.steps:
        ap.error(f"--steps: must exceed the experiment's {src.steps}")
    out = Path(args.out).resolve()
    tcfg = train_config(cfg, Cell(cell.objective, cell.budget, cell.seed, args.steps, cell.init, cell.init_omega_s),
                        src.data.manifest, out)
    tcfg.checkpoint.storage_path = str(out / "runs")
    run_dir = out / "runs" / tcfg.run_name
    if not list_checkpoints(str(run_dir)):
        found = list_checkpoints(str(Path(src.checkpoint.storage_path) / src.run_name))
        if not found:
            ap.error(f"--cell: {args.cell} has no checkpoint under {src.checkpoint.storage_path}")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found[-1][1], run_dir / Path(found[-1][1]).name)
    res = run_local(tcfg)
    rows = [json.loads(line) for line in Path(res.output_uri, "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if r.get("kind") == "train" and "omega_s" in r]
    traj = [{k: r.get(k) for k in ("step", "omega_s", "omega_b", "gate_open", "lambda_mean")}
            for r in train if r["step"] % args.every == 0 or r is train[-1]]
    val = [r for r in rows if r.get("kind") == "val"]
    print(json.dumps({"cell": args.cell, "steps": args.steps, "export": res.export_uri, "trajectory": traj,
                      "final": traj[-1] if traj else None, "val": val[-1] if val else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
