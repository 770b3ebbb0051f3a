"""Tokens/s against quality from a bench_decode.py result: one panel per length, SM on and off, gen-PPL on a log axis.

    python benchmarks/plot_decode.py --results docs/results_decode.json --out docs/results_decode.png
    python benchmarks/plot_decode.py --results docs/results_decode_seeds.json --out docs/results_decode_seeds.png

``--results`` is one bench_decode.py document (its ``results`` rows) or a collection of them, one per sampling seed
(``runs``: a list of such documents): then each point is the mean over the seeds with ± sd bars on both axes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def points(doc: dict) -> list[dict]:
    """One point per (length, SM, setting): the row itself, or over ``runs`` the mean and sd of tokens/s and gen-PPL."""
    runs = doc.get("runs") or [doc]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run.get("results") or []:
            groups.setdefault((r["length"], r["soft_mask"], r["setting"]), []).append(r)

    def mean_sd(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    out = []
    for (length, sm, setting), rows in groups.items():
        (tps, tps_sd), (ppl, ppl_sd) = mean_sd([r["tokens_per_s"] for r in rows]), mean_sd([r["gen_ppl"] for r in rows])
        out.append({"length": length, "soft_mask": sm, "setting": setting, "tokens_per_s": tps, "tokens_per_s_sd": tps_sd,
                    "gen_ppl": ppl, "gen_ppl_sd": ppl_sd, "n": len(rows)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="docs/results_decode.json", help="bench_decode.py's JSON")
    ap.add_argument("--out", default="docs/results_decode.png")
    args = ap.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        ap.error(f"--results: {path} does not exist")
    rows = points(json.loads(path.read_text()))
    if not rows:
        ap.error(f"--results: {path} holds no 'results' rows (nor 'runs' of them)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for sm, marker in ((True, "o"), (False, "s")):
            sel = [r for r in rows if r["length"] == length and r["soft_mask"] == sm]
            ax.errorbar([r["tokens_per_s"] for r in sel], [r["gen_ppl"] for r in sel],
                        xerr=[r["tokens_per_s_sd"] for r in sel], yerr=[r["gen_ppl_sd"] for r in sel], fmt=marker,
                        capsize=2, label=f"SM {'on' if sm else 'off'}")
            for r in sel:
                ax.annotate(r["setting"], (r["tokens_per_s"], r["gen_ppl"]), fontsize=7, xytext=(3, 2),
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("decoded tokens/s")
        ax.set_ylabel("gen-PPL (lower is better)")
        ax.set_title(f"length {length}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(json.dumps({"wrote": str(out), "points": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
