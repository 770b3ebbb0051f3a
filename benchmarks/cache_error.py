"""How far the block-wise key/value cache's prediction is from the exact one, per backbone; prints one JSON document.

    python benchmarks/cache_error.py --checkpoint EXPORT_DIR [--length 128] [--block 32] [--samples 4]
    python benchmarks/cache_error.py --hf-import smollm2-135m [--length 64] [--block 16]

Along a real decoding trajectory (the sampler without cache, soft-masking off, so every step's input is a token
sequence), every step after a block's first is predicted twice: exactly (the full forward) and through the cache
(``models.kv_cache.predict_window`` with the keys/values of the block's first step; ``prefix`` and ``dual``). Reported
per mode, over the block's still-masked positions: the mean KL(exact ‖ cached) in nats, the share of positions whose
top-1 token agrees, and both by the number of tokens decoded in the block since the refresh (the staleness the
approximation is about). A refresh step is exact by construction (tests/test_fast_decoding.py) and is not counted.

``--hf-import smollm2-135m`` imports that packaged causal LM first (``pipelines.hf_import``: bidirectional attention,
Dream's shift) and measures it instead of ``--checkpoint``: the HF decoder path of the cache (its own layers on the
window, rotary positions, the Cache protocol). An imported AR model is not a trained denoiser; the error of its cache
is still the error of the mechanism.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from bench_decode import with_context  # noqa: E402  (one rule for running a checkpoint past its trained length)
from models.kv_cache import check_cacheable, copy_cache, lookback, predict_window, window  # noqa: E402
from models.sampling import SamplerConfig, sample  # noqa: E402


def exact_logits(model, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    t = torch.ones(x.shape[0], device=x.device)
    return model(x, t, rows=rows, masked_only=False)  # (M, V)


def measure(model, trajectory: list[torch.Tensor], fixed: torch.Tensor, block: int, modes) -> dict:
    """Teacher-forced along ``trajectory`` (states before each step): for each mode, KL and top-1 agreement of the
    cached prediction against the exact one at the current block's masked positions."""
    mask_id, L = model.mask_id, trajectory[0].shape[1]
    back = lookback(model)
    pos = torch.arange(L)
    stats = {m: {"kl": [], "agree": [], "by_stale": {}} for m in modes}
    refresh, kv, blk = None, None, None
    for x in trajectory:
        masked = (x == mask_id) & ~fixed
        if not masked.any():
            break
        first = int(masked.nonzero()[:, 1].min())  # the current block: the first one with a masked position
        cur = (first // block * block, min(L, first // block * block + block))
        rows = masked & (pos >= cur[0]) & (pos < cur[1])  # (B, L)
        if cur != blk:  # a block's first step: the refresh (exact), keeps the keys/values (one copy per mode: a
            blk, refresh = cur, x.clone()  # window writes its positions into the cache it reads)
            _, _, kv = predict_window(model, x, rows, (0, L), None)
            kv = {m: copy_cache(kv) for m in modes}
            continue
        z_exact = torch.log_softmax(exact_logits(model, x, rows).float(), -1)
        stale = int(((refresh == mask_id) & (x != mask_id)).sum(1).max())  # tokens decoded in the block since
        for m in modes:
            span = window(m, cur, L, back)
            z, _, _ = predict_window(model, x, rows & (pos >= span[0]) & (pos < span[1]), span, kv[m])
            z = torch.log_softmax(z.float(), -1)
            kl = (z_exact.exp() * (z_exact - z)).sum(-1)  # (M,)
            agree = (z_exact.argmax(-1) == z.argmax(-1)).float()
            s = stats[m]
            s["kl"] += kl.tolist()
            s["agree"] += agree.tolist()
            b = s["by_stale"].setdefault(stale, {"kl": [], "agree": []})
            b["kl"] += kl.tolist()
            b["agree"] += agree.tolist()

    def mean(v):
        return round(sum(v) / len(v), 6) if v else None

    return {m: {"positions": len(s["kl"]), "kl_mean": mean(s["kl"]), "top1_agree": mean(s["agree"]),
                "by_tokens_decoded_since_refresh": {k: {"positions": len(v["kl"]), "kl_mean": mean(v["kl"]),
                                                        "top1_agree": mean(v["agree"])}
                                                    for k, v in sorted(s["by_stale"].items())}}
            for m, s in stats.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="export directory (config.json + model.safetensors)")
    p.add_argument("--hf-import", help="a packaged causal LM to import and measure instead (e.g. smollm2-135m)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["prefix", "dual"], choices=["prefix", "dual"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if bool(args.checkpoint) == bool(args.hf_import):
        p.error("give exactly one of --checkpoint and --hf-import")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()  # holds an imported checkpoint while it is measured
    path = args.checkpoint
    if args.hf_import:
        from pipelines.hf_import import HFImportConfig, run as hf_import
        path = hf_import(HFImportConfig(source=args.hf_import, output=os.path.join(tmp.name, "ckpt"))).output
    model = models.load_pretrained(path).eval()
    check_cacheable(model)
    trained = model.config.max_seq_len
    if trained < args.length and args.hf_import:
        p.error(f"--length {args.length} exceeds the model's max_seq_len {trained}")
    with_context(model, args.length)  # our backbones: rotary positions past the trained length (reported)
    cfg = SamplerConfig(steps=args.length, block_length=args.block, soft_mask=False, top_p=0.9,
                        cache_unchanged=False)
    with torch.no_grad():
        out = sample(model, cfg, args.samples, args.length, seed=args.seed, return_trajectory=True)
        states = [torch.full_like(out.tokens, model.mask_id)] + out.trajectory[:-1]  # the state before each step
        fixed = torch.zeros_like(out.tokens, dtype=torch.bool)
        result = measure(model, states, fixed, args.block, args.modes)
    print(json.dumps({"benchmark": "cache_error", "checkpoint": args.checkpoint, "hf_import": args.hf_import,
                      "backbone": type(model.backbone).__name__, "length": args.length, "block": args.block,
                      "trained_max_seq_len": trained, "extrapolated": args.length > trained,
                      "samples": args.samples, "seed": args.seed, "sampler": "ancestral, steps = length, top-p 0.9, "
                      "soft-masking off, no cache (the trajectory)", "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "wall_s": round(time.perf_counter() - t0, 1),
                      "modes": result}, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
