"""Preprocessing stage: raw text -> tokenised, packed, zstd Parquet shards + manifest.json (local or s3://).

    from pipelines.preprocess import PreprocessConfig, SourceConfig, run
    manifest = run(PreprocessConfig(sources=[SourceConfig("corpus://shakespeare")], output="artifacts/data/shk"))

Flow: resolve sources (files, globs, dirs, ``s3://``, ``corpus://name``, HF ``save_to_disk`` dirs) and fingerprint
them (sha256) -> plan shards deterministically (byte ranges aligned to document boundaries / row ranges) -> run the
pending shards as Ray tasks (``workers.tokenize.tokenize_shard``: a TokenizeShard with its tokenizer loaded once per
worker process; fractional CPUs, bounded concurrency) -> manifest.

Determinism: a shard depends only on its pieces and the output-affecting config, never on which worker ran it or when,
so 1 vs N workers and interrupted vs clean runs give byte-identical shards and manifest. Resume: each finished shard
leaves a receipt (``_progress/shard-XXXXX.json``, kept beside the shards); a rerun re-hashes the shard files and skips
shards whose receipt key and hashes match, so a damaged dataset is repaired shard by shard. A complete dataset
(manifest present, same config, shards intact) is returned without any work. The config: pipelines.preprocess_config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from infra.config import ConfigError, config_hash, to_dict
from pipelines import preprocess_config, preprocess_plan
from pipelines.preprocess_config import EXECUTION_ONLY, PreprocessConfig, SourceConfig  # noqa: F401  (the stage's API)
from pipelines.preprocess_plan import expand_source, fingerprint, num_rows, plan_shards
from infra import storage
from workers import shard_io
from workers.tokenize import SPLITS, TokenizeSettings, receipt_uri

log = logging.getLogger("softmask.preprocess")


class BadInputError(ValueError):
    """Unusable input: a bad record in strict mode, an empty input, no training rows."""


@dataclass
class PreprocessResult:
    manifest: shard_io.DatasetManifest
    stats: dict  # run-only facts (not in the manifest): seconds, tokens/s, shards run/skipped, worker peak RSS


def output_config(cfg: PreprocessConfig) -> dict:
    d = to_dict(cfg)
    for k in EXECUTION_ONLY:
        d.pop(k)
    d["overlength"] = cfg.resolved_overlength
    return d


def code_version() -> str:
    """Hash of the code that determines the bytes written (tokenizer, readers/packer, shard IO, planner, stage)."""
    import models.tokenizer
    import workers.tokenize

    h = hashlib.sha256()
    modules = (models.tokenizer, workers.tokenize, shard_io, preprocess_config, preprocess_plan, sys.modules[__name__])
    for mod in modules:
        h.update(open(inspect.getsourcefile(mod), "rb").read())
    return "src-" + h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ resume
def _receipt(out: str, job: dict, so: dict) -> dict | None:
    """The job's receipt when its key matches and every shard it names exists with the recorded sha256."""
    try:
        rec = json.loads(storage.read_bytes(receipt_uri(out, job["index"]), so))
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("key") != job["key"]:
        return None
    for sh in rec["shards"].values():
        try:
            if storage.sha256_hex(storage.read_bytes(storage.join(out, sh["path"]), so)) != sh["sha256"]:
                return None
        except FileNotFoundError:
            return None
    return rec


def _cleanup(out: str, keep: set[str], keep_receipts: set[str], so: dict) -> None:
    """Delete temp leftovers of interrupted writes, and shard files / receipts that the plan does not produce
    (our own naming only)."""
    for split in SPLITS:
        for uri in storage.list_files(storage.join(out, split), so):
            name = uri.rsplit("/", 1)[-1]
            rel = f"{split}/{name}"
            if storage.is_temp_name(uri) or (name.startswith("shard-") and rel not in keep):
                storage.remove(uri, so)
    for uri in storage.list_files(storage.join(out, "_progress"), so):
        name = uri.rsplit("/", 1)[-1]
        if storage.is_temp_name(uri) or (name.startswith("shard-") and f"_progress/{name}" not in keep_receipts):
            storage.remove(uri, so)


# ------------------------------------------------------------------------------------------------ execution
def _run_jobs(cfg: PreprocessConfig, settings: TokenizeSettings, jobs: list[dict], total_bytes: int,
              done_bytes: int) -> tuple[list[dict], dict]:
    """Run ``jobs`` as Ray tasks, at most ``num_workers`` at a time, each reserving ``worker_cpus``.

    The task body (``workers.tokenize.tokenize_shard``) keeps one TokenizeShard (tokenizer loaded once) per worker
    process, and Ray reuses worker processes across tasks and runs. Returns receipts and peak RSS (MB) per worker.
    """
    import ray
    from tqdm import tqdm

    from workers.tokenize import tokenize_shard

    n = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=cfg.worker_cpus, max_retries=3)(tokenize_shard)
    sdict = dataclasses.asdict(settings)
    sref = ray.put(sdict)
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, disable=not cfg.progress,
               desc="preprocess", file=sys.stderr, dynamic_ncols=True)
    job_bytes = {j["index"]: sum(p["end"] - p["start"] for p in j["pieces"] if p["kind"] in ("text", "jsonl"))
                 for j in jobs}
    # largest first (LPT): the last task to finish is a small one, so workers idle less at the tail. Output does not
    # depend on the order: shards are named by job index and the manifest is sorted.
    queue = sorted(jobs, key=lambda j: (-job_bytes[j["index"]], j["index"]))
    inflight, results, peak, t0, tokens = {}, [], {}, time.monotonic(), 0
    try:
        while queue or inflight:
            while queue and len(inflight) < n:
                job = queue.pop(0)
                inflight[task.remote(sref, job)] = job
            ready, _ = ray.wait(list(inflight), num_returns=1)
            job = inflight.pop(ready[0])
            res = ray.get(ready[0])
            if "error" in res:
                raise BadInputError(f"strict mode: {res['error']}")
            w = res.pop("worker")
            peak[w["pid"]] = max(peak.get(w["pid"], 0.0), w["peak_rss_mb"])
            results.append(res)
            tokens += sum(res["stats"]["doc_tokens"].values())
            bar.update(job_bytes[job["index"]])
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - t0, 1e-9):,.0f} tok/s")
    finally:
        bar.close()
        for ref in inflight:
            ray.cancel(ref, force=False)
    return results, peak


def _merge_counts(into: dict, add: dict) -> None:
    for k, v in add.items():
        into[k] = into.get(k, 0) + v


def execute(cfg: PreprocessConfig) -> PreprocessResult:
    """``run`` plus run statistics (for benchmarks and the CLI)."""
    from models.tokenizer import load_tokenizer

    t_start = time.monotonic()
    so = cfg.storage_options()
    out = cfg.output.rstrip("/")
    if not storage.is_s3(out):
        out = os.path.abspath(os.path.expanduser(out))
    tok = load_tokenizer(cfg.tokenizer, add_missing_specials=cfg.tokenizer_add_missing_specials)
    # -------------------------------------------------------------------------------- sources
    files, skipped, examples = [], {}, []
    for i, src in enumerate(cfg.sources):
        for uri, kind in expand_source(src, i, so):
            fp = fingerprint(uri, kind, so)
            if kind in ("parquet", "hf_disk"):
                fp["hf_split"] = src.hf_split
                fp["rows"] = num_rows(fp, src.hf_split, so)
            if fp["bytes"] == 0 or fp.get("rows", 1) == 0:
                if cfg.strict:
                    raise BadInputError(f"strict mode: empty input file {uri}")
                _merge_counts(skipped, {"empty_file": 1})
                examples.append(f"empty_file at {uri}")
                continue
            files.append(fp)
    if not files:
        raise BadInputError(f"empty input: every file of sources {[s.path for s in cfg.sources]} is empty")
    ocfg = output_config(cfg)
    chash, cver = config_hash(ocfg), code_version()
    settings_hash = config_hash({"cfg": {k: v for k, v in ocfg.items() if k != "sources"}, "tok": tok.sha256,
                                 "code": cver})
    sources = [{k: fp[k] for k in ("uri", "kind", "bytes", "sha256", "rows") if k in fp} for fp in files]
    # -------------------------------------------------------------------------------- existing dataset
    try:
        old = shard_io.DatasetManifest.load(out, so)
    except FileNotFoundError:
        old = None
    if old is not None:
        same = (old.config_hash == chash and old.sources == sources and old.tokenizer["sha256"] == tok.sha256
                and old.code_version == cver)
        if same and not old.verify(so):
            _log_summary(cfg, old, {"seconds": time.monotonic() - t_start, "shards_run": 0,
                                    "shards_skipped": old.totals.get("shards", 0)}, up_to_date=True)
            return PreprocessResult(old, {"seconds": time.monotonic() - t_start, "shards_run": 0, "up_to_date": True})
        if old.config_hash != chash and not cfg.overwrite:
            raise ConfigError(f"output: {out} holds a dataset built with another config (config_hash "
                              f"{old.config_hash} vs {chash}); choose another output or set overwrite=true")
        if not same:  # same recipe, but inputs, tokenizer or code changed (or shards damaged): rebuild in place
            log.info("rebuilding %s: inputs, tokenizer, code or shards changed since its manifest", out)
        storage.remove(shard_io.DatasetManifest.manifest_uri(out), so)  # from here on the dir is "in progress"
    # -------------------------------------------------------------------------------- plan + resume
    jobs = plan_shards(cfg, files, settings_hash, so)
    receipts = {j["index"]: r for j in jobs if (r := _receipt(out, j, so)) is not None}
    pending = [j for j in jobs if j["index"] not in receipts]
    planned_receipts = {f"_progress/shard-{j['index']:05d}.json" for j in jobs}

    def cleanup() -> None:  # everything but the shards of the receipts in hand and the planned receipts
        _cleanup(out, {sh["path"] for r in receipts.values() for sh in r["shards"].values()}, planned_receipts, so)

    cleanup()
    total_bytes = sum(fp["bytes"] for fp in files if fp["kind"] in ("text", "jsonl"))
    done_bytes = sum(p["end"] - p["start"] for j in jobs if j["index"] in receipts
                     for p in j["pieces"] if p["kind"] in ("text", "jsonl"))
    settings = TokenizeSettings(
        mode=cfg.mode, seq_len=cfg.seq_len, tokenizer=cfg.tokenizer, out_root=out,
        add_missing_specials=cfg.tokenizer_add_missing_specials, tokenizer_sha256=tok.sha256,
        text_document=cfg.text_document,
        text_field=cfg.text_field, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
        messages_field=cfg.messages_field, sft_padding=cfg.sft_padding, overlength=cfg.resolved_overlength,
        strict=cfg.strict, validation_fraction=cfg.validation_fraction, split_salt=cfg.split_salt,
        storage_options={k: v for k, v in so.items() if k in ("endpoint_url", "region")})
    t_work = time.monotonic()
    peak: dict = {}
    if pending:
        started = _ensure_ray(cfg)
        try:
            new, peak = _run_jobs(cfg, settings, pending, total_bytes, done_bytes)
        finally:
            if started:
                import ray

                ray.shutdown()
        receipts.update({r["index"]: r for r in new})
        cleanup()  # a worker killed mid-write (Ray retried its task) left its temp file behind
    work_s = time.monotonic() - t_work
    manifest = _build_manifest(cfg, out, tok, jobs, receipts, skipped, examples, chash, cver, sources, ocfg, so)
    run_tokens = sum(sum(receipts[j["index"]]["stats"]["doc_tokens"].values()) for j in pending)
    stats = {"seconds": time.monotonic() - t_start, "work_seconds": work_s, "shards_run": len(pending),
             "shards_skipped": len(jobs) - len(pending), "tokens_run": run_tokens,
             "tokens_per_s": run_tokens / work_s if pending and work_s > 0 else 0.0,
             "workers": len(peak), "worker_peak_rss_mb": sorted(peak.values())}
    _log_summary(cfg, manifest, stats)
    return PreprocessResult(manifest, stats)


def run(cfg: PreprocessConfig) -> shard_io.DatasetManifest:
    """Build (or resume, or confirm) the dataset described by ``cfg``; returns its manifest."""
    return execute(cfg).manifest


def _ensure_ray(cfg: PreprocessConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    from infra.ray_runtime import RayConfig, init_ray

    return init_ray(RayConfig(address=cfg.ray_address))


def _build_manifest(cfg, out, tok, jobs, receipts, skipped, examples, chash, cver, sources, ocfg, so):
    splits = {sp: [] for sp in SPLITS}
    totals = {"docs": {sp: 0 for sp in SPLITS}, "doc_tokens": {sp: 0 for sp in SPLITS},
              "rows": {sp: 0 for sp in SPLITS}, "tokens": {sp: 0 for sp in SPLITS},
              "dropped_tail_tokens": {sp: 0 for sp in SPLITS}, "skipped": dict(skipped), "shards": len(jobs),
              "source_files": len(sources), "source_bytes": sum(s["bytes"] for s in sources)}
    for j in jobs:
        rec = receipts[j["index"]]
        for sp in SPLITS:
            if sp in rec["shards"]:
                splits[sp].append(shard_io.ShardInfo(**rec["shards"][sp]))
                totals["tokens"][sp] += rec["shards"][sp]["tokens"]
            for k in ("docs", "doc_tokens", "rows", "dropped_tail_tokens"):
                totals[k][sp] += rec["stats"][k].get(sp, 0)
        _merge_counts(totals["skipped"], rec["stats"]["skipped"])
        examples.extend(rec.get("skip_examples", []))
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    for e in examples[:20]:
        log.warning("skipped %s", e)
    if sum(totals["docs"].values()) == 0:
        raise BadInputError(f"empty input: no usable documents in {len(sources)} file(s); skipped: "
                            f"{totals['skipped'] or 'none'}")
    if totals["rows"]["train"] == 0:
        raise BadInputError(f"no training rows: {totals['doc_tokens']['train']} train tokens do not fill one "
                            f"seq_len={cfg.seq_len} block (more data or a smaller seq_len)")
    tok_dir = "tokenizer"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                storage.write_atomic(storage.join(out, tok_dir, name), f.read(), so)
    m = shard_io.DatasetManifest(mode=cfg.mode, seq_len=cfg.seq_len, tokenizer={**tok.info(), "dir": tok_dir},
                                 splits=splits, config_hash=chash, sources=sources, code_version=cver, totals=totals,
                                 config=ocfg)
    m.save(out, so)
    return m


def _log_summary(cfg: PreprocessConfig, m: shard_io.DatasetManifest, stats: dict, up_to_date: bool = False) -> None:
    t = m.totals
    lines = [f"preprocess {'(up to date) ' if up_to_date else ''}-> {m.root}",
             f"  documents: train {t['docs']['train']:,}  validation {t['docs']['validation']:,}",
             f"  tokens:    train {t['tokens']['train']:,} in {t['rows']['train']:,} rows, validation "
             f"{t['tokens']['validation']:,} in {t['rows']['validation']:,} rows (seq_len {m.seq_len}); "
             f"dropped tail tokens {sum(t['dropped_tail_tokens'].values()):,}",
             f"  shards:    {t['shards']} planned, {stats.get('shards_run', 0)} run, "
             f"{stats.get('shards_skipped', 0)} already complete; {stats['seconds']:.1f}s"
             + (f", {stats['tokens_per_s']:,.0f} tok/s" if stats.get("tokens_per_s") else ""),
             f"  skipped:   {', '.join(f'{k}={v}' for k, v in t['skipped'].items()) or 'none'}"]
    for line in lines:
        log.info(line)
    if cfg.progress:
        print("\n".join(lines), file=sys.stderr)
