"""Evaluation stage: ``run(EvalConfig) -> EvalReport`` (``softmask eval --checkpoint ...``).

    from pipelines.evaluate import EvalConfig, run
    report = run(EvalConfig(checkpoint="runs/x/output/export", manifest="artifacts/datasets/d"))

Measures, for one exported checkpoint (models.load_pretrained):
- the validation NLL / perplexity bound (MDLM ELBO) on the dataset's held-out split, single-pass and, for SM and
  self-conditioning models, two-pass; optionally on extra held-out text files (e.g. the Wikipedia sample);
- for every sampling budget (NFE): N unconditional samples (and optional prompted ones), their generative
  perplexity under the named evaluator LM, MAUVE against held-out real text (evaluator last-token features, fixed
  buckets and seed), unigram entropy, and sampling throughput / NFE.
Samples run as Ray tasks across the cluster when Ray is initialised (or ``use_ray: on``), in-process otherwise; the
chunk seeds are the same either way, so both paths give the same tokens.
Writes ``eval.json``, ``eval.md`` and ``eval_nfe.png`` (atomic) into ``output_dir`` (default: ``eval/`` next to the
checkpoint directory).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from infra.config import ConfigError, field, require, to_dict
from infra.storage import write_atomic


@dataclass
class EvalConfig:
    """The ``eval:`` section."""

    checkpoint: str = field("", "export directory (config.json + model.safetensors) to evaluate")
    manifest: str = field("", "dataset (manifest.json dir) whose validation split and tokenizer are used")
    output_dir: str = field("", "where eval.json/eval.md/plots go; empty = <checkpoint parent>/eval")
    tag: str = field("", "label of this evaluation in the report (e.g. the grid cell)")
    seed: int = field(0, "seed of ELBO noise and of sampling")
    val_rows: int = field(256, "validation rows scored for the ELBO (0 = the whole split)")
    val_batch: int = field(32, "rows per ELBO forward")
    elbo_draws: int = field(2, "independent (t, mask) draws per row averaged in the ELBO estimate")
    two_pass: Literal["auto", "on", "off"] = field("auto", "also report the two-pass ELBO (auto: for sm/self_cond "
                                                           "checkpoints)")
    heldout_texts: list[str] = field(None, "extra held-out text files (paths or corpus://name/file) scored with the "
                                           "ELBO, packed into seq_len rows with the dataset tokenizer", factory=list)
    heldout_rows: int = field(64, "rows per extra held-out file")
    num_samples: int = field(16, "unconditional samples per NFE budget")
    num_prompted: int = field(0, "prompted samples per NFE budget (prompts: the first prompt_tokens of validation "
                                 "rows)")
    prompt_tokens: int = field(32, "prompt length of prompted samples")
    sample_length: int = field(0, "tokens per sample (0 = the dataset seq_len)")
    nfe: list[int] = field(None, "sampling budgets (denoising steps); empty = nfe_fractions x sample_length",
                           factory=list)
    nfe_fractions: list[float] = field(None, "budgets as fractions of sample_length (used when nfe is empty)",
                                       factory=lambda: [0.25, 0.5, 1.0])
    algorithm: str = field("ancestral", "sampler update rule (models.sampling ALGORITHMS)")
    top_p: float = field(0.9, "nucleus mass of the sampling copy (the paper's 0.9; 1 = off); SM feedback reads the "
                              "unfiltered prediction")
    top_p_rule: str = field("mdlm", "nucleus boundary (models.names.TOP_P_RULES): mdlm = the paper's code, dream")
    temperature: float = field(1.0, "softmax temperature of the sampling copy")
    t_eps: float = field(1e-5, "the sampler's time grid runs 1 -> t_eps, then the noise-removal step")
    cache_unchanged: bool = field(True, "skip the forward of a step whose input did not change (the paper's code); "
                                        "the reported NFE counts the forwards that ran")
    soft_mask: Literal["auto", "on", "off"] = field("auto", "feed predictions back while sampling (auto: on for "
                                                            "sm/self_cond checkpoints)")
    transparency: str = field("none", "SM transparency scheduling while sampling (models.sampling TRANSPARENCY: "
                                      "none, linear, stepwise); applies when soft_mask is on")
    block_length: int = field(0, "semi-autoregressive block size of the sampler (0 = one block)")
    threshold: float = field(0.9, "algorithm threshold: reveal every masked position of the block whose drawn token "
                                  "has at least this probability (at least one per step)")
    cache: str = field("none", "key/value cache of block decoding (models.names.CACHE_MODES: none, prefix, dual; "
                               "approximate, see models.kv_cache)")
    sample_chunks: int = field(2, "sampling chunks (one Ray task each; seeds fixed per chunk)")
    use_ray: Literal["auto", "on", "off"] = field("auto", "on: sampling chunks as Ray tasks; off: in-process; auto: "
                                                          "Ray tasks when Ray is initialised or RAY_ADDRESS names a "
                                                          "cluster")
    task_cpus: float = field(0.5, "CPUs reserved per sampling task (fractional on small machines)")
    evaluator: str = field("smollm2-135m", "evaluator causal LM: a packaged name (smollm2-135m) or a local HF dir")
    gen_ppl_context: int = field(128, "evaluator context length (tokens) for generative perplexity")
    eval_batch: int = field(8, "texts per evaluator forward")
    mauve_buckets: int = field(4, "MAUVE quantisation buckets (fixed; reported)")
    mauve_seed: int = field(25, "MAUVE k-means seed (reported)")
    mauve_max_tokens: int = field(128, "evaluator tokens per text for MAUVE features")
    mauve_reference_rows: int = field(0, "held-out real rows used as the MAUVE reference (0 = num_samples)")
    plots: bool = field(True, "write PNG plots")
    device: str = field("auto", "torch device of the model, sampler and evaluator (auto: cuda when available)")

    def __post_init__(self) -> None:
        from models.names import ALGORITHMS, CACHE_MODES, TOP_P_RULES, TRANSPARENCY

        require(bool(self.checkpoint), "checkpoint", "is required (an export directory)")
        require(bool(self.manifest), "manifest", "is required (the dataset whose validation split is scored)")
        require(self.val_rows >= 0, "val_rows", "must be >= 0")
        require(self.val_batch >= 1, "val_batch", "must be >= 1")
        require(self.elbo_draws >= 1, "elbo_draws", "must be >= 1")
        require(self.num_samples >= 0 and self.num_prompted >= 0, "num_samples", "must be >= 0")
        require(self.prompt_tokens >= 1, "prompt_tokens", "must be >= 1")
        require(self.sample_length >= 0, "sample_length", "must be >= 0")
        require(all(n >= 1 for n in self.nfe), "nfe", f"every budget must be >= 1, got {self.nfe}")
        require(bool(self.nfe) or (bool(self.nfe_fractions) and all(0 < f <= 4 for f in self.nfe_fractions)),
                "nfe_fractions", "need nfe or fractions in (0, 4]")
        require(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}, got {self.algorithm!r}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_p_rule in TOP_P_RULES, "top_p_rule", f"must be one of {TOP_P_RULES}, got {self.top_p_rule!r}")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(0 <= self.t_eps < 1, "t_eps", "must be in [0, 1)")
        require(self.transparency in TRANSPARENCY, "transparency",
                f"must be one of {tuple(TRANSPARENCY)}, got {self.transparency!r}")
        require(self.block_length >= 0, "block_length", "must be >= 0 (0 = one block)")
        require(0 < self.threshold <= 1, "threshold", f"must be in (0, 1], got {self.threshold}")
        require(self.cache in CACHE_MODES, "cache", f"must be one of {CACHE_MODES}, got {self.cache!r}")
        require(self.sample_chunks >= 1, "sample_chunks", "must be >= 1")
        require(self.task_cpus > 0, "task_cpus", "must be > 0")
        require(self.gen_ppl_context >= 8, "gen_ppl_context", "must be >= 8")
        require(self.mauve_buckets >= 2, "mauve_buckets", "must be >= 2")
        require(self.heldout_rows >= 1, "heldout_rows", "must be >= 1")


@dataclass
class EvalReport:
    """Everything eval.json holds."""

    tag: str
    checkpoint: str
    objective: str
    model: dict
    evaluator: dict
    config: dict
    validation: dict           # {"one_pass": {nll, ppl_bound, tokens}, "two_pass": {...}?, heldout: {...}}
    sm_head: dict              # the learned ω and the gate-open share on the validation rows (see gate_diagnostics)
    sampling: list[dict]       # one entry per NFE budget
    reference: dict            # the real held-out text's own gen-PPL / entropy (the metrics' ceiling)
    wall_s: float
    output_dir: str

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float))

    def row(self, nfe_index: int = -1) -> dict:
        s = self.sampling[nfe_index] if self.sampling else {}
        return {"val_ppl": self.validation["one_pass"]["ppl_bound"], **s}


# ------------------------------------------------------------------------------------------------ helpers
def resolve_text_path(spec: str) -> Path:
    """A local path, or corpus://name/file (fetched into the cache by pipelines.corpus)."""
    if spec.startswith("corpus://"):
        from pipelines.corpus import ensure_corpus

        name, _, rel = spec[len("corpus://"):].partition("/")
        p = ensure_corpus(name) / rel
    else:
        p = Path(spec).expanduser()
    if not p.is_file():
        raise ConfigError(f"heldout_texts: {spec!r} is not a file")
    return p


def pack_text(tok, text: str, seq_len: int, rows: int) -> np.ndarray:
    """(rows', seq_len) int64: paragraphs EOS-joined and packed (rows' <= rows)."""
    need = rows * seq_len
    ids: list[int] = []
    paras = [p for p in text.split("\n\n") if p.strip()]
    for i in range(0, len(paras), 64):
        for seq in tok.encode_batch(paras[i:i + 64]):
            ids += seq + [tok.eos_id]
        if len(ids) >= need:
            break
    n = min(rows, len(ids) // seq_len)
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def elbo(model, rows: np.ndarray, obj, *, seed: int, batch: int, draws: int, two_pass: bool) -> dict:
    """MDLM ELBO over ``rows`` (N, L): mean weighted NLL per token, its perplexity bound, and the scored tokens."""
    import torch

    from models.objective import validation_nll

    if len(rows) == 0:
        raise ValueError("elbo: no rows to score")
    total, n = 0.0, 0
    x = torch.as_tensor(rows, dtype=torch.long).to(next(model.parameters()).device)
    for d in range(draws):
        for b in range(0, len(x), batch):
            s, k = validation_nll(model, x[b:b + batch], obj, seed=seed + d, step=b // batch, two_pass=two_pass)
            total, n = total + s, n + k
    nll = total / n
    return {"nll": nll, "ppl_bound": math.exp(min(nll, 700.0)), "tokens": n // draws, "draws": draws}


def gate_diagnostics(model, rows: np.ndarray, *, seed: int, batch: int) -> dict:
    """The SM head's learned ω and its gate on held-out data: each row noised at t ~ U(0, 1) (the ELBO's draws), one
    pure-mask forward, and the share of masked positions whose prediction opens the gate, σ(ω_a(−H − ω_b)) >= 0.5
    (H <= −ω_b nats). For a binary model the head keeps its init (ω_b = −0.75): the share then says how much room a
    continued SM run would have. Also the share at the init threshold (H <= 0.75 nats) and the mean entropy."""
    import torch

    from models.objective import ObjectiveConfig, noise_batch
    from models.softmask import entropy_topk

    omega = model.sm_head.values()
    device = next(model.parameters()).device
    x = torch.as_tensor(rows, dtype=torch.long).to(device)
    obj = ObjectiveConfig(kind="binary", antithetic=False)
    neg_h = []
    with torch.no_grad():
        for b in range(0, len(x), batch):
            t, x_t, _ = noise_batch(x[b:b + batch], obj, seed, b // batch, 0, 1, None, model.mask_id)
            z = model(x_t, t, masked_only=True)  # (M, V)
            neg_h.append(entropy_topk(z, 1)[0].cpu())
    h = -torch.cat(neg_h)  # (M,) entropies of the masked positions, nats
    return {**omega, "masked_positions": int(h.numel()), "gate_open": float((h <= -omega["omega_b"]).float().mean()),
            "share_h_below_0.75": float((h <= 0.75).float().mean()), "entropy_mean": float(h.mean())}


# ---------------------------------------------------------------------------------------- sampling (tasks)
def sample_chunk(checkpoint: str, sampler: dict, num: int, length: int, seed: int,
                 prompts: list[list[int]] | None = None, threads: int = 1, device: str = "cpu") -> dict:
    """One sampling chunk; runs in-process or as a Ray task (loads the checkpoint itself)."""
    import torch

    from models import load_pretrained
    from models.sampling import SamplerConfig, sample

    if threads:
        torch.set_num_threads(threads)
    model = load_pretrained(checkpoint).to(device)
    t0 = time.perf_counter()
    out = sample(model, SamplerConfig(**sampler), num_samples=num, length=length, prompt_ids=prompts, seed=seed)
    return {"tokens": out.tokens.tolist(), "nfe": out.nfe, "wall_s": time.perf_counter() - t0,
            "lambda_mean": out.lambda_mean, "gate_open": out.gate_open}


def resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _want_ray(cfg: EvalConfig) -> bool:
    if cfg.use_ray == "off":
        return False
    try:
        import ray
    except ImportError:
        if cfg.use_ray == "on":
            raise
        return False
    if cfg.use_ray == "on" and not ray.is_initialized():
        from infra.ray_runtime import init_ray

        init_ray()
    return ray.is_initialized() or os.environ.get("RAY_ADDRESS", "local") != "local"


def generate(cfg: EvalConfig, sampler: dict, num: int, length: int, prompts=None) -> dict:
    """``num`` samples in ``sample_chunks`` chunks (seed = cfg.seed*1000 + chunk); Ray tasks when a cluster is up."""
    sizes = [len(a) for a in np.array_split(np.arange(num), min(cfg.sample_chunks, num))]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    args = [(cfg.checkpoint, sampler, k, length, cfg.seed * 1000 + i,
             None if prompts is None else prompts[a:a + k]) for i, (a, k) in enumerate(zip(starts, sizes))]
    t0 = time.perf_counter()
    if _want_ray(cfg):
        import ray

        if not ray.is_initialized():
            from infra.ray_runtime import init_ray

            init_ray()
        task = ray.remote(num_cpus=cfg.task_cpus)(sample_chunk)
        parts = ray.get([task.remote(*a, threads=max(1, int(cfg.task_cpus))) for a in args])
        where = "ray"
    else:
        parts = [sample_chunk(*a, threads=0, device=resolve_device(cfg.device)) for a in args]
        where = "in-process"
    wall = time.perf_counter() - t0
    tokens = [row for p in parts for row in p["tokens"]]
    fed = [p for p in parts if p.get("lambda_mean") is not None]
    sm = {k: float(np.mean([p[k] for p in fed])) for k in ("lambda_mean", "gate_open")} if fed else {}
    return {"tokens": tokens, "nfe": float(np.mean([p["nfe"] for p in parts])), "wall_s": wall,
            "compute_s": sum(p["wall_s"] for p in parts), "executor": where, **sm}


def sampler_settings(cfg: EvalConfig, steps: int, soft: bool) -> dict:
    """The models.sampling.SamplerConfig fields of one sampling budget (a plain dict: it crosses the Ray boundary)."""
    return {"steps": steps, "algorithm": cfg.algorithm, "soft_mask": soft,
            "transparency": cfg.transparency if soft else "none", "top_p": cfg.top_p, "top_p_rule": cfg.top_p_rule,
            "temperature": cfg.temperature, "t_eps": cfg.t_eps, "cache_unchanged": cfg.cache_unchanged,
            "block_length": cfg.block_length or None, "threshold": cfg.threshold, "cache": cfg.cache}


# ------------------------------------------------------------------------------------------------ the stage
def _objective_of(model) -> str:
    meta = getattr(model, "checkpoint_metadata", {}) or {}
    if meta.get("objective"):
        return str(meta["objective"])
    return "self_cond" if model.config.self_conditioning else "unknown"


def _text_metrics(ev, texts: list[str], token_rows: list[list[int]], ref_feats, cfg: EvalConfig) -> dict:
    from models.evaluation import generative_perplexity, last_token_features, mauve_score, unigram_entropy

    g = generative_perplexity(ev, texts, context_length=cfg.gen_ppl_context, batch_size=cfg.eval_batch)
    out = {"gen_ppl": g.ppl, "gen_ppl_median": float(np.nanmedian(g.per_text)), "eval_tokens": g.tokens,
           "entropy": unigram_entropy(token_rows)}
    if ref_feats is not None and len(texts) >= cfg.mauve_buckets:
        feats = last_token_features(ev, texts, max_tokens=cfg.mauve_max_tokens, batch_size=cfg.eval_batch)
        m = mauve_score(feats, ref_feats, num_buckets=cfg.mauve_buckets, seed=cfg.mauve_seed)
        out.update(mauve=m.mauve, mauve_buckets=m.num_buckets, mauve_seed=m.seed)
    return out


def run(cfg: EvalConfig) -> EvalReport:
    """Evaluate ``cfg.checkpoint``; writes eval.json / eval.md / eval_nfe.png and returns the report."""
    from models import load_pretrained, read_config
    from models.evaluation import last_token_features, load_evaluator
    from models.objective import ObjectiveConfig
    from models.tokenizer import load_tokenizer
    from workers.shard_io import DatasetManifest, read_split_table

    t0 = time.perf_counter()
    try:
        read_config(cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"checkpoint: {e}") from None
    try:
        manifest = DatasetManifest.load(cfg.manifest)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"manifest: {e}") from None
    device = resolve_device(cfg.device)
    model = load_pretrained(cfg.checkpoint).to(device)
    kind = _objective_of(model)
    if int(manifest.tokenizer["vocab_size"]) != model.config.vocab_size:
        raise ConfigError(f"manifest: tokenizer vocab {manifest.tokenizer['vocab_size']} != checkpoint vocab "
                          f"{model.config.vocab_size}")
    tok = load_tokenizer(manifest.tokenizer_source())
    seq_len = int(manifest.seq_len)
    length = cfg.sample_length or seq_len
    val = np.asarray(read_split_table(manifest, "validation").column("input_ids").to_pylist(), dtype=np.int64)
    require(len(val) > 0, "manifest", "has no validation rows")
    rows = val[: cfg.val_rows] if cfg.val_rows else val

    # ------------------------------------------------------------------ ELBO
    obj = ObjectiveConfig(kind=kind if kind in ("binary", "sm", "self_cond") else "binary")
    two = cfg.two_pass == "on" or (cfg.two_pass == "auto" and kind in ("sm", "self_cond"))
    ek = dict(seed=cfg.seed, batch=cfg.val_batch, draws=cfg.elbo_draws)
    validation = {"one_pass": elbo(model, rows, obj, two_pass=False, **ek), "rows": len(rows)}
    if two:
        validation["two_pass"] = elbo(model, rows, obj, two_pass=True, **ek)
    heldout = {}
    for spec in cfg.heldout_texts:
        packed = pack_text(tok, resolve_text_path(spec).read_text(encoding="utf-8", errors="replace"), seq_len,
                           cfg.heldout_rows)
        heldout[spec] = {"one_pass": elbo(model, packed, obj, two_pass=False, **ek)}
        if two:
            heldout[spec]["two_pass"] = elbo(model, packed, obj, two_pass=True, **ek)
    validation["heldout"] = heldout
    sm_head = gate_diagnostics(model, rows, seed=cfg.seed, batch=cfg.val_batch)

    # ------------------------------------------------------------------ samples + text metrics
    ev = load_evaluator(cfg.evaluator, device=device)
    n_ref = cfg.mauve_reference_rows or max(cfg.num_samples, cfg.mauve_buckets)
    ref_rows = val[-n_ref:] if len(val) >= n_ref else val
    ref_texts = tok.decode_batch(ref_rows[:, :length].tolist())
    ref_feats = last_token_features(ev, ref_texts, max_tokens=cfg.mauve_max_tokens, batch_size=cfg.eval_batch)
    reference = {"rows": len(ref_texts), **_text_metrics(ev, ref_texts, ref_rows[:, :length].tolist(), None, cfg)}
    soft = cfg.soft_mask == "on" or (cfg.soft_mask == "auto" and kind in ("sm", "self_cond"))
    budgets = list(cfg.nfe) or sorted({max(1, round(f * length)) for f in cfg.nfe_fractions})
    sampling = []
    transparency = cfg.transparency if soft else "none"
    for steps in budgets:
        sampler = sampler_settings(cfg, int(steps), soft)
        entry: dict = {"steps": int(steps), "soft_mask": soft, "algorithm": cfg.algorithm,
                       **({"transparency": transparency} if transparency != "none" else {}),
                       **({"cache": cfg.cache} if cfg.cache != "none" else {})}
        if cfg.num_samples:
            gen = generate(cfg, sampler, cfg.num_samples, length)
            texts = tok.decode_batch(gen["tokens"])
            entry.update({k: gen[k] for k in ("lambda_mean", "gate_open") if k in gen})
            entry.update(nfe=gen["nfe"], samples=len(texts), sample_wall_s=gen["wall_s"], executor=gen["executor"],
                         tokens_per_s=len(texts) * length / max(gen["wall_s"], 1e-9),
                         **_text_metrics(ev, texts, gen["tokens"], ref_feats, cfg), examples=texts[:2])
        if cfg.num_prompted:
            pr = val[: cfg.num_prompted, : cfg.prompt_tokens].tolist()
            pgen = generate(cfg, sampler, len(pr), length, prompts=pr)
            ptexts = tok.decode_batch([r[cfg.prompt_tokens:] for r in pgen["tokens"]])
            pm = _text_metrics(ev, ptexts, [r[cfg.prompt_tokens:] for r in pgen["tokens"]], None, cfg)
            entry["prompted"] = {"samples": len(ptexts), "nfe": pgen["nfe"], **pm, "examples": ptexts[:1]}
        sampling.append(entry)
    out_dir = cfg.output_dir or str(Path(cfg.checkpoint).resolve().parent / "eval")
    report = EvalReport(tag=cfg.tag, checkpoint=str(cfg.checkpoint), objective=kind, model=model.config.to_dict(),
                        evaluator=ev.info(), config=to_dict(cfg), validation=validation, sm_head=sm_head,
                        sampling=sampling,
                        reference=reference, wall_s=time.perf_counter() - t0, output_dir=out_dir)
    write_report(report, plots=cfg.plots)
    return report


# ------------------------------------------------------------------------------------------------ outputs
def markdown(report: EvalReport) -> str:
    v = report.validation
    lines = [f"# Evaluation {report.tag or ''}".rstrip(), "",
             f"- checkpoint: `{report.checkpoint}` (objective `{report.objective}`)",
             f"- evaluator: {report.evaluator['description']} (sha256 {report.evaluator['source_sha256'][:12]})",
             f"- validation ELBO ({v['rows']} rows): one-pass NLL {v['one_pass']['nll']:.4f} nats/token, "
             f"PPL <= {v['one_pass']['ppl_bound']:.2f}"
             + (f"; two-pass NLL {v['two_pass']['nll']:.4f}, PPL <= {v['two_pass']['ppl_bound']:.2f}"
                if "two_pass" in v else "")]
    for spec, h in v.get("heldout", {}).items():
        lines.append(f"- held-out `{spec}`: one-pass PPL <= {h['one_pass']['ppl_bound']:.2f}"
                     + (f", two-pass PPL <= {h['two_pass']['ppl_bound']:.2f}" if "two_pass" in h else ""))
    g = report.sm_head
    lines.append(f"- SM head: ω_s {g['omega_s']:.3g}, ω_a {g['omega_a']:.3g}, ω_b {g['omega_b']:.3g}; gate-open share "
                 f"on held-out data (t ~ U(0, 1), {g['masked_positions']} masked positions) {g['gate_open']:.4f} "
                 f"(H <= 0.75 nats: {g['share_h_below_0.75']:.4f}; mean entropy {g['entropy_mean']:.3f} nats)")
    r = report.reference
    lines += [f"- real held-out text ({r['rows']} rows): gen-PPL {r['gen_ppl']:.2f}, entropy {r['entropy']:.3f}", "",
              "| steps | NFE | SM feedback | mean λ | gen-PPL | MAUVE | entropy | tokens/s | samples | prompted gen-PPL |",
              "|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report.sampling:
        if "gen_ppl" not in s:
            continue
        mv = f"{s['mauve']:.3f}" if "mauve" in s else "-"
        pr = f"{s['prompted']['gen_ppl']:.2f}" if "prompted" in s else "-"
        lam = f"{s['lambda_mean']:.3g}" if s.get("lambda_mean") is not None else "-"
        lines.append(f"| {s['steps']} | {s['nfe']:.4g} | {'on' if s['soft_mask'] else 'off'} | {lam} | {s['gen_ppl']:.2f} | {mv} "
                     f"| {s['entropy']:.3f} | {s['tokens_per_s']:.1f} | {s['samples']} | {pr} |")
    if report.sampling and "mauve_buckets" in report.sampling[0]:
        lines += ["", f"MAUVE: {report.sampling[0]['mauve_buckets']} buckets, seed {report.sampling[0]['mauve_seed']},"
                      f" reference = {r['rows']} held-out rows (small samples: compare only within this setup)."]
    return "\n".join(lines) + "\n"


def plot_nfe(report: EvalReport, path: str | os.PathLike) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [s for s in report.sampling if "gen_ppl" in s]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot([s["nfe"] for s in pts], [s["gen_ppl"] for s in pts], "o-")
    axes[0].axhline(report.reference["gen_ppl"], ls="--", c="gray", label="real held-out text")
    axes[0].set(xlabel="NFE", ylabel="gen-PPL", yscale="log", title="generative perplexity")
    axes[0].legend()
    axes[1].plot([s["nfe"] for s in pts], [s["entropy"] for s in pts], "o-")
    axes[1].axhline(report.reference["entropy"], ls="--", c="gray")
    axes[1].set(xlabel="NFE", ylabel="unigram entropy (nats)", title="diversity")
    fig.suptitle(f"{report.tag or report.checkpoint} ({report.objective})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_atomic(str(path), buf.getvalue())


def write_report(report: EvalReport, plots: bool = True) -> None:
    out = Path(report.output_dir)
    write_atomic(str(out / "eval.json"), json.dumps(report.to_dict(), indent=2, sort_keys=True))
    write_atomic(str(out / "eval.md"), markdown(report))
    if plots and any("gen_ppl" in s for s in report.sampling):
        plot_nfe(report, out / "eval_nfe.png")

