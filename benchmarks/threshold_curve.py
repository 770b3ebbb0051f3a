"""Quality against parallelism of soft-masked and binary models, random and confidence order; prints one JSON document.

    python benchmarks/threshold_curve.py --arm sm=EXPORT[,EXPORT...] --arm binary=EXPORT[,EXPORT...] \
        --tokenizer TOKENIZER_DIR [--length 64] [--thresholds 0.9 0.8 0.7 0.5 0.3] [--parallel 2 4 8]
        [--samples 32] [--plot FILE]

The curve the soft-masking paper draws for Fast-dLLM-style decoding (its Fig. 4: SM keeps more accuracy as
parallelism grows): for every export of every arm (one export per training seed), ``--samples`` unconditional samples
are decoded in blocks of ``--block`` with
    plain        today's default sampler (ancestral, steps = length): the quality reference
    plain-xK     ancestral with K tokens per step (steps = length / K) for each K of ``--parallel``: parallelism
                 in random order, the paper's own NFE knob (it evaluates steps = L/2, L/4), which does not lean on
                 the model's confidence order
    confidence   one token per step in confidence order (the threshold rule's limit at 1.0)
    thrX         threshold decoding at each of ``--thresholds`` (every position of the block whose drawn token has
                 probability >= X, at least one per step)
all with the model's own SM head on (a binary model's is closed), temperature 1, nucleus 0.9. Per decode: NFE,
tokens per forward, gen-PPL under the evaluator LM, and two signs of degenerate text that gen-PPL alone hides:
``space_share`` (share of whitespace among the decoded characters) and ``top_token_share`` (share of the most
frequent generated token). Per arm and setting: mean and sample sd over the arm's exports; per setting, each arm
against the first (``--arm`` order): the difference of means and whether it exceeds twice the pooled sd ("beyond seed
spread", the rule of the experiment report) on gen-PPL and on tokens per forward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from bench_decode import decode_scored, pick_device, with_context  # noqa: E402  (one decode, timing, score)
from models.evaluation.evaluator_lm import load_evaluator  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402


def settings(thresholds: list[float], parallel: list[int] = ()) -> dict[str, dict]:
    """Setting name -> SamplerConfig fields (besides block_length / sampling temperature and nucleus);
    ``tokens_per_step`` K sets steps = length / K (otherwise steps = length)."""
    out = {"plain": dict(algorithm="ancestral")}
    out.update({f"plain-x{k}": dict(algorithm="ancestral", tokens_per_step=k) for k in parallel})
    out["confidence"] = dict(algorithm="confidence")
    out.update({f"thr{t:g}": dict(algorithm="threshold", threshold=t) for t in thresholds})
    return out


def decode(model, tok, ev, name: str, fields: dict, args) -> dict:
    out, texts, scored = decode_scored(model, tok, ev, fields, args.length, args)
    return {"setting": name, "nfe": out.nfe, "tokens_per_forward": round(args.length / out.nfe, 3), **scored,
            "example": texts[0][:60]}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarise(runs: dict[str, list[dict]], names: list[str]) -> dict:
    """Per arm and setting: mean / sd over exports; per setting, every arm against the first arm."""
    table: dict = {}
    metrics = ("gen_ppl", "tokens_per_forward", "nfe", "space_share", "top_token_share")
    for arm, rows in runs.items():
        for name in names:
            vals = [r for r in rows if r["setting"] == name]
            table.setdefault(name, {})[arm] = {m: [round(v, 4) for v in _mean_sd([r[m] for r in vals])]
                                               for m in metrics} | {"n": len(vals)}
    arms = list(runs)
    comparisons = []
    for name in names:
        for other in arms[1:]:
            for m in ("gen_ppl", "tokens_per_forward"):
                (ma, sa), (mb, sb) = table[name][arms[0]][m], table[name][other][m]
                pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)  # nan with one export on a side
                if math.isnan(pooled):
                    z, verdict = None, "not testable"
                else:
                    z = abs(ma - mb) / pooled if pooled > 0 else (0.0 if ma == mb else math.inf)
                    verdict = "beyond seed spread" if z > 2 else "within seed spread"
                comparisons.append({"setting": name, "metric": m, arms[0]: ma, other: mb, "difference": round(ma - mb, 4),
                                    "z": None if z is None or math.isinf(z) else round(z, 2), "verdict": verdict})
    return {"table": table, "comparisons": comparisons}


def plot(summary: dict, names: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    families = {"random order": [n for n in names if n.startswith("plain")],
                "confidence order": [n for n in names if not n.startswith("plain")]}
    for arm in next(iter(summary["table"].values())):
        for (family, members), marker in zip(families.items(), ("o", "s")):
            if not members:
                continue
            cells = [summary["table"][n][arm] for n in members]
            xs = [c["tokens_per_forward"][0] for c in cells]
            ys = [c["gen_ppl"][0] for c in cells]
            es = [0 if math.isnan(c["gen_ppl"][1]) else c["gen_ppl"][1] for c in cells]
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=f"{arm}, {family}")
            for x, y, n in zip(xs, ys, members):
                ax.annotate(n, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("tokens per forward (parallelism)")
    ax.set_ylabel("gen-PPL (mean ± sd over seeds)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def parse_arms(values: list[str]) -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for v in values:
        name, sep, dirs = v.partition("=")
        if not sep or not name or not dirs:
            raise ValueError(f"--arm must be NAME=EXPORT[,EXPORT...], got {v!r}")
        if name in arms:
            raise ValueError(f"--arm {name!r} given twice")
        paths = [d for d in dirs.split(",") if d]
        missing = [d for d in paths if not os.path.isfile(os.path.join(d, "config.json"))]
        if missing:
            raise ValueError(f"--arm {name}: no export (config.json) at {missing[0]}")
        arms[name] = paths
    return arms


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=EXPORT[,EXPORT...] (one export per seed); "
                                                                  "the first arm is the one the others are compared to")
    p.add_argument("--tokenizer", required=True, help="the exports' tokenizer (a dataset's tokenizer dir, or gpt2)")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.5, 0.3])
    p.add_argument("--parallel", type=int, nargs="*", default=[2, 4, 8],
                   help="tokens per step of the random-order (ancestral) settings plain-xK; none: only plain")
    p.add_argument("--evaluator", default="smollm2-135m")
    p.add_argument("--ppl-context", type=int, default=128, help="evaluator context (tokens) of gen-PPL")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--plot", default=None, help="also write gen-PPL against tokens per forward, per arm, here (PNG)")
    args = p.parse_args(argv)
    try:
        arms = parse_arms(args.arm)
    except ValueError as e:
        p.error(str(e))
    if not all(0 < t <= 1 for t in args.thresholds):
        p.error(f"--thresholds must be in (0, 1], got {args.thresholds}")
    if args.length < 1 or args.samples < 1 or args.block < 1:
        p.error("--length, --samples and --block must be >= 1")
    if not all(1 < k <= args.length for k in args.parallel):
        p.error(f"--parallel must be tokens per step in (1, --length], got {args.parallel}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    tok = load_tokenizer(args.tokenizer)
    ev = load_evaluator(args.evaluator, device=args.device)
    decodes = settings(args.thresholds, args.parallel)
    runs: dict[str, list[dict]] = {}
    for arm, exports in arms.items():
        for export in exports:
            model = with_context(models.load_pretrained(export).to(args.device).eval(), args.length)
            for name, fields in decodes.items():
                r = {"arm": arm, "export": export, **decode(model, tok, ev, name, fields, args)}
                runs.setdefault(arm, []).append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    summary = summarise(runs, list(decodes))
    if args.plot:
        plot(summary, list(decodes), args.plot)
    out = {"benchmark": "threshold_curve", "arms": arms, "length": args.length, "block": args.block,
           "parallel": args.parallel,
           "samples": args.samples, "seed": args.seed, "evaluator": ev.info().get("description"),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else None,
           **summary, "runs": runs}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
