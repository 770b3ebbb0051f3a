"""Serving benchmark: HTTP load against the real Ray Serve app on 127.0.0.1; prints one JSON object.

For each flavor (debug, tiny) and batching mode (on: max_batch_size=--batch-size; off: max_batch_size=1) the app is
deployed with one sampler replica, then a closed-loop load generator (C workers, each sending its next request as
soon as the previous one answers) runs at each concurrency C, bounded by --requests per level and --level-time-s.
Reported per level: requests/s, generated tokens/s (canvas positions decoded, = max_tokens per request) and
completion tokens/s (after the EOS cut), p50/p99 latency, mean decode batch size, error count by status.
A direct ``models.sampling.sample`` call with the same request shape and the same torch threads is the baseline for
the HTTP + Serve overhead at concurrency 1, measured in --paired back-to-back (direct, HTTP) pairs: the median of the
per-pair ratios (separate medians taken minutes apart drift with the speed of a shared machine by +-30 %).

Goals: batching >= 3x the requests/s of batch-size-1 at concurrency 16; overhead <= 20% at concurrency 1; no errors
at concurrency 64.

Prompts: lines of real text (Shakespeare, public domain) from pipelines.corpus.ensure_corpus("shakespeare"); the
tokenizer is a byte-level BPE trained on that corpus (vocab = the flavor's). Weights are random (throughput does not
depend on them).

Diffusion fields beyond steps / algorithm go into every request (and the direct baseline's sampler) with --extra, e.g.
the key/value cache of block decoding: --extra '{"cache": "dual", "block_length": 32, "algorithm": "threshold"}'.

  PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py [--flavors debug,tiny] [--concurrency 1,4,16,64] [--out F]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def real_prompts(n: int, min_chars: int = 40) -> list[str]:
    """``n`` distinct lines of verse/prose from the Shakespeare corpus (deterministic order)."""
    from pipelines.corpus import ensure_corpus

    root = ensure_corpus("shakespeare")
    out: list[str] = []
    for path in sorted(root.glob("shakespeare-*.txt")) or sorted(root.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if len(line) >= min_chars and line not in out:
                out.append(line)
                if len(out) == n:
                    return out
    return out


def make_checkpoint(flavor: str, out: Path, corpus_files: list[Path]) -> Path:
    import torch

    import models
    from models.tokenizer import train_bpe

    vocab = models.FLAVORS[flavor]["vocab_size"]
    tok = train_bpe(corpus_files, vocab)
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor(flavor, vocab_size=tok.vocab_size,
                                                              mask_token_id=tok.mask_id))
    models.save_pretrained(model, out)
    tok.save(out)
    return out


# request fields of the Serve API that are SamplerConfig fields of the same name (--extra may set them)
SAMPLER_FIELDS = ("block_length", "threshold", "cache", "transparency", "temperature")
EXTRA_FIELDS = SAMPLER_FIELDS + ("algorithm", "soft_mask", "steps")


def extra_fields(text: str) -> dict:
    """--extra: a JSON object of diffusion request fields (names in EXTRA_FIELDS); ValueError names the problem."""
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra: not JSON ({e})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"--extra: expected a JSON object, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"--extra: unknown field(s) {unknown}; known: {list(EXTRA_FIELDS)}")
    return extra


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


async def load_level(url: str, prompts: list[str], concurrency: int, body: dict, max_requests: int,
                     time_limit_s: float) -> dict:
    """Closed loop: ``concurrency`` workers share a budget of ``max_requests`` requests and a time limit."""
    import aiohttp

    lat, sizes, codes = [], [], {}
    completion_tokens = 0
    issued = 0
    deadline = time.monotonic() + time_limit_s
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker():
            nonlocal issued, completion_tokens
            while issued < max_requests and time.monotonic() < deadline:
                i = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json={**body, "prompt": prompts[i % len(prompts)]}) as r:
                        data = await r.json(content_type=None)
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # counted, never fatal to the run
                    status = type(e).__name__
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    lat.append(time.perf_counter() - t0)
                    sizes.append(data["batch_size"])
                    completion_tokens += data["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ok = len(lat)
    return {"concurrency": concurrency, "requests": issued, "ok": ok, "errors": issued - ok,
            "status_codes": {str(k): v for k, v in sorted(codes.items(), key=str)}, "wall_s": round(wall, 3),
            "requests_per_s": round(ok / wall, 3), "tokens_per_s": round(ok * body["max_tokens"] / wall, 1),
            "completion_tokens_per_s": round(completion_tokens / wall, 1),
            "latency_p50_s": round(percentile(lat, 0.5), 4), "latency_p99_s": round(percentile(lat, 0.99), 4),
            "mean_batch_size": round(statistics.fmean(sizes), 2) if sizes else None}


class DirectSampler:
    """The same requests (prompts, canvas bucket, sampler settings) through models.sampling.sample in this process."""

    def __init__(self, ckpt: Path, prompts: list[str], body: dict, bucket: int, threads: int, device: str = "cpu"):
        import torch

        import models
        from models.sampling import SamplerConfig
        from models.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        self.torch, self.device, self.prompts, self.body, self.bucket = torch, device, prompts, body, bucket
        self.model = models.load_pretrained(ckpt).to(device).eval()
        self.tok = load_tokenizer(str(ckpt / "tokenizer.json"))
        self.cfg = SamplerConfig(steps=body["steps"], algorithm=body["algorithm"], soft_mask=body["soft_mask"],
                                 top_p=0.9, **{k: body[k] for k in SAMPLER_FIELDS if k in body})

    def __call__(self, i: int) -> float:
        """Seconds for prompt i (the server's canvas bucket)."""
        from models.sampling import sample

        ids = self.tok.encode(self.prompts[i % len(self.prompts)])
        need = len(ids) + self.body["max_tokens"]
        length = min(self.model.config.max_seq_len, -(-need // self.bucket) * self.bucket)
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            sample(self.model, self.cfg, num_samples=1, length=length, prompt_ids=[ids], seed=i)
            if self.device == "cuda":
                self.torch.cuda.synchronize()
        return time.perf_counter() - t0

    def baseline(self, repeats: int) -> dict:
        self(0)  # warm-up
        times = [self(i) for i in range(repeats)]
        return {"latency_p50_s": round(statistics.median(times), 4), "repeats": repeats,
                "torch_threads": self.torch.get_num_threads(), "device": self.device}


def paired_overhead(url: str, direct: DirectSampler, body: dict, pairs: int) -> dict:
    """HTTP + Serve overhead at concurrency 1, measured in pairs: the direct call and the HTTP request for the same
    prompt back to back, ``pairs`` times; the median of the per-pair ratios is immune to the slow drift of a shared
    machine's speed that separate medians are not."""
    import urllib.request

    def over_http(i: int) -> float:
        req = urllib.request.Request(url, json.dumps({**body, "prompt": direct.prompts[i % len(direct.prompts)],
                                                      "seed": i}).encode(), {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
        return time.perf_counter() - t0

    ratios, http_s, direct_s = [], [], []
    for i in range(pairs):  # alternate which of the two goes first: neither always runs on a just-idle machine
        if i % 2:
            h, d = over_http(i), direct(i)
        else:
            d, h = direct(i), over_http(i)
        ratios.append(h / d)
        http_s.append(h)
        direct_s.append(d)
    return {"pairs": pairs, "overhead_median": round(statistics.median(ratios) - 1, 3),
            "http_p50_s": round(statistics.median(http_s), 4), "direct_p50_s": round(statistics.median(direct_s), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavors", default="debug,tiny")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--modes", default="on,off", help="batching modes: on (max_batch_size=--batch-size), off (=1)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128, help="most requests per level (also >= 4 x concurrency)")
    ap.add_argument("--level-time-s", type=float, default=25.0, help="time limit per level")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica and the baseline")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--num-gpus", type=float, default=0.0,
                    help="GPUs per sampler replica; > 0 decodes on CUDA (the direct baseline too)")
    ap.add_argument("--baseline-repeats", type=int, default=10)
    ap.add_argument("--warmup-requests", type=int, default=16, help="requests sent to each new deployment first")
    ap.add_argument("--paired", type=int, default=20,
                    help="pairs (direct call, HTTP request) for the c=1 overhead goal; 0 = compare separate medians")
    ap.add_argument("--extra", default="{}", help=f"JSON object of request fields {list(EXTRA_FIELDS)} merged into "
                                                   "every request (e.g. cache, block_length, threshold)")
    ap.add_argument("--out", default=None, help="also write the JSON here (stdout may carry Ray's log lines)")
    args = ap.parse_args(argv)
    try:
        extra = extra_fields(args.extra)
    except ValueError as e:
        ap.error(str(e))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from infra.ray_runtime import RayConfig, init_ray
    from pipelines.corpus import ensure_corpus
    from pipelines.serve import ServeStageConfig, run, shutdown

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = real_prompts(256)
    corpus_files = sorted(ensure_corpus("shakespeare").glob("*.txt"))[:12]
    body = {"max_tokens": args.max_tokens, "steps": args.steps, "algorithm": "ancestral", "soft_mask": True, **extra}
    report: dict = {"config": {**vars(args), "prompts": "Shakespeare lines (pipelines.corpus)",
                               "cpu_count": os.cpu_count()}, "results": {}, "goals": {}}
    device = "cuda" if args.num_gpus > 0 else "cpu"
    report["config"]["device"] = device
    if device == "cuda":
        import torch

        report["config"]["gpu"] = torch.cuda.get_device_name(0)
    init_ray(RayConfig(num_cpus=os.cpu_count()), accelerator=device)  # a local Ray finds the GPUs itself
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        for flavor in args.flavors.split(","):
            ckpt = make_checkpoint(flavor, work / flavor, corpus_files)
            res = report["results"].setdefault(flavor, {})
            direct = DirectSampler(ckpt, prompts, body, 16, args.torch_threads, device)
            res["direct_sample"] = direct.baseline(args.baseline_repeats)
            for mode in args.modes.split(","):
                size = args.batch_size if mode == "on" else 1
                cfg = ServeStageConfig(
                    checkpoint=str(ckpt), app_name="bench", port=0, max_batch_size=size,
                    batch_wait_timeout_s=args.batch_wait_s, max_ongoing_requests=max(size, 64),
                    max_queued_requests=512, num_cpus=args.replica_cpus, torch_threads=args.torch_threads,
                    num_gpus=args.num_gpus, device=device,
                    target_ongoing_requests=64, request_timeout_s=600, max_tokens_limit=max(256, args.max_tokens))
                result = run(cfg)
                try:
                    url = result.completions_url
                    # warm-up: every canvas length of the prompts once or more, as the direct sampler had
                    asyncio.run(load_level(url, prompts, 2, body, args.warmup_requests, 60))
                    if args.paired:
                        res[f"paired_overhead_{mode}"] = paired_overhead(url, direct, body, args.paired)
                    res[f"batching_{mode}"] = [
                        asyncio.run(load_level(url, prompts, c, body, max(args.requests, 4 * c), args.level_time_s))
                        for c in levels]
                finally:
                    shutdown(result)
                print(json.dumps({flavor: {mode: res[f"batching_{mode}"]}}), file=sys.stderr, flush=True)
            by = {m: {r["concurrency"]: r for r in res.get(f"batching_{m}", [])} for m in ("on", "off")}
            goals = report["goals"].setdefault(flavor, {})
            if 16 in by["on"] and 16 in by["off"]:
                goals["batching_speedup_c16"] = round(by["on"][16]["requests_per_s"] /
                                                      max(by["off"][16]["requests_per_s"], 1e-9), 2)
            for m in ("on", "off"):
                if f"paired_overhead_{m}" in res:
                    goals[f"http_overhead_c1_batching_{m}"] = res[f"paired_overhead_{m}"]["overhead_median"]
                elif 1 in by[m]:
                    direct_p50 = res["direct_sample"]["latency_p50_s"]
                    goals[f"http_overhead_c1_batching_{m}"] = round(by[m][1]["latency_p50_s"] / direct_p50 - 1, 3)
                if 64 in by[m]:
                    goals[f"errors_c64_batching_{m}"] = by[m][64]["errors"]
    finally:
        try:
            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
    text = json.dumps(report, indent=2)
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
