"""The soft-masking loss as a function of ω_s, at a model's fixed weights: where the SM head's optimum lies.

    python benchmarks/sm_loss_landscape.py --export artifacts/experiments/sm_vs_binary/cells/sm-continued-s0/export \
        --manifest artifacts/datasets/multisource_bytes_64 --omega-s 0 0.01 0.03 0.07 0.1 0.2 0.4

For every ω_s of the grid the head's scale is set to it (ω_a, ω_b and every other weight as trained) and the
two-pass SM training loss is averaged over held-out batches. Every ω_s sees the same batches with the same t and the
same masks (common random numbers), so the paired difference to the first grid value carries the noise of the
SM feedback's effect only; it is printed with its standard error over batches. A minimum inside the grid at the
trained ω_s says the head sits at its optimum for these weights; a loss still falling at larger ω_s says training
has not yet followed it there. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def landscape(export: str, manifest: str, omegas: list[float], rows: int, batch: int, objective: dict,
              seed: int = 0) -> dict:
    import numpy as np
    import torch

    from models import load_pretrained
    from models.objective import ObjectiveConfig, training_loss
    from workers.shard_io import DatasetManifest, read_split_table

    val = read_split_table(DatasetManifest.load(manifest), "validation").column("input_ids").to_pylist()[:rows]
    val = np.asarray(val, dtype=np.int64)
    model = load_pretrained(export).eval()
    head = model.sm_head
    trained = float(head.omega_s.detach())
    obj = ObjectiveConfig(**{**objective, "kind": "sm"})
    starts = range(0, len(val) - batch + 1, batch)
    losses = np.zeros((len(omegas), len(starts)))  # (grid, batches)
    with torch.no_grad():
        for j, w in enumerate(omegas):
            head.raw_scale.fill_(math.log(max(w, 1e-12) / max(1 - w, 1e-12)))  # ω_s = σ(raw)
            for i, b in enumerate(starts):
                loss, _ = training_loss(model, torch.as_tensor(val[b:b + batch]), obj, seed=seed, step=i,
                                        two_pass=True, mask_id=model.mask_id)
                losses[j, i] = float(loss)
    diff = losses - losses[:1]  # paired with the first grid value
    n = losses.shape[1]
    grid = [{"omega_s": w, "loss": float(losses[j].mean()), "diff_vs_first": float(diff[j].mean()),
             "diff_se": float(diff[j].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}
            for j, w in enumerate(omegas)]
    best = min(grid, key=lambda g: g["loss"])
    return {"export": export, "trained_omega_s": trained, "omega_a": float(head.omega_a.detach()),
            "omega_b": float(head.omega_b.detach()), "batches": n, "batch": batch, "grid": grid,
            "argmin_omega_s": best["omega_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", nargs="+", required=True, help="model export folder(s)")
    ap.add_argument("--manifest", required=True, help="the dataset manifest whose validation split is scored")
    ap.add_argument("--omega-s", nargs="+", type=float, default=[1e-6, 0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3,
                                                                  0.5])
    ap.add_argument("--rows", type=int, default=1024, help="validation rows scored")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--p-sm", type=float, default=0.8)
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args(argv)
    bad = [w for w in args.omega_s if not 0 < w < 1]
    if bad:
        ap.error(f"--omega-s: each value must be in (0, 1), got {bad}")
    for e in args.export:
        if not Path(e, "model.safetensors").is_file():
            ap.error(f"--export: {e} has no model.safetensors")
    out = [landscape(e, args.manifest, args.omega_s, args.rows, args.batch, {"p_sm": args.p_sm, "k": args.k})
           for e in args.export]
    print(json.dumps({"runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
