"""Core (models/) benchmarks on this machine's CPU; prints one JSON document.

    python benchmarks/bench_models.py [--quick] [--reference PATH/TO/transparency_head.py]

1. training step time: SM (p_sm 0.8, 1.0) / binary, same batches, debug and tiny flavors   (goal <= 1.30 at 0.8)
2. peak memory of one training step, SM / binary (fresh subprocess each, peak RSS delta)      (goal <= 1.10)
3. sampler time per step, SM / binary, vocab 8k and 50k, tokens/s for each algorithm         (goal <= 1.05)
4. the SM head alone, B=4 L=512 V=50258, vs the paper's TransparencyHead if --reference given (goal >= 2x)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from models.objective import ObjectiveConfig, training_loss, uses_two_pass  # noqa: E402
from models.sampling import ALGORITHMS, SamplerConfig, sample  # noqa: E402
from models.softmask import SoftMaskHead  # noqa: E402

BATCH = {"debug": (8, 128), "tiny": (8, 256)}


def _model(flavor, **kw):
    torch.manual_seed(0)
    return models.build_model(models.ModelConfig.from_flavor(flavor, **kw))


def train_step_times(flavor: str, steps: int) -> dict:
    B, L = BATCH[flavor]
    out = {}
    for name, kind, p in [("binary", "binary", 0.0), ("sm_p0.8", "sm", 0.8), ("sm_p1.0", "sm", 1.0)]:
        model = _model(flavor)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        obj = ObjectiveConfig(kind=kind, p_sm=p)
        data = torch.randint(0, model.mask_id, (steps + 2, B, L), generator=torch.Generator().manual_seed(0))
        times = []
        for step in range(steps + 2):
            t0 = time.perf_counter()
            loss, _ = training_loss(model, data[step], obj, seed=0, step=step, two_pass=uses_two_pass(obj, 0, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - t0)
        out[name] = statistics.mean(times)
    return {"flavor": flavor, "batch": [B, L], "steps": steps, "seconds_per_step": out,
            "ratio_sm_p0.8": out["sm_p0.8"] / out["binary"], "ratio_sm_p1.0": out["sm_p1.0"] / out["binary"]}


def _peak_rss_child(flavor: str, kind: str) -> None:
    """Runs in a subprocess: one warm-up step, then report the peak-RSS growth of 3 more steps (MiB)."""
    B, L = BATCH[flavor]
    model = _model(flavor)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    obj = ObjectiveConfig(kind=kind, p_sm=1.0)
    x0 = torch.randint(0, model.mask_id, (B, L), generator=torch.Generator().manual_seed(0))
    base = None
    for step in range(4):
        loss, _ = training_loss(model, x0, obj, seed=0, step=step, two_pass=kind == "sm")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "after_warmup_mib": base / 1024}))


def peak_memory(flavor: str) -> dict:
    res = {}
    for kind in ("binary", "sm"):
        proc = subprocess.run([sys.executable, __file__, "--child-memory", flavor, kind], capture_output=True,
                              text=True, check=True)
        res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return {"flavor": flavor, "batch": list(BATCH[flavor]), "peak_rss_mib": res, "ratio": res["sm"] / res["binary"],
            "note": "process peak RSS (weights + optimizer + activations); the SM step always takes the two-pass path"}


def sampler_times(vocab: int, steps: int, length: int, n: int) -> dict:
    model = _model("tiny", vocab_size=vocab).eval()
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(2.0)
    out = {}
    for alg in ALGORITHMS:
        row = {}
        for sm in (False, True):
            cfg = SamplerConfig(steps=steps, algorithm=alg, soft_mask=sm, top_p=0.9)
            sample(model, SamplerConfig(steps=2, algorithm=alg, soft_mask=sm), n, length, seed=0)  # warm-up
            t0 = time.perf_counter()
            res = sample(model, cfg, n, length, seed=0)
            dt = time.perf_counter() - t0
            row["sm" if sm else "binary"] = {"s_per_step": dt / res.nfe, "tokens_per_s": n * length / dt,
                                             "nfe": res.nfe}
        row["ratio_sm"] = row["sm"]["s_per_step"] / row["binary"]["s_per_step"]
        out[alg] = row
    return {"vocab": vocab, "flavor": "tiny", "num_samples": n, "length": length, "steps": steps, "algorithms": out}


def sampler_serving_shape(flavor: str, rows: int, steps: int = 32, prompt_len: int = 20, length: int = 64) -> dict:
    """The serving benchmark's request shape: ``rows`` prompts of ``prompt_len`` tokens on a ``length`` canvas, SM on,
    ancestral, 1 torch thread as a Serve replica runs it; median of 3 timed calls after one warm-up."""
    model = _model(flavor).eval()
    prompts = [list(range(5 + r, 5 + r + prompt_len)) for r in range(rows)]
    cfg = SamplerConfig(steps=steps, soft_mask=True, top_p=0.9)
    times = []
    with torch.inference_mode():
        for i in range(4):
            t0 = time.perf_counter()
            sample(model, cfg, rows, length, prompt_ids=prompts, seed=i)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    return {"flavor": flavor, "rows": rows, "prompt_len": prompt_len, "length": length, "steps": steps,
            "s_per_call": round(med, 4), "ms_per_step": round(1000 * med / steps, 2)}


def _load_reference(path: str):
    spec = importlib.util.spec_from_file_location("paper_transparency_head", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TransparencyHead


def head_alone(reference: str | None, mask_rates=(0.5, 1.0), reps: int = 10) -> dict:
    B, L, V, k = 4, 512, 50258, 3
    mask_id = V - 1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g) * 2
    logits[..., mask_id] = -1e6
    ours = SoftMaskHead(k=k, omega_s=0.5)
    ref = None
    if reference:
        ref = _load_reference(reference)(mask_id, types.SimpleNamespace(init_scale=0.5, mixinputs_k=k))
    out = {"shape": [B, L, V], "k": k, "threads": torch.get_num_threads(), "reference": reference, "results": {}}
    for rate in mask_rates:
        x_t = torch.randint(0, V - 1, (B, L), generator=g)
        x_t[torch.rand(B, L, generator=g) < rate] = mask_id
        fns = {"ours": lambda: ours(x_t, logits, mask_id)}
        if ref is not None:
            fns["paper"] = lambda: ref(x_t, logits)
        times = {}
        with torch.no_grad():
            for name, fn in fns.items():
                fn()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts)
            if ref is not None:  # same output
                (i1, w1), (i2, w2) = ours(x_t, logits, mask_id), ref(x_t, logits)
                m = x_t == mask_id
                same = bool(torch.equal(i1[m], i2[m]) and torch.allclose(w1, w2.float(), atol=1e-5))
        row = {"median_s": times}
        if ref is not None:
            row["speedup"] = times["paper"] / times["ours"]
            row["same_output"] = same
        out["results"][f"mask_rate_{rate}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--reference", default=os.environ.get("SOFTMASK_REFERENCE_HEAD"),
                    help="path to the paper's language/transparency_head.py (not shipped; fetch it to compare)")
    ap.add_argument("--only", default="train,memory,sampler,serving_shape,head")
    ap.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        _peak_rss_child(*args.child_memory)
        return
    only = set(args.only.split(","))
    steps = 3 if args.quick else 10
    report = {"machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                          "threads": torch.get_num_threads()}}
    if "train" in only:
        report["train_step"] = [train_step_times(f, steps) for f in ("debug", "tiny")]
    if "memory" in only:
        report["train_peak_memory"] = [peak_memory(f) for f in ("debug", "tiny")]
    if "sampler" in only:
        report["sampler"] = [sampler_times(v, 8 if args.quick else 32, 128, 4) for v in (8192, 50258)]
    if "serving_shape" in only:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        report["sampler_serving_shape"] = [sampler_serving_shape(f, r) for f in ("debug", "tiny") for r in (1, 16)]
        torch.set_num_threads(threads)
    if "head" in only:
        report["sm_head"] = head_alone(args.reference)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
