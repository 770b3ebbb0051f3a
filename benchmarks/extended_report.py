"""Write docs/results_extended.md and .json from the JSON that benchmarks/extend_run.py and
benchmarks/sm_loss_landscape.py print (one file each), so the page is regenerated, never edited by hand.

    python benchmarks/extended_report.py --runs s0.json s1.json s2.json --landscape landscape.json \
        --commands "python benchmarks/extend_run.py --cell sm-continued-s0 --steps 10000" ... --out docs/results_extended
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _from_metrics(path: str, every: int) -> dict:
    """A run still training (or stopped): its trajectory and last validation from its cell's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train" and "omega_s" in r]
    traj = [{k: r.get(k) for k in ("step", "omega_s", "omega_b", "gate_open", "lambda_mean")}
            for r in train if r["step"] % every == 0 or r is train[-1]]
    val = [r for r in rows if r.get("kind") == "val"]
    return {"cell": Path(path).parent.name, "steps": traj[-1]["step"], "export": None, "trajectory": traj,
            "final": traj[-1], "val": val[-1] if val else None, "from": "metrics.jsonl (run not finished)"}


def _last_json(path: str) -> dict:
    """The last line of a file that parses as a JSON object (extend_run prints its result last), or the whole file."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    raise SystemExit(f"--runs: {path} holds no JSON result")


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def trajectory_table(runs: list[dict], every: int) -> list[str]:
    steps = sorted({p["step"] for r in runs for p in r["trajectory"] if p["step"] % every == 0})
    by = [{p["step"]: p for p in r["trajectory"]} for r in runs]
    head = "| step | " + " | ".join(f"{r['cell']} ω_s | ω_b | gate-open" for r in runs) + " |"
    out = [head, "|---:|" + "---:|---:|---:|" * len(runs)]
    for s in steps:
        cells = []
        for b in by:
            p = b.get(s)
            cells += [_fmt(p and p["omega_s"]), _fmt(p and p["omega_b"], ".2f"), _fmt(p and p["gate_open"], ".2f")]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def landscape_table(land: dict) -> list[str]:
    grid = [g["omega_s"] for g in land["runs"][0]["grid"]]
    out = ["| export | trained ω_s | ω_a | ω_b | " + " | ".join(f"ω_s={w:g}" for w in grid[1:]) + " | best |",
           "|---|---:|---:|---:|" + "---:|" * len(grid)]
    for r in land["runs"]:
        name = r["export"].removeprefix("artifacts/experiments/")
        diffs = [f"{g['diff_vs_first'] * 1e3:+.2f} ± {g['diff_se'] * 1e3:.2f}" for g in r["grid"][1:]]
        out.append(f"| {name} | {r['trained_omega_s']:.3g} | {r['omega_a']:.2f} | {r['omega_b']:.2f} | "
                   + " | ".join(diffs) + f" | {r['argmin_omega_s']:g} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="extend_run.py outputs (its stdout, one file per run), or "
                    "a run's cells/<cell>/metrics.jsonl while it has not finished")
    ap.add_argument("--landscape", required=True, help="sm_loss_landscape.py output")
    ap.add_argument("--commands", nargs="+", required=True, help="the commands that produced the inputs")
    ap.add_argument("--hardware", default="2-core x86_64 CPU, torch 2.13.0+cpu, one thread per run")
    ap.add_argument("--date", required=True)
    ap.add_argument("--every", type=int, default=500, help="trajectory rows every N steps")
    ap.add_argument("--out", default="docs/results_extended", help="path without suffix: writes .md and .json")
    ap.add_argument("--summary", help="a markdown file: what the figures say, placed after the tables")
    args = ap.parse_args(argv)
    runs = [_from_metrics(p, 250) if p.endswith("metrics.jsonl") else _last_json(p) for p in args.runs]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    for r in runs:  # paths as the repository names them
        if r.get("export"):
            r["export"] = r["export"].removeprefix(root)
    land = _last_json(args.landscape)
    record = {"commands": args.commands, "hardware": args.hardware, "date": args.date, "runs": runs,
              "landscape": land}
    finals = "; ".join(f"{r['cell']} ω_s {r['final']['omega_s']:.3f} at {r['steps']} steps"
                       + (f" (validation PPL bound one-pass / two-pass at step {r['val']['step']}: "
                          f"{r['val']['val_ppl']:.3f} / {r['val']['val_ppl_two_pass']:.3f})" if r.get("val") else "")
                       + ("; still training" if r.get("from") else "") for r in runs)
    md = ["# SM continuations past the experiment's budget", "",
          "Generated by `benchmarks/extended_report.py` from the outputs of the commands below; every point is in "
          "[results_extended.json](results_extended.json).", "",
          "With `grid.continued_steps: 3000` (output `artifacts/experiments/sm_vs_binary`) no SM continuation of "
          "the experiment opened its head. Here those SM runs are continued from their 3,000-step checkpoints with "
          "the same config, data order and noise, each in a folder of its own (the 3,000-step runs stay as they "
          "are; `extend_run.py --config` was `configs/sm_vs_binary.yaml` with those two values):", "", "```",
          *args.commands, "```", "",
          f"{args.hardware}; {args.date}. Trajectories (every {args.every} steps; gate-open = share of masked "
          "positions of the logged batch whose gate σ(ω_a(−H − ω_b)) ≥ ½):", "",
          *trajectory_table(runs, args.every), "",
          f"Final: {finals}. The validation figures are the training loop's (64 validation rows), not the "
          "evaluation stage's 1,024, so they are not comparable with the tables of results.md, which holds the "
          "verdict against binary and self-conditioning runs continued as far.", "",
          "## Where the loss wants ω_s", "",
          "`benchmarks/sm_loss_landscape.py` sets ω_s of a model to each value of a grid (every other weight as "
          "trained) and averages the two-pass SM training loss over 512 held-out rows (16 batches of 32), with the "
          "same t and masks for every value. The table gives the change of that loss against ω_s = 1e-6 (the binary "
          "model), in 10⁻³ nats per token, mean ± standard error over the batches, and the grid value with the "
          "lowest loss:", "", *landscape_table(land), "",
          "Command: `python benchmarks/sm_loss_landscape.py --manifest artifacts/datasets/multisource_bytes_64 "
          "--rows 512 --export <the exports listed>`. `sm_vs_binary_extended/export_s<seed>_<steps>` is a copy of "
          "that extended run's export taken when it had trained that many steps.", ""]
    if args.summary:
        md += ["## What it says", "", Path(args.summary).read_text().strip(), ""]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps({"wrote": [str(out.with_suffix(".md")), str(out.with_suffix(".json"))]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
