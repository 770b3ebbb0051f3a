"""What `softmask run` prints when the workflow has finished: the stages, what the model is, its evaluation in one
line, the request and the reply, the artifacts, where the logs are, and how to serve the model again.

``summary_lines(records, ...) -> list[str]`` is pure (records are the workflow's stage records, as in lineage.json);
``print_summary`` prints them.
"""
from __future__ import annotations

import json
from datetime import datetime


def _minutes(start: str | None, end: str | None) -> float | None:
    """Minutes between two ISO timestamps of a stage record (None when either is missing)."""
    try:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds() / 60
    except (TypeError, ValueError):
        return None


def model_line(train: dict) -> str | None:
    """What the served model is: its shape and how much training it had (the demo's model is minutes of CPU)."""
    tcfg = train.get("config") or {}
    model = tcfg.get("model") or {}
    overrides = model.get("overrides") or {}
    if not tcfg:
        return None
    shape = ", ".join(f"{k} {overrides[k]}" for k in ("n_layers", "d_model", "max_seq_len") if k in overrides)
    took = _minutes(train.get("started_at"), train.get("finished_at"))
    workers = (tcfg.get("scaling") or {}).get("num_workers")
    where = f" on {workers} Ray Train worker(s)" if workers else ""
    spent = f" in {took:.1f} min" if took is not None else ""
    return (f"model   : {model.get('flavor', '?')} flavor ({shape}), {(tcfg.get('objective') or {}).get('kind', '?')} "
            f"objective, {tcfg.get('steps', '?')} training steps{where}{spent}")


def eval_line(summary: dict) -> str | None:
    """The evaluation report in one line: ELBO perplexity bound, generative perplexity per step budget (and of real
    text), unigram entropy, MAUVE."""
    if not summary:
        return None
    parts = []
    val = (summary.get("validation") or {}).get("one_pass") or {}
    if "ppl_bound" in val:
        parts.append(f"val PPL <= {val['ppl_bound']:.1f} ({val.get('tokens', '?')} tokens)")
    runs = summary.get("sampling") or []
    ref = summary.get("reference") or {}
    evaluator = (summary.get("evaluator") or {}).get("name", "evaluator")
    if runs:
        gen = ", ".join(f"{r['gen_ppl']:.0f} @ {r['nfe']} steps" for r in runs if "gen_ppl" in r)
        real = f" (real text {ref['gen_ppl']:.0f})" if "gen_ppl" in ref else ""
        parts.append(f"gen PPL [{evaluator}] {gen}{real}")
        last = runs[-1]
        if "entropy" in last:
            parts.append(f"entropy {last['entropy']:.2f}" + (f" (real {ref['entropy']:.2f})" if "entropy" in ref
                                                             else ""))
        if "mauve" in last:
            parts.append(f"MAUVE {last['mauve']:.3f} ({last.get('samples', '?')} samples)")
    return "eval    : " + " | ".join(parts) if parts else None


def sm_state_line(records: dict) -> str | None:
    """The served model's soft-mask state in one line: its head (GET /v1/models: ω_s, the gate's entropy threshold
    −ω_b, k) and what the feedback did in the deploy request's decode (mean λ, share of open gates). None without a
    deploy record."""
    dep = records.get("deploy") or {}
    if not dep:
        return None
    head = (dep.get("model_card") or {}).get("soft_mask")
    if head is None:
        return "soft-mask: none (a self-conditioning model)"
    line = (f"soft-mask: ω_s {head['omega_s']:.3g} (largest λ), gate opens below {-head['omega_b']:.2f} nats of "
            f"entropy, top-{head['k']}")
    if head["omega_s"] < 1e-3:
        line += " — at its initial value: this model was not trained long enough for soft-masking to act"
    fed = (dep.get("reply") or {}).get("sm_feedback")
    if fed:
        line += f" | this reply: mean λ {fed['lambda_mean']:.3g}, gate open at {100 * fed['gate_open']:.0f} % of " \
                f"the masked positions it fed"
    elif (dep.get("reply") or {}).get("soft_mask") is False:
        line += " | this reply: decoded with binary masking"
    return line


def summary_lines(records: dict, lineage_uri: str, *, keep_serving: bool, took_s: float | None = None,
                  logs: dict | None = None, serve_port: int = 8000) -> list[str]:
    took = f" in {took_s / 60:.1f} min" if took_s is not None else ""
    out = [f"\n=== softmask run finished{took} ==="]
    for stage, rec in records.items():
        state = "ran" if rec.get("executed") else "skipped (complete)"
        out.append(f"  {stage:<10} {state:<19} {rec.get('dir') or rec.get('url', '')}")
    train, dep = records.get("train", {}), records.get("deploy")
    about = [model_line(train) if train else None, eval_line((records.get("evaluate") or {}).get("summary") or {}),
             sm_state_line(records)]
    about = [line for line in about if line]
    if about:
        out += [""] + about
    if dep:
        choice = (dep["reply"].get("choices") or [{}])[0]
        out += [f"request : {json.dumps(dep['request'])}", f"reply   : {choice.get('text')!r}",
                f"          (nfe={dep['reply'].get('nfe')}, usage={dep['reply'].get('usage')})"]
    out += ["", "artifacts:", f"  dataset      {records['preprocess'].get('manifest')}"]
    if train:
        out += [f"  checkpoint   {train.get('export')}", f"  loss plot    {train.get('plot')}",
                f"  metrics      {train.get('output')}/metrics.jsonl"]
    if "evaluate" in records:
        out.append(f"  eval report  {records['evaluate'].get('report')}")
    out.append(f"  lineage      {lineage_uri}")
    for name, path in (logs or {}).items():
        if path:
            out.append(f"  {name + ' logs':<12} {path}")
    if train:
        out += ["", "serve the model again:",
                f"  softmask serve --checkpoint {train.get('export')} --port {serve_port or 8000}"]
    if dep:
        out += ["", f"endpoint: {dep['url']}/v1/completions" + ("  (kept up: Ctrl-C to stop)" if keep_serving else
                                                                "  (stopping now; --keep-serving keeps it up)")]
    return out


def print_summary(res, *, keep_serving: bool, took_s: float | None = None, logs: dict | None = None,
                  serve_port: int = 8000) -> None:
    print("\n".join(summary_lines(res.records, res.lineage_uri, keep_serving=keep_serving, took_s=took_s, logs=logs,
                                  serve_port=serve_port)), flush=True)
