"""Training benchmarks; prints one JSON object.

Sections (select with --only; default: all CPU sections):
  throughput  tokens/s per worker of the real training stage (pipelines.train.run: Ray Train + DeepSpeed ZeRO-2,
              SM objective) for the debug and tiny flavors with 1 and 2 workers (median over steps after warmup).
  ddp         step time of DeepSpeed ZeRO-2 vs plain PyTorch DDP on the same model/data, 2 gloo processes
              (goal: ZeRO-2 <= 1.15x DDP).
  memory      per-rank peak and end-of-run RSS, ZeRO-2 vs ZeRO-3, 2 processes, ~100M-parameter model.
  gpu         one device, DeepSpeed ZeRO-2 (bf16 on GPU): tokens/s and MFU (used by benchmarks/gpu_train.sh; runs on
              CPU at toy size too). MFU two ways, both over the peak dense bf16 FLOP/s:
                mfu_palm  the PaLM convention (Chowdhery et al. 2022, app. B): 6 x non-embedding parameters + the
                          attention's 12 x layers x d_model x seq_len per token, and the output layer (6 x d_model x
                          padded vocab) only for the rows where it runs, the masked ones (their measured fraction)
                mfu_6N    6 x all parameters per token: it also counts the input embedding and an output layer over
                          every position, so it reads ~30 % higher for the small flavor
              "_with_pass1": the no-grad first pass of two-pass SM steps added (its forward FLOPs, per the same
              convention), i.e. the model FLOPs that actually run.
  --recompute-mfu FILE...   the PaLM figures of recorded runs (JSON lines of this section), from their tokens/s,
              model shape and two-pass fraction (masked fraction 0.5, the log-linear schedule's mean, where a run did
              not record it); one JSON line per run.
Data: bytes of the interpreter's own stdlib sources (real offline text) as token ids, byte vocabulary (259).

  PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py [--only throughput,ddp,memory]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

BYTE_TOKENIZER = {"spec": "bytes", "sha256": "", "vocab_size": 259, "eos_id": 256, "mask_id": 257, "pad_id": 258}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def model_flops(flavor: str, n_params: int, seq_len: int, masked_fraction: float, mcfg=None) -> dict:
    """Model FLOPs per token of a training step (forward + backward) and of the SM first pass (forward only), by the
    PaLM convention, for a model of ``flavor`` (or ``mcfg``) with ``n_params`` parameters in all."""
    from models import ModelConfig

    mcfg = mcfg or ModelConfig.from_flavor(flavor)
    d, layers, vocab = mcfg.d_model, mcfg.n_layers, mcfg.padded_vocab_size
    n_body = n_params - 2 * vocab * d  # without the input embedding and the (untied) output layer
    attention = 4 * layers * d * seq_len  # QK^T and AV: 2 x seq_len x d_model FLOPs each, per token and layer, forward
    head = 2 * d * vocab * masked_fraction  # the output layer, on the masked rows only
    return {"n_params": n_params, "n_non_embedding": n_body, "masked_fraction": masked_fraction,
            "train_per_token": 3 * (2 * n_body + attention + head),
            "pass1_per_token": 2 * n_body + attention + head, "train_per_token_6N": 6 * n_params}


def mfu(flops: dict, tokens_per_s: float, two_pass_fraction: float, peak: float) -> dict:
    extra = two_pass_fraction * flops["pass1_per_token"]
    six_n = flops["train_per_token_6N"]
    return {"mfu_palm": flops["train_per_token"] * tokens_per_s / peak,
            "mfu_palm_with_pass1": (flops["train_per_token"] + extra) * tokens_per_s / peak,
            "mfu_6N": six_n * tokens_per_s / peak,
            # two-pass steps add one no-grad forward (2N per token on this count)
            "mfu_with_pass1": (six_n + 2 * two_pass_fraction * flops["n_params"]) * tokens_per_s / peak}


def recompute_mfu(paths: list[str]) -> list[dict]:
    """PaLM-convention MFU of recorded `gpu` runs (JSON lines), from what each line recorded."""
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            run = json.loads(line)
            if "tokens_per_s" not in run or "peak_bf16_flops" not in run:
                continue  # a skipped or failed entry of a sweep
            flops = model_flops(run["flavor"], run["n_params"], run["seq_len"], run.get("masked_fraction", 0.5))
            out.append({"file": Path(path).name, "name": run.get("name"), "objective": run["objective"],
                        "micro_batch": run["micro_batch"], "tokens_per_s": run["tokens_per_s"],
                        "two_pass_fraction": run["two_pass_fraction"], "masked_fraction": flops["masked_fraction"],
                        **mfu(flops, run["tokens_per_s"], run["two_pass_fraction"], run["peak_bf16_flops"])})
    return out


def stdlib_tokens(n_tokens: int):
    """Real offline text: bytes of stdlib .py files (sorted, deterministic) until n_tokens ids."""
    import sysconfig

    import numpy as np

    out, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        b = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        out.append(b)
        total += b.size
        if total >= n_tokens:
            break
    return np.concatenate(out)[:n_tokens].astype(np.int64)


def write_dataset(root: str, seq_len: int, rows: int) -> str:
    import numpy as np
    import pyarrow as pa

    from infra.storage import join as join_uri
    from workers.shard_io import DatasetManifest, ShardInfo, write_parquet_atomic

    ids = stdlib_tokens((rows + 16) * seq_len).reshape(-1, seq_len).astype(np.int32)
    splits = {}
    for split, part in (("train", ids[:rows]), ("validation", ids[rows:])):
        rel = f"{split}/shard-00000.parquet"
        sha = write_parquet_atomic(pa.table({"input_ids": pa.array(part.tolist(), pa.list_(pa.int32()))}),
                                   join_uri(root, rel))
        splits[split] = [ShardInfo(path=rel, rows=len(part), tokens=part.size, sha256=sha)]
    DatasetManifest(mode="pretrain", seq_len=seq_len, tokenizer=dict(BYTE_TOKENIZER), splits=splits,
                    config_hash="bench").save(root)
    return root


# ------------------------------------------------------------------------------------------ throughput (Ray)
def bench_throughput(steps: int) -> list[dict]:
    from infra.config import from_dict
    from pipelines.train import run
    from workers.train_config import TrainConfig
    from workers.train_metrics import load_metrics

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for flavor, seq_len, micro in (("debug", 128, 8), ("tiny", 256, 4)):
            data = write_dataset(f"{tmp}/{flavor}", seq_len, rows=256)
            for workers in (1, 2):
                cfg = from_dict(TrainConfig, {
                    "run_name": f"{flavor}-w{workers}", "steps": steps, "micro_batch": micro,
                    "global_batch": micro * workers, "ema_decay": 0.999, "eval_every": 0,
                    "data": {"manifest": data, "val_batches": 1},
                    "checkpoint": {"storage_path": f"{tmp}/runs", "every": steps},
                    "scaling": {"num_workers": workers, "cpus_per_worker": 0.5},
                    "deepspeed": {"zero_stage": 2}})
                t0 = time.perf_counter()
                res = run(cfg)
                recs = [r for r in load_metrics(Path(res.metrics_uri)) if r["kind"] == "train"][2:]
                out.append({"flavor": flavor, "workers": workers, "seq_len": seq_len, "micro_batch": micro,
                            "steps_timed": len(recs),
                            "tokens_per_s_per_worker": statistics.median(r["tokens_per_s_per_worker"] for r in recs),
                            "tokens_per_s_total": statistics.median(r["tokens_per_s"] for r in recs),
                            "step_time_s": statistics.median(r["step_time_s"] for r in recs),
                            "fit_wall_s": round(time.perf_counter() - t0, 1)})
    return out


# ------------------------------------------------------------------------------------- multi-process harness
def _worker(rank: int, world: int, port: int, spec: dict, queue) -> None:
    """One gloo rank: build the model, wrap it (ddp / zero2 / zero3), time ``spec['steps']`` training steps."""
    sys.stdout = sys.stderr  # keep the parent's stdout pure JSON (DeepSpeed prints op-build lines)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import psutil
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec.get("threads", 1))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rss0 = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    from models import ModelConfig, build_model
    from models.objective import ObjectiveConfig, training_loss, uses_two_pass
    from models.optim import param_groups

    from infra.deepspeed import (DeepSpeedConfig, build_ds_config, build_engine, gather_for_init, partitioned_init,
                                 promote_scalar_params, register_external_parameter)

    mcfg = ModelConfig.from_flavor(spec["flavor"], **{"vocab_size": 259, "mask_token_id": 257,
                                                      **spec.get("overrides", {})})
    kind = spec["kind"]
    ds = DeepSpeedConfig(zero_stage=int(kind[-1]) if kind != "ddp" else 0, **spec.get("ds", {}))
    ds_cfg = build_ds_config(ds, micro_batch=spec["micro"], grad_accum=1, world_size=world, on_gpu=False)
    # as the training stage builds it: ZeRO-3 partitions the model while it is constructed (zero.Init)
    model = build_model(mcfg, partition=lambda: partitioned_init(ds_cfg))
    if ds.zero_stage == 3:
        model.init_parameters(gather=gather_for_init)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    groups = param_groups(model, 3e-4, 0.0, 1e-2)
    if kind == "ddp":
        promote_scalar_params(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    else:
        wrapped = build_engine(model, groups, ds_cfg, ds)
        register_external_parameter(wrapped, wrapped.module.backbone, wrapped.module.backbone.embed.weight)
    obj = ObjectiveConfig(kind=spec.get("objective", "sm"), p_sm=0.8)
    data = torch.from_numpy(stdlib_tokens(spec["micro"] * spec["seq_len"] * world * (spec["steps"] + 1)))
    data = data.view(-1, spec["micro"], spec["seq_len"])
    times = []
    for step in range(spec["steps"]):
        x0 = data[step * world + rank]
        dist.barrier()
        t0 = time.perf_counter()
        two = uses_two_pass(obj, 0, step)
        loss, _ = training_loss(wrapped, x0, obj, seed=0, step=step, rank=rank, world=world, two_pass=two)
        if kind == "ddp":
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            wrapped.backward(loss)
            wrapped.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    import resource

    queue.put({"rank": rank, "kind": kind, "n_params": n_params, "step_times": times,
               "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_end_mb": psutil.Process().memory_info().rss / 2**20, "rss_start_mb": rss0 / 2**20})
    dist.destroy_process_group()


def run_ranks(spec: dict, world: int = 2) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    import queue as queue_mod

    results, deadline = [], time.time() + 1800
    while len(results) < world:
        try:
            results.append(queue.get(timeout=5))
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a benchmark rank failed ({[p.exitcode for p in procs]}); see stderr") from None
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def bench_ddp(steps: int) -> dict:
    out = {}
    spec = {"flavor": "tiny", "seq_len": 128, "micro": 4, "steps": steps}
    for kind in ("ddp", "zero2", "ddp", "zero2"):  # interleaved twice: the machine's load drifts
        res = run_ranks(dict(spec, kind=kind))
        med = statistics.median(t for r in res for t in r["step_times"][2:])
        out.setdefault(kind, []).append(med)
    ddp, z2 = min(out["ddp"]), min(out["zero2"])
    return {"model": "tiny flavor, vocab 259 (10.7M params)", "seq_len": 128, "micro_batch": 4, "workers": 2,
            "steps": steps, "objective": "sm (p_sm 0.8, same coin sequence for both)",
            "ddp_step_s": ddp, "zero2_step_s": z2, "ratio_zero2_over_ddp": z2 / ddp, "goal": "<= 1.15",
            "runs": out}


# Communication buffers sized for a ~100M model on CPU (same for both stages): DeepSpeed's buffers are sized in
# elements, and the 50M-element defaults alone (200 MB fp32 each) would hide the parameter memory ZeRO-3 saves.
MEMORY_DS = {"reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
             "stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 10_000_000}


def bench_memory(steps: int) -> dict:
    # ~100M parameters: d_model 768, 12 layers (85M in blocks) + 8192-token embeddings/head (12.6M)
    spec = {"flavor": "tiny", "overrides": {"d_model": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 8192,
                                            "mask_token_id": 8191},
            "seq_len": 128, "micro": 2, "steps": steps, "threads": 1, "ds": MEMORY_DS}
    # glibc's dynamic mmap threshold otherwise parks the freed ZeRO-3 gather buffers (~10 MB each) in the heap, where
    # they stay resident: a fixed threshold returns them to the OS (both stages measured alike; spawned ranks read it)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = {"malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"], "ds_buffers": MEMORY_DS}
    for kind in ("zero2", "zero3"):
        res = run_ranks(dict(spec, kind=kind))
        out[kind] = [{k: round(r[k], 1) for k in ("rss_start_mb", "rss_peak_mb", "rss_end_mb")} for r in res]
        out["n_params"] = res[0]["n_params"]
        out[f"{kind}_step_s"] = statistics.median(t for r in res for t in r["step_times"][1:])
    return out


# ------------------------------------------------------------------------------------------------- one device
def bench_gpu(flavor: str, seq_len: int, micro: int, steps: int, warmup: int, device_name: str | None,
              objective: str = "sm", compile_blocks: bool = False, profile_out: str | None = None,
              check_grad_overflow: bool = True, compile_loss: bool = False, fused_adam: str = "auto",
              backbone: str = "core") -> dict:
    """Single process DeepSpeed ZeRO-2 (bf16 on GPU, fp32 on CPU): tokens/s and MFU. ``backbone``: core (our
    transformer, models.FLAVORS) or dit (MDLM's DiT, models.dit.DIT_FLAVORS; small = MDLM OWT's 169.6M)."""
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    from models import ModelConfig
    from models.compile import compile_blocks as compile_model_blocks
    from models.compile import compile_softmask_head, compiled_token_nll
    from models.objective import ObjectiveConfig, token_nll, training_loss, uses_two_pass
    from models.dit import DiTConfig
    from models.optim import param_groups
    from models.registry import build_from_config

    from infra.deepspeed import DeepSpeedConfig, build_ds_config, build_engine

    over = {"max_seq_len": max(seq_len, 64)}
    if flavor != "small":
        over.update(vocab_size=50258, mask_token_id=50257)
    mcfg = {"core": ModelConfig, "dit": DiTConfig}[backbone].from_flavor(flavor, **over)
    model = build_from_config(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    if compile_blocks:
        compile_model_blocks(model)
    ds = DeepSpeedConfig(zero_stage=2, check_grad_overflow=check_grad_overflow, fused_adam=fused_adam)
    engine = build_engine(model, param_groups(model, 3e-4, 0.0, 1e-2),
                          build_ds_config(ds, micro_batch=micro, grad_accum=1, world_size=1, on_gpu=on_gpu), ds)
    obj = ObjectiveConfig(kind="sm", p_sm=0.8) if objective == "sm" else ObjectiveConfig(kind=objective)
    nll = token_nll
    if compile_loss:  # the loss and the SM head's entropy (models.compile.compile_model minus the blocks)
        compile_softmask_head(model)
        nll = compiled_token_nll()
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    times, two_passes, masked = [], 0, []
    for step in range(warmup + steps):
        x0 = torch.randint(0, 50257, (micro, seq_len), generator=gen).to(engine.device)
        sync()
        t0 = time.perf_counter()
        two = uses_two_pass(obj, 0, step)
        loss, metrics = training_loss(engine, x0, obj, seed=0, step=step, two_pass=two, nll=nll)
        engine.backward(loss)
        engine.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            two_passes += int(two)
            masked.append(metrics["masked_frac"])  # device tensors, read after the timing
    if profile_out:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            for step in range(warmup + steps, warmup + steps + 3):
                x0 = torch.randint(0, 50257, (micro, seq_len), generator=gen).to(engine.device)
                loss, _ = training_loss(engine, x0, obj, seed=0, step=step, two_pass=uses_two_pass(obj, 0, step),
                                        nll=nll)
                engine.backward(loss)
                engine.step()
            sync()
        with open(profile_out, "w") as f:
            key = "cuda_time_total" if on_gpu else "cpu_time_total"
            f.write(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25) + "\n")
    tok_s = micro * seq_len * len(times) / sum(times)
    name = device_name or (torch.cuda.get_device_name(0) if on_gpu else "cpu")
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    frac_two = two_passes / max(1, len(times))
    client_adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client AdamW
    res = {"device": name, "backbone": backbone, "flavor": flavor, "n_params": n_params, "seq_len": seq_len,
           "micro_batch": micro, "precision": "bf16" if on_gpu else "fp32", "zero_stage": 2, "steps_timed": len(times),
           "objective": objective, "compiled_blocks": compile_blocks, "check_grad_overflow": check_grad_overflow,
           "compiled_loss": compile_loss, "fused_adam": bool(client_adam.defaults.get("fused")),
           "tokens_per_s": tok_s, "two_pass_fraction": frac_two, "final_loss": loss.item()}
    res["masked_fraction"] = float(torch.stack(masked).float().mean())
    if peak:
        res["peak_bf16_flops"] = peak
        res.update(mfu(model_flops(flavor, n_params, seq_len, res["masked_fraction"], mcfg), tok_s, frac_two, peak))
    if on_gpu:
        res["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    dist.destroy_process_group()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="throughput,ddp,memory")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--flavor", default="small", help="gpu section: model flavor (of the backbone's flavors)")
    ap.add_argument("--backbone", default="core", choices=("core", "dit"),
                    help="gpu section: core = our transformer, dit = MDLM's DiT (models.dit)")
    ap.add_argument("--seq-len", type=int, default=1024, help="gpu section: sequence length")
    ap.add_argument("--micro", type=int, default=16, help="gpu section: micro batch")
    ap.add_argument("--warmup", type=int, default=3, help="gpu section: untimed steps")
    ap.add_argument("--device-name", default=None, help="gpu section: override the detected device name")
    ap.add_argument("--objective", default="sm", help="gpu section: sm (p_sm 0.8) | binary | selfcond")
    ap.add_argument("--compile", action="store_true", help="gpu section: torch.compile each transformer block")
    ap.add_argument("--profile", default=None, help="gpu section: write a torch.profiler table of 3 more steps here")
    ap.add_argument("--compile-loss", action="store_true",
                    help="gpu section: the per-token cross-entropy and the SM head's entropy compiled")
    ap.add_argument("--no-overflow-check", action="store_true",
                    help="gpu section: DeepSpeed bf16 check_grad_overflow off (no per-gradient inf/NaN test)")
    ap.add_argument("--fused-adam", default="auto", choices=("auto", "on", "off"),
                    help="gpu section: torch AdamW's fused kernel (auto: on CUDA)")
    ap.add_argument("--recompute-mfu", nargs="+", default=None, metavar="FILE",
                    help="print the PaLM-convention MFU of recorded gpu runs (JSON lines) and exit")
    args = ap.parse_args(argv)
    if args.recompute_mfu:
        for row in recompute_mfu(args.recompute_mfu):
            print(json.dumps(row))
        return 0
    only = set(args.only.split(","))
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the JSON result
    out: dict = {"host_cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if "gpu" in only:
        out["gpu"] = bench_gpu(args.flavor, args.seq_len, args.micro, args.steps, args.warmup, args.device_name,
                               args.objective, args.compile, args.profile, not args.no_overflow_check,
                               args.compile_loss, args.fused_adam, args.backbone)
    if "ddp" in only:
        out["ddp_vs_zero2"] = bench_ddp(args.steps)
    if "memory" in only:
        out["memory_zero2_vs_zero3"] = bench_memory(max(2, args.steps // 2))
    if "throughput" in only:
        from infra.ray_runtime import init_ray

        init_ray()
        out["throughput"] = bench_throughput(args.steps)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2), file=real_stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
