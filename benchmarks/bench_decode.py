"""Fast decoding benchmark: decoded tokens/s and quality of the sampler's fast paths; prints one JSON document.

    python benchmarks/bench_decode.py --checkpoint EXPORT_DIR --tokenizer TOKENIZER_DIR [--lengths 128 256]
        [--samples 16] [--block 32] [--evaluator smollm2-135m]

For every length, soft-masking on and off, and each setting below, ``--samples`` unconditional samples are decoded
in one batch (after one warm-up decode of that shape) and scored:
    plain          today's default sampler: ancestral (the paper's protocol), steps = length, no cache (the reference)
    prefix, dual   the same with the key/value cache (models.kv_cache)
    confidence     confidence order, steps = length (one token per step): the threshold rule's one-per-step limit
    thr0.7/0.8/0.9 threshold decoding (at most `length` steps), no cache
    thr0.9+dual    threshold 0.9 with the dual cache
    dual-x2, -x4   the dual cache with 2 / 4 tokens per step (ancestral, steps = length / 2 or / 4): random-order
                   parallel decoding, the paper's own NFE knob (steps = L/2, L/4)
All in semi-autoregressive blocks of ``--block`` tokens, temperature 1, nucleus 0.9. Reported per setting: decoded
tokens/s (samples · length / wall seconds of the decode), NFE, backbone positions computed, gen-PPL of the decoded
text under the project's evaluator LM (models.evaluation.gen_ppl), the whitespace and top-token shares (signs of
degenerate text), and the ratios to plain (speed-up, gen-PPL).

A checkpoint trained on shorter rows than ``length`` is run with its max_seq_len raised to ``length`` (rotary
positions: the weights do not change, the positions past the training length were never seen in training); the JSON
says so (``extrapolated``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from models.evaluation.evaluator_lm import load_evaluator  # noqa: E402
from models.evaluation.gen_ppl import generative_perplexity  # noqa: E402
from models.sampling import SamplerConfig, sample  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402

SETTINGS = {  # name -> SamplerConfig fields besides steps/soft_mask/block_length; tokens_per_step: steps = length / it
    "plain": dict(algorithm="ancestral"),
    "prefix": dict(algorithm="ancestral", cache="prefix"),
    "dual": dict(algorithm="ancestral", cache="dual"),
    "confidence": dict(algorithm="confidence"),
    "thr0.7": dict(algorithm="threshold", threshold=0.7),
    "thr0.8": dict(algorithm="threshold", threshold=0.8),
    "thr0.9": dict(algorithm="threshold", threshold=0.9),
    "thr0.9+dual": dict(algorithm="threshold", threshold=0.9, cache="dual"),
    "dual-x2": dict(algorithm="ancestral", cache="dual", tokens_per_step=2),
    "dual-x4": dict(algorithm="ancestral", cache="dual", tokens_per_step=4),
}


def with_context(model, length: int):
    """The model, its max_seq_len raised to ``length`` when shorter (same weights; rotary positions)."""
    if model.config.max_seq_len >= length:
        return model
    cfg = dataclasses.replace(model.config, max_seq_len=length)
    model.config = model.backbone.config = cfg
    return model


def pick_device(name: str) -> torch.device:
    """--device: cuda, cpu, or auto (cuda when available)."""
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def timed_sample(model, cfg: SamplerConfig, samples: int, length: int, seed: int, device: torch.device):
    """One 2-step warm-up decode of the same shape, then the timed one: (SampleOutput, wall seconds)."""
    sample(model, dataclasses.replace(cfg, steps=2), samples, length, seed=seed + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = sample(model, cfg, samples, length, seed=seed)
    sync()
    return out, time.perf_counter() - t0


def degeneracy(tokens: torch.Tensor, texts: list[str]) -> dict:
    """Two signs of degenerate text that gen-PPL alone hides: the whitespace share of the decoded characters and the
    most frequent token's share of the generated tokens."""
    chars = sum(len(t) for t in texts)
    spaces = sum(sum(c.isspace() for c in t) for t in texts)
    counts = Counter(tokens.reshape(-1).tolist())
    return {"space_share": round(spaces / max(chars, 1), 4),
            "top_token_share": round(counts.most_common(1)[0][1] / tokens.numel(), 4)}


def decode_scored(model, tok, ev, fields: dict, length: int, args, soft_mask: bool = True):
    """One setting's timed decode (``fields``: SamplerConfig fields; ``tokens_per_step`` K sets steps = length / K,
    otherwise steps = length) and its score: (SampleOutput, decoded texts, the shared row fields)."""
    fields = dict(fields)
    steps = max(1, length // fields.pop("tokens_per_step", 1))
    cfg = SamplerConfig(steps=steps, soft_mask=soft_mask, block_length=args.block, top_p=0.9, temperature=1.0,
                        **fields)
    out, wall = timed_sample(model, cfg, args.samples, length, args.seed, args.device)
    texts = tok.decode_batch(out.tokens.tolist())
    ppl = generative_perplexity(ev, texts, context_length=args.ppl_context, batch_size=8)
    return out, texts, {"wall_s": round(wall, 3), "tokens_per_s": round(args.samples * length / wall, 1),
                        "gen_ppl": round(ppl.ppl, 2), **degeneracy(out.tokens, texts)}


def run_setting(model, tok, ev, name: str, length: int, soft: bool, args) -> dict:
    out, texts, scored = decode_scored(model, tok, ev, SETTINGS[name], length, args, soft_mask=soft)
    return {"setting": name, "length": length, "soft_mask": soft, "nfe": out.nfe, "positions": out.positions,
            **scored, "example": texts[0][:80]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="export directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", required=True, help="the checkpoint's tokenizer (a dataset's tokenizer dir)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluator", default="smollm2-135m")
    p.add_argument("--ppl-context", type=int, default=128, help="evaluator context (tokens) of gen-PPL")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; on a loaded 2-core "
                                                         "host one thread is >10x faster than two)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model, the sampler and the evaluator run (auto: cuda when available)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    model = models.load_pretrained(args.checkpoint).to(args.device).eval()
    trained = model.config.max_seq_len
    tok = load_tokenizer(args.tokenizer)
    ev = load_evaluator(args.evaluator, device=args.device)
    rows = []
    for length in args.lengths:
        with_context(model, length)
        for soft in (True, False):
            part = {name: run_setting(model, tok, ev, name, length, soft, args) for name in args.settings}
            base = part.get("plain")
            for r in part.values():
                if base is not None:
                    r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
                    r["gen_ppl_ratio"] = round(r["gen_ppl"] / base["gen_ppl"], 3)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "decode", "checkpoint": args.checkpoint, "trained_max_seq_len": trained,
        "extrapolated": [n for n in args.lengths if n > trained], "samples": args.samples, "block": args.block,
        "evaluator": ev.info().get("description"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else None, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
