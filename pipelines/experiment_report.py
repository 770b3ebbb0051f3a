"""The report of the SM-vs-binary experiment: ``docs/results.md`` (tables, plots, verdicts) and ``docs/results.json``
(one record per run), both regenerated from the experiment's summary.

    write_results(summary, "docs/results.md")   # summary = pipelines.experiment.run(...) result

Every continuation is compared with the binary continuation of the same length (the reference). A verdict says, per
metric and NFE, whether the difference of the seed means exceeds twice the pooled seed standard deviation ("beyond
seed spread"); with fewer than two seeds per side it is "not testable".
"""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

from infra.storage import write_atomic

LOWER_IS_BETTER = {"val_ppl": True, "val_ppl_two_pass": True, "gen_ppl": True, "mauve": False, "entropy": False}
SAMPLE_METRICS = ("gen_ppl", "mauve", "entropy", "lambda_mean", "nfe")
OPEN_OMEGA_S = 0.1  # an SM head counts as open when its final ω_s is at least this


# ------------------------------------------------------------------------------------------------ records
def _rel(path: str | None) -> str | None:
    """A local path under the working directory as a relative one (the report names places in the repository),
    also when it was recorded through a symlinked folder of it (e.g. ``artifacts`` on another disk)."""
    if not path or "://" in path:
        return path
    p, cwd = Path(path).resolve(), Path.cwd()
    roots = [(cwd.resolve(), Path())] + [(e.resolve(), Path(e.name)) for e in cwd.iterdir() if e.is_symlink()]
    for root, name in sorted(roots, key=lambda r: -len(str(r[0]))):
        if p.is_relative_to(root):
            return str(name / p.relative_to(root))
    return path


def arm(cell: dict) -> str:
    """The group a run belongs to: objective and budget (warm starts carry their initial ω_s)."""
    if cell["budget"] == "warm":
        return f"sm-warm{cell['init_omega_s']:g}"
    return cell["objective"] if cell["budget"] == "continued" else f"{cell['objective']}-{cell['budget']}"


def record(rec: dict) -> dict:
    """One run of docs/results.json: what it is, its SM head at the end and every metric."""
    c, rep = rec["cell"], rec["report"]
    v, head = rep["validation"], rep.get("sm_head", {})
    metrics = {"val_ppl": v["one_pass"]["ppl_bound"],
               "val_ppl_two_pass": v.get("two_pass", v["one_pass"])["ppl_bound"]}
    for s in rep["sampling"]:
        for m in SAMPLE_METRICS:
            if s.get(m) is not None:
                metrics[f"{m}@nfe{s['steps']}"] = s[m]
    out = {"name": rec["name"], "arm": arm(c), "objective": c["objective"], "budget": c["budget"], "seed": c["seed"],
           "steps": c["steps"], "init_omega_s": c.get("init_omega_s") or None,
           "gate_open": head.get("gate_open"), "share_h_below_0.75": head.get("share_h_below_0.75"),
           "metrics": metrics, "train_s": rec.get("train_s"), "export": _rel(rec["export"])}
    if c["objective"] == "sm":
        out.update({k: head.get(k) for k in ("omega_s", "omega_a", "omega_b")})
        out["omega_grad"] = rec.get("omega_grad")
    return out


def _stats(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd, len(xs)


def _fmt(xs: list[float], digits: int = 2) -> str:
    m, sd, n = _stats(xs)
    if n == 0:
        return "-"
    f = (lambda x: f"{x:.{digits}g}") if digits < 0 else (lambda x: f"{x:.{digits}f}")
    if digits < 0:
        digits = -digits
    return f"{f(m)} ± {f(sd)}" if n > 1 else f(m)


def groups(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{arm: {metric: [value per seed]}} over the continued runs (the base is its own arm)."""
    g: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        for k, x in r["metrics"].items():
            g[r["arm"]][k].append(x)
        g[r["arm"]]["gate_open"].append(r["gate_open"])
        if r["objective"] == "sm":
            g[r["arm"]]["omega_s"].append(r["omega_s"])
    return g


def verdict(g: dict, other: str, metric: str) -> str | None:
    """One line: `other` vs binary on `metric`, with the seed spread."""
    a, b = g.get(other, {}).get(metric), g.get("binary", {}).get(metric)
    if not a or not b:
        return None
    (ma, sa, na), (mb, sb, nb) = _stats(a), _stats(b)
    name = metric.split("@")[0]
    diff = ma - mb
    better = (diff < 0) if LOWER_IS_BETTER.get(name, True) else (diff > 0)
    if na > 1 and nb > 1:
        pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)
        z = abs(diff) / pooled if pooled > 0 else (0.0 if diff == 0 else float("inf"))
        spread = f"{z:.1f}× the pooled seed std {pooled:.3g}"
        sig = "**beyond seed spread**" if z > 2 else "within seed spread"
    else:
        spread, sig = "one seed", "not testable"
    word = "same" if diff == 0 else ("better" if better else "worse")
    return f"| {other} | {metric} | {ma:.4g} | {mb:.4g} | {word} by {abs(diff):.3g} | {spread} | {sig} |"


# ------------------------------------------------------------------------------------------------ plots
def _train_rows(run_dir: str) -> list[dict]:
    f = Path(run_dir, "metrics.jsonl")
    if not f.is_file():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_atomic(str(path), buf.getvalue())


def plots(summary: dict, records: list[dict], stem: Path) -> list[str]:
    """ω_s / ω_b trajectories of every SM run (the paper's Fig. 3b), the base's gate-open share against steps, and
    gen-PPL against NFE per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
    colours = {}
    for rec in summary["cells"]:
        rows = _train_rows(rec["run_dir"])
        if not rows:
            continue
        a = arm(rec["cell"])
        if rec["cell"]["budget"] == "base":
            xs = [r["step"] for r in rows if r.get("gate_open") is not None]
            a3.plot(xs, [r["gate_open"] for r in rows if r.get("gate_open") is not None], lw=0.8)
            continue
        if rec["cell"]["objective"] != "sm":
            continue
        col = colours.setdefault(a, f"C{len(colours)}")
        lab = a if a not in {ln.get_label() for ln in a1.get_lines()} else None
        a1.plot([r["step"] for r in rows], [r["omega_s"] for r in rows], c=col, lw=0.9, label=lab)
        a2.plot([r["step"] for r in rows], [r["omega_b"] for r in rows], c=col, lw=0.9, label=lab)
    a1.axhline(OPEN_OMEGA_S, c="gray", ls=":", lw=0.8)
    a1.set(xlabel="continued-pretraining step", ylabel="ω_s", yscale="log", title="ω_s (λ's ceiling) per SM run")
    a2.set(xlabel="continued-pretraining step", ylabel="ω_b", title="ω_b (gate centre on −H)")
    a3.set(xlabel="base step", ylabel="share of masked rows", title="base: gate-open share at init ω (H ≤ 0.75)")
    a1.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, stem.parent / f"{stem.name}_omega.png")
    plt.close(fig)
    names.append(f"{stem.name}_omega.png")

    g = groups([r for r in records if r["budget"] != "base"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a, m in sorted(g.items()):
        nfes = sorted({int(k.split("@nfe")[1]) for k in m if k.startswith("gen_ppl@")})
        pts = [(n, *_stats(m[f"gen_ppl@nfe{n}"])[:2]) for n in nfes]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                    marker="o", capsize=3, label=a, ls="--" if a == "binary" else "-")
    ref = summary["cells"][0]["report"].get("reference") or {}
    if "gen_ppl" in ref:
        ax.axhline(ref["gen_ppl"], c="gray", ls=":", label="held-out text")
    ax.set(xlabel="NFE (sampling steps)", ylabel="gen-PPL (evaluator)", yscale="log", title="gen-PPL vs NFE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, stem.parent / f"{stem.name}_genppl_vs_nfe.png")
    plt.close(fig)
    return names + [f"{stem.name}_genppl_vs_nfe.png"]


# ------------------------------------------------------------------------------------------------ markdown
def _setup(summary: dict) -> list[str]:
    cfg, g, hw, ds, mc = summary["config"], summary["config"]["grid"], summary["hardware"], summary["dataset"], \
        summary["model_config"]
    first = summary["cells"][0]["report"]
    ev, ref, ecfg = first.get("evaluator", {}), first.get("reference", {}), first.get("config", {})
    return [
        "## Setup", "",
        f"- command: `{cfg.get('command') or 'softmask experiment --config <config>'}`",
        f"- design: one binary base ({g['base_steps']} steps, seed {g['base_seed']}), then every arm continued from it "
        f"for {g['continued_steps']} optimizer steps, seeds {g['seeds']}; arms: {g['objectives']}"
        + (f" and SM warm-started at ω_s ∈ {g['sm_warm_starts']} (ablation)" if g.get("sm_warm_starts") else ""),
        f"- training: backend `{summary['backend']}`; continued lr {cfg['continue_train'].get('optim', {}).get('lr')}, "
        f"SM lr {cfg['train'].get('objective', {}).get('sm_lr')}, p_sm {summary['p_sm']}, "
        f"k {mc.get('softmask_k')}, batch {cfg['train'].get('global_batch')} × {ds['seq_len']} tokens",
        f"- data: {ds['train_rows']:,} train rows / {ds['validation_rows']:,} validation rows of {ds['seq_len']} tokens "
        f"({ds['train_tokens']:,} train tokens); tokenizer `{_rel(ds['tokenizer'])}`, vocab {ds['vocab_size']}",
        f"- model: flavor `{mc.get('flavor')}`, d_model {mc.get('d_model')}, {mc.get('n_layers')} layers, "
        f"{mc.get('n_heads')} heads, {summary.get('model_params', 0) / 1e6:.2f}M parameters",
        "- extra training FLOPs per step vs one-pass (measured): "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["extra_flop_fraction"].items()),
        f"- evaluation: validation ELBO on {ecfg.get('val_rows')} rows × {ecfg.get('elbo_draws')} draws; "
        f"{ecfg.get('num_samples')} unconditional samples per NFE, sampler `{ecfg.get('algorithm')}`, top-p "
        f"{ecfg.get('top_p')} ({ecfg.get('top_p_rule')} rule), time grid 1 → {ecfg.get('t_eps')} then a noise-removal "
        f"forward; gen-PPL and MAUVE ({ecfg.get('mauve_buckets')} buckets, seed {ecfg.get('mauve_seed')}) under "
        f"{ev.get('description', '?')}; held-out text scores gen-PPL {ref.get('gen_ppl', float('nan')):.1f}, "
        f"entropy {ref.get('entropy', float('nan')):.3f}",
        f"- hardware: {hw.get('gpu') or hw.get('processor')}, {hw.get('cpus')} CPUs, torch {hw.get('torch')}, load "
        f"average at start {float(hw.get('load_avg_at_start', float('nan'))):.1f}; date {hw.get('date', '?')}; wall "
        f"{summary['wall_s'] / 60:.0f} min for this invocation (cached runs and evaluations are not redone)", ""]


def _head_section(records: list[dict]) -> list[str]:
    sm = [r for r in records if r["objective"] == "sm"]
    if not sm:
        return []
    L = ["## The SM head", "",
         "Final learned parameters of every SM run, its gate-open share on held-out data (masked positions at "
         "t ~ U(0, 1) whose gate σ(ω_a(−H − ω_b)) ≥ ½), the share of masked positions with H ≤ 0.75 nats, the mean λ "
         "fed back while sampling at the largest NFE, and the ω_s gradient at the final weights (mean ± std over "
         "training batches of the two-pass loss; its signal-to-noise ratio says whether the loss pushes the head).", "",
         "| run | init ω_s | ω_s | ω_a | ω_b | gate-open | H ≤ 0.75 | mean λ (sampling) | ∂L/∂raw ω_s (mean ± std) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sm:
        lam = [v for k, v in sorted(r["metrics"].items(), key=lambda kv: kv[0]) if k.startswith("lambda_mean@")]
        gr = r.get("omega_grad") or {}
        grad = f"{gr['mean']:.2g} ± {gr['std']:.2g} (n={gr['batches']})" if gr else "-"
        L.append(f"| {r['name']} | {r['init_omega_s'] or 1e-6:.0e} | {r['omega_s']:.3g} | {r['omega_a']:.3g} | "
                 f"{r['omega_b']:.3g} | {r['gate_open']:.3f} | {r['share_h_below_0.75']:.3f} | "
                 f"{(lam[-1] if lam else float('nan')):.2g} | {grad} |")
    paper = [r for r in sm if not r["init_omega_s"]]
    opened = [r for r in paper if r["omega_s"] >= OPEN_OMEGA_S]
    L += ["", f"**Head status:** {len(opened)} of {len(paper)} SM continuations from the paper's init ended with "
              f"ω_s ≥ {OPEN_OMEGA_S} (final ω_s " + ", ".join(f"{r['omega_s']:.2g}" for r in paper) + ").", ""]
    grads = [r["omega_grad"] for r in sm if r.get("omega_grad")]
    if grads:
        L.append(f"**ω_s gradient:** |mean| / (std / √n) over held-out batches is "
                 + ", ".join(f"{abs(g['snr']):.2f}" for g in grads)
                 + " for the runs above (≥ 2 would be a push the noise does not explain; the sign of the mean: "
                 + ", ".join("closing" if g["mean"] > 0 else "opening" for g in grads) + ").")
        L.append("")
    for init in sorted({r["init_omega_s"] for r in sm if r["init_omega_s"]}):
        warm = [r["omega_s"] for r in sm if r["init_omega_s"] == init]
        m = sum(warm) / len(warm)
        L.append(f"**Warm start at ω_s = {init:g}:** final ω_s " + ", ".join(f"{w:.3g}" for w in warm)
                 + f" (mean {m:.3g}): the loss " + ("kept the head open and widened it" if m > init else
                                                     "let the head close part of the way") + ".")
        L.append("")
    return L


def markdown(summary: dict, records: list[dict], figs: list[str]) -> str:
    cont = [r for r in records if r["budget"] != "base"]
    g = groups(cont)
    arms = ["binary"] + sorted(a for a in g if a != "binary")
    nfes = sorted({int(k.split("@nfe")[1]) for r in cont for k in r["metrics"] if k.startswith("gen_ppl@")})
    L = [f"# Results: {summary['name']}", "",
         "Generated by the command below (pipelines/experiment.py and pipelines/experiment_report.py); do not edit by "
         "hand. One record per run, every metric: `results.json` beside this file.", ""]
    L += _setup(summary)
    base = [r for r in records if r["budget"] == "base"]
    if base:
        b = base[0]
        L += [f"Base: binary, {b['steps']} steps, val PPL bound {b['metrics']['val_ppl']:.3f}, gate-open share at "
              f"the initial ω {b['gate_open']:.3f} (held-out, t ~ U(0, 1)).", ""]
    L += ["## Validation perplexity bound (ELBO; mean ± std over seeds)", "",
          "Two-pass is the SM headline, as in the paper's code: pass 1 predicts, pass 2 scores the soft-masked input "
          "(self-conditioning likewise); binary's two-pass equals its one-pass.", "",
          "| arm | seeds | PPL one-pass | PPL two-pass | gate-open share | final ω_s |", "|---|---:|---:|---:|---:|---:|"]
    for a in arms:
        m = g[a]
        L.append(f"| {a} | {len(m['val_ppl'])} | {_fmt(m['val_ppl'], 3)} | {_fmt(m['val_ppl_two_pass'], 3)} | "
                 f"{_fmt(m['gate_open'], 3)} | {_fmt(m.get('omega_s', []), -2)} |")
    L += ["", "## Samples per NFE (mean ± std over seeds)", "",
          "NFE = sampling steps; `forwards` = model forwards actually run (unchanged steps are skipped, the "
          "noise-removal forward counts).", "",
          "| arm | NFE | gen-PPL | MAUVE | entropy | mean λ | forwards |", "|---|---:|---:|---:|---:|---:|---:|"]
    for a in arms:
        for n in nfes:
            m = g[a]
            L.append(f"| {a} | {n} | {_fmt(m.get(f'gen_ppl@nfe{n}', []), 1)} | {_fmt(m.get(f'mauve@nfe{n}', []), 3)} | "
                     f"{_fmt(m.get(f'entropy@nfe{n}', []), 3)} | {_fmt(m.get(f'lambda_mean@nfe{n}', []), -2)} | "
                     f"{_fmt(m.get(f'nfe@nfe{n}', []), 1)} |")
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in figs] + [""]
    L += _head_section(records)
    L += ["## Verdict: each arm against the binary continuation", "",
          "| arm | metric | arm mean | binary mean | difference | spread | verdict |", "|---|---|---:|---:|---|---|---|"]
    metrics = ["val_ppl_two_pass", "val_ppl"] + [f"{m}@nfe{n}" for n in nfes for m in ("gen_ppl", "mauve", "entropy")]
    lines = [line for a in arms[1:] for line in (verdict(g, a, m) for m in metrics) if line]
    beyond = [ln.split(" | ")[0][2:] + " " + ln.split(" | ")[1] + " (" + ln.split(" | ")[4] + ")"
              for ln in lines if "beyond seed spread" in ln]
    L[-2:-2] = [f"Beyond seed spread: {len(beyond)} of {len(lines)} comparisons"
                + (": " + "; ".join(beyond) if beyond else "") + ".", ""]
    L += lines
    L += ["", "A 'better' within seed spread is not evidence either way. The evaluator is not the paper's GPT-2 Large "
          "and the model is small, so the absolute numbers are not comparable with the paper's.", ""]
    return "\n".join(L)


def write_results(summary: dict, md_path: str) -> None:
    """Write the markdown report, its plots and ``results.json`` (one record per run) beside it."""
    records = [record(rec) for rec in summary["cells"]]
    stem = Path(md_path).with_suffix("")
    figs = plots(summary, records, stem) if summary["cells"] else []
    doc = {"name": summary["name"], "command": summary["config"].get("command"), "hardware": summary["hardware"],
           "dataset": {**summary["dataset"], "tokenizer": _rel(summary["dataset"].get("tokenizer"))}, "model_config": summary["model_config"], "runs": records}
    write_atomic(str(stem.with_suffix(".json")), json.dumps(doc, indent=1, default=float))
    write_atomic(str(md_path), markdown(summary, records, figs))
