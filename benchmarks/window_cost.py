"""What the block-wise key/value cache can gain at most on this machine, per model size and batch; prints one JSON.

    python benchmarks/window_cost.py [--flavors debug tiny small] [--length 256] [--block 32] [--batches 1 16]
        [--device cpu|cuda]

The dual cache replaces, in each block of ``--block`` steps (one step per position), all but the first full forward
by a forward of the block's positions only (``models.kv_cache.hidden_window`` on the cached keys/values). If a window
of w positions cost w / L of a full forward, the cache would save a factor ~L / w; on a CPU it costs more: the same
weights are read for far fewer rows (a GEMM of w rows runs at a lower rate than one of L rows), and per-layer fixed
costs (kernel calls, attention set-up) do not shrink with w. Measured here, for random weights of each flavor (the
cost does not depend on the values; vocabulary 1,024 for every flavor, the output layer is not timed):
    full_ms     one forward of the whole sequence (backbone.hidden), B rows of L positions
    window_ms   one dual-cache window of the same rows (B rows of w positions, attending to L cached keys/values)
    window_share = window_ms / full_ms, against the ideal w / L
    bound       the backbone-only speed-up of a block decoded one position per step, refresh included:
                block · full / (full + (block − 1) · window); the sampler's own per-step work (update rule,
                soft-mask feedback, output layer) only lowers it.
Timings: the median of ``--repeats`` after one warm-up (synchronised on CUDA), torch threads as set by ``--threads``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from models.kv_cache import hidden_window, window  # noqa: E402


def median_ms(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


@torch.no_grad()
def measure(flavor: str, length: int, block: int, batch: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = models.ModelConfig.from_flavor(flavor, vocab_size=1024, mask_token_id=1023, dropout=0.0,
                                         max_seq_len=max(length, models.FLAVORS[flavor]["max_seq_len"]))
    backbone = models.build_model(cfg).eval().backbone.to(device)
    x = torch.randint(0, 1000, (batch, length), device=device)
    _, cache = hidden_window(backbone, x, 0, None)
    a, e = window("dual", (length // 2, length // 2 + block), length)  # a block in the middle of the sequence
    full = median_ms(lambda: backbone.hidden(x), repeats, device)
    win = median_ms(lambda: hidden_window(backbone, x[:, a:e], a, cache), repeats, device)
    return {"flavor": flavor, "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2),
            "batch": batch, "length": length, "block": block, "full_ms": full, "window_ms": win,
            "window_share": round(win / full, 4), "ideal_share": round(block / length, 4),
            "bound": round(block * full / (full + (block - 1) * win), 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavors", nargs="+", default=["debug", "tiny", "small"], choices=sorted(models.FLAVORS))
    p.add_argument("--length", type=int, default=256, help="sequence length L")
    p.add_argument("--block", type=int, default=32, help="block length w (the dual window)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="rows per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per figure (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the backbone runs (fp32)")
    args = p.parse_args(argv)
    if not 0 < args.block < args.length:
        p.error(f"--block must be in (0, --length), got {args.block} with --length {args.length}")
    if min(args.batches) < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(f, args.length, args.block, b, args.repeats, device) for f in args.flavors for b in args.batches]
    out = {"benchmark": "window_cost", "torch": torch.__version__, "threads": args.threads, "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "machine": platform.machine(), "processor": platform.processor() or None, "rows": rows}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
