"""Training speed of the dit backbone (MDLM's DiT, models.dit) vs our own (core) at equal size, on this CPU.

One training step = the SM objective (p_sm 0.8: two-pass on ~80% of steps, same coin for both) forward + backward +
AdamW, fp32, in this process. The two models have the same width, depth, heads, vocabulary and batch; the DiT adds
its adaLN maps (6·d·cond per block) and the σ MLP. Steps alternate core / dit on the same batch so that a change in
the machine's load hits both alike. Each step is timed twice: wall clock, and this process's CPU time
(time.process_time), which other jobs on a shared machine disturb far less; with one thread it is the step's compute.
The ratios are dit / core of the median step times (goal <= 1.15).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_dit.py [--steps 12] [--sizes debug,tiny] [--threads 1]
Prints one JSON document.
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
from models import ModelConfig, build_model  # noqa: E402
from models.dit import DiTConfig, build as build_dit  # noqa: E402
from models.objective import ObjectiveConfig, training_loss, uses_two_pass  # noqa: E402

# size -> (shared dimensions, DiT conditioning width, batch, sequence length)
SIZES = {
    "debug": (dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, max_seq_len=256), 64, 8, 128),
    "tiny": (dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, max_seq_len=512), 128, 4, 256),
}


def models_of(size: str):
    dims, cond, _, _ = SIZES[size]
    torch.manual_seed(0)
    core = build_model(ModelConfig(**dims, dropout=0.0))
    torch.manual_seed(0)
    dit = build_dit(DiTConfig(**dims, cond_dim=cond, dropout=0.0))
    with torch.no_grad():  # a trained-looking DiT: adaLN maps and the output layer away from their zero init
        for m in [*(b.ada for b in dit.backbone.blocks), dit.backbone.ada_f, dit.backbone.lm_head]:
            m.weight.normal_(0, 0.02)
    return {"core": core, "dit": dit}


def compare(size: str, steps: int, warmup: int = 2) -> dict:
    _, _, B, L = SIZES[size]
    nets = models_of(size)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in nets.items()}
    obj = ObjectiveConfig(kind="sm", p_sm=0.8)
    data = torch.randint(0, nets["core"].mask_id, (warmup + steps, B, L), generator=torch.Generator().manual_seed(0))
    wall: dict[str, list[float]] = {k: [] for k in nets}
    cpu: dict[str, list[float]] = {k: [] for k in nets}
    for step in range(warmup + steps):
        two = uses_two_pass(obj, 0, step)
        for name in (("core", "dit") if step % 2 == 0 else ("dit", "core")):  # alternate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = training_loss(nets[name], data[step], obj, seed=0, step=step, two_pass=two)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if step >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"size": size, "batch": [B, L], "steps_timed": steps,
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()},
            "median_wall_s_per_step": med_wall, "median_cpu_s_per_step": med_cpu,
            "tokens_per_cpu_s": {k: B * L / v for k, v in med_cpu.items()},
            "ratio_dit_over_core_wall": med_wall["dit"] / med_wall["core"],
            "ratio_dit_over_core_cpu": med_cpu["dit"] / med_cpu["core"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per backbone and size")
    ap.add_argument("--sizes", default="debug,tiny", help=f"comma-separated, of {sorted(SIZES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared CPU, "
                                                           "where a descheduled thread stalls every parallel op)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"host": platform.processor() or platform.machine(), "host_cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_start": os.getloadavg(),
           "results": [compare(s, args.steps) for s in args.sizes.split(",")], "load_avg_end": os.getloadavg()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
