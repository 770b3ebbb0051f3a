"""MDLM / soft-masking checkpoints -> a DiffusionLM with the ``dit`` backbone (models.dit), checked before use.

    model, info = from_mdlm_hub_dir("/models/mdlm-owt")            # kuleshov-group/mdlm-owt as downloaded
    model, info = from_lightning_checkpoint("sm.ckpt")             # a released SM (or MDLM) Lightning checkpoint
    models.save_pretrained(model, out)                             # what `softmask mdlm-import` writes

Sources
- Hub layout: a directory with config.json (``model_type: mdlm``: vocab_size, model_length, hidden_dim, cond_dim,
  n_blocks, n_heads, dropout, time_conditioning) and model.safetensors (or pytorch_model.bin, read weights-only);
  tensor names ``backbone.<MDLM name>``.
- Lightning layout (MDLM's ``Diffusion`` and the SM code's ``MDLM_SM``, saved by Lightning's ``save_checkpoint``):
  ``state_dict`` holds the live weights as ``backbone.<MDLM name>`` and, in SM checkpoints, the transparency head
  ``tran_head.{raw_scale, raw_centre_neg, raw_steep, raw_temperature}``; ``ema.shadow_params`` is a LIST of the EMA
  weights in the order of ``backbone.parameters()`` (then ``noise.parameters()``, none for the log-linear schedule);
  the head is not in the EMA. ``weights="ema"`` (what the authors evaluate) places the list by that order.

Key mapping (MDLM -> ours, under ``backbone.``; listed in MDLM's parameter order, blocks i = 0..n-1):
    vocab_embed.embedding                 -> embed.weight              (V, d)
    sigma_map.mlp.{0,2}.{weight,bias}     -> time_embed.mlp.{0,2}.*    (c, 256), (c,), (c, c), (c,)
    blocks.i.norm1.weight                 -> blocks.i.ln1.weight       (d,)
    blocks.i.attn_qkv.weight              -> blocks.i.attn.qkv.weight  (3d, d)
    blocks.i.attn_out.weight              -> blocks.i.attn.proj.weight (d, d)
    blocks.i.norm2.weight                 -> blocks.i.ln2.weight       (d,)
    blocks.i.mlp.{0,2}.{weight,bias}      -> blocks.i.mlp.{0,2}.*      (4d, d), (4d,), (d, 4d), (d,)
    blocks.i.adaLN_modulation.*           -> blocks.i.ada.*            (6d, c), (6d,)
    output_layer.norm_final.weight        -> ln_f.weight               (d,)
    output_layer.linear.{weight,bias}     -> lm_head.*                 (V, d), (V,)
    output_layer.adaLN_modulation.*       -> ada_f.*                   (2d, c), (2d,)
    rotary_emb.inv_freq (buffer)          -> not stored: checked against base 10000, gives head_dim = 2·len
    tran_head.raw_scale / raw_centre_neg / raw_steep -> sm_head.raw_scale / raw_centre / raw_steepness (the same
    parametrisation: ω_s = σ(raw), ω_b = −softplus(raw) − 1e-6, ω_a = softplus(raw) + 1e-6); raw_temperature
    only for a full-vocabulary head (softmask_k None), else dropped.
Checks, each a one-line ValueError naming what does not match: the config.json fields against the tensor shapes
(vocab, width, blocks, heads, conditioning width); every expected tensor present and no unknown ``backbone.`` /
``tran_head.`` tensor; every shape equal to the one the config implies; floating dtype (cast to fp32) and finite
values; the EMA list's length and each element's shape against the parameter it is placed on; the rotary frequencies.
Tensors outside ``backbone.``/``tran_head.`` (other Lightning modules) are ignored and listed in ``info``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from models.diffusion_lm import DiffusionLM
from models.dit import DIT_FLAVORS, DiTConfig, build
from models.weights_file import read_weights_file

PREFIX = "backbone."
HEAD_PREFIX = "tran_head."
INV_FREQ = "rotary_emb.inv_freq"
HEAD_KEYS = {"raw_scale": "raw_scale", "raw_centre_neg": "raw_centre", "raw_steep": "raw_steepness"}
HUB_FIELDS = {"vocab_size": "vocab_size", "hidden_dim": "d_model", "n_blocks": "n_layers", "n_heads": "n_heads",
              "cond_dim": "cond_dim", "model_length": "max_seq_len", "dropout": "dropout",
              "time_conditioning": "time_conditioning"}
_BLOCK = (("norm1.weight", "ln1.weight"), ("attn_qkv.weight", "attn.qkv.weight"),
          ("attn_out.weight", "attn.proj.weight"), ("norm2.weight", "ln2.weight"),
          ("mlp.0.weight", "mlp.0.weight"), ("mlp.0.bias", "mlp.0.bias"), ("mlp.2.weight", "mlp.2.weight"),
          ("mlp.2.bias", "mlp.2.bias"), ("adaLN_modulation.weight", "ada.weight"),
          ("adaLN_modulation.bias", "ada.bias"))


def mdlm_key_map(n_layers: int) -> list[tuple[str, str]]:
    """(MDLM name, our name) of every parameter, in MDLM's ``backbone.parameters()`` order (no prefixes)."""
    pairs = [("vocab_embed.embedding", "embed.weight")]
    pairs += [(f"sigma_map.mlp.{i}.{w}", f"time_embed.mlp.{i}.{w}") for i in (0, 2) for w in ("weight", "bias")]
    pairs += [(f"blocks.{i}.{a}", f"blocks.{i}.{b}") for i in range(n_layers) for a, b in _BLOCK]
    pairs += [("output_layer.norm_final.weight", "ln_f.weight"), ("output_layer.linear.weight", "lm_head.weight"),
              ("output_layer.linear.bias", "lm_head.bias"), ("output_layer.adaLN_modulation.weight", "ada_f.weight"),
              ("output_layer.adaLN_modulation.bias", "ada_f.bias")]
    return pairs


def _fail(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what}")


def _tensor(sd: dict, name: str, source: str) -> torch.Tensor:
    if name not in sd:
        raise _fail(source, f"tensor {name} is missing (not an MDLM DiT checkpoint?)")
    return sd[name]


def infer_config(sd: dict[str, torch.Tensor], source: str, **declared: Any) -> DiTConfig:
    """The DiTConfig the tensors of ``sd`` (MDLM names, no prefix) imply; ``declared`` fields (None = unknown) must
    agree with them. ``n_heads`` comes from the rotary frequencies when the checkpoint has them."""
    vocab, d = _tensor(sd, "vocab_embed.embedding", source).shape
    cond, freq = _tensor(sd, "sigma_map.mlp.0.weight", source).shape
    n_layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    mlp = _tensor(sd, "blocks.0.mlp.0.weight", source).shape[0] if n_layers else 0
    inferred = {"vocab_size": vocab, "d_model": d, "n_layers": n_layers, "cond_dim": cond, "freq_dim": freq}
    if INV_FREQ in sd:
        inferred["n_heads"] = d // (2 * sd[INV_FREQ].numel())
    for name, value in inferred.items():
        if declared.get(name) is not None and declared[name] != value:
            raise _fail(source, f"{name}={declared[name]!r} is declared but the tensors give {value!r}")
    if n_layers == 0 or mlp % d:
        raise _fail(source, f"no DiT blocks, or an MLP width {mlp} that is not a multiple of the width {d}")
    fields = {k: v for k, v in declared.items() if v is not None}
    if "n_heads" not in inferred and "n_heads" not in fields:
        raise _fail(source, "n_heads is needed: the checkpoint has no rotary_emb.inv_freq to infer it from")
    try:
        return DiTConfig.from_dict({**DIT_FLAVORS["small"], "flavor": "mdlm", **fields, **inferred,
                                    "mask_token_id": fields.get("mask_token_id"), "mlp_ratio": mlp // d})
    except ValueError as e:
        raise _fail(source, str(e)) from None


def _checked(t: Any, name: str, shape: tuple, source: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise _fail(source, f"{name} is {getattr(t, 'dtype', type(t).__name__)}, expected a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        raise _fail(source, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} for this config")
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise _fail(source, f"{name} holds non-finite values")
    return t


def _check_rotary(inv_freq: torch.Tensor, cfg: DiTConfig, source: str) -> None:
    hd = cfg.head_dim
    want = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if inv_freq.shape != want.shape or not torch.allclose(inv_freq.float(), want, rtol=1e-5):
        raise _fail(source, f"{INV_FREQ} is not rotary base {cfg.rope_base:g} over head_dim {hd}")


def convert_backbone(sd: dict[str, torch.Tensor], cfg: DiTConfig, source: str) -> dict[str, torch.Tensor]:
    """MDLM-named backbone tensors (no prefix) -> our ``backbone.*`` state, checked; vocab rows padded when the config
    pads (zero rows: never an input, never predicted)."""
    pairs = mdlm_key_map(cfg.n_layers)
    known = {a for a, _ in pairs} | {INV_FREQ}
    unknown = sorted(set(sd) - known)
    if unknown:
        raise _fail(source, f"unexpected tensor(s) {unknown[:4]} for an MDLM DiT of {cfg.n_layers} blocks")
    if INV_FREQ in sd:
        _check_rotary(sd[INV_FREQ], cfg, source)
    with torch.device("meta"):
        shapes = {k.removeprefix(PREFIX): tuple(v.shape) for k, v in build(cfg).state_dict().items()}
    out = {}
    for theirs, ours in pairs:
        shape = shapes[ours]
        if ours in ("embed.weight", "lm_head.weight", "lm_head.bias"):
            shape = (cfg.vocab_size, *shape[1:])
        t = _checked(_tensor(sd, theirs, source), theirs, shape, source)
        if shape[0] != shapes[ours][0]:
            t = torch.cat([t, t.new_zeros((shapes[ours][0] - shape[0], *shape[1:]))])
        out[PREFIX + ours] = t
    return out


def convert_head(head: dict[str, torch.Tensor], softmask_k: int | None, source: str) -> dict[str, torch.Tensor]:
    """The SM code's transparency-head scalars -> ``sm_head.*`` (empty when the checkpoint has no head)."""
    if not head:
        return {}
    wanted = {**HEAD_KEYS, **({"raw_temperature": "raw_temperature"} if softmask_k is None else {})}
    missing = sorted(set(HEAD_KEYS) - set(head))
    unknown = sorted(set(head) - set(HEAD_KEYS) - {"raw_temperature"})
    if missing or unknown:
        raise _fail(source, f"transparency head: missing {missing}, unexpected {unknown}")
    return {f"sm_head.{ours}": _checked(head[theirs].reshape(()), HEAD_PREFIX + theirs, (), source)
            for theirs, ours in wanted.items() if theirs in head}


def _model(cfg: DiTConfig, state: dict[str, torch.Tensor], source: str) -> DiffusionLM:
    model = build(cfg)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("sm_head."))
    if missing:
        raise _fail(source, f"no value for {missing[:4]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def from_mdlm_hub_dir(path: str | Path, *, softmask_k: int | None = 3, vocab_pad_multiple: int = 1,
                      **overrides: Any) -> tuple[DiffusionLM, dict]:
    """(model, info) from a hub-layout directory (see the module docstring). ``overrides``: DiTConfig fields that
    replace config.json's (e.g. ``time_conditioning``, ``dropout``, ``max_seq_len``); the SM head is fresh."""
    folder = Path(path)
    source = str(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise _fail(source, "no config.json (expected the kuleshov-group/mdlm-owt layout)")
    hub = json.loads(cfg_file.read_text())
    if hub.get("model_type") != "mdlm":
        raise _fail(source, f"config.json has model_type {hub.get('model_type')!r}, expected 'mdlm'")
    files = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
    if not files:
        raise _fail(source, "no model.safetensors or pytorch_model.bin")
    sd = read_weights_file(folder / files[0])
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _fail(source, f"{files[0]} is not a flat dict of tensors")
    foreign = sorted(k for k in sd if not k.startswith(PREFIX))
    if foreign:
        raise _fail(source, f"tensor names must start with {PREFIX!r}, found {foreign[:3]}")
    declared = {ours: hub.get(theirs) for theirs, ours in HUB_FIELDS.items()}
    declared.update(overrides, softmask_k=softmask_k, vocab_pad_multiple=vocab_pad_multiple)
    tensors = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    cfg = infer_config(tensors, source, **declared)
    model = _model(cfg, convert_backbone(tensors, cfg, source), source)
    return model, {"format": "mdlm_hub", "weights": files[0], "objective": "binary", "sm_head": None,
                   "ignored_keys": []}


def lightning_tensors(ckpt: Any, weights: str, source: str) -> tuple[dict, dict, list[str], dict]:
    """(backbone tensors by MDLM name, transparency-head tensors, ignored keys, facts) of a Lightning checkpoint dict;
    ``weights``: "ema" places ``ema.shadow_params`` by MDLM's parameter order, "live" takes ``state_dict``."""
    if weights not in ("ema", "live"):
        raise _fail(source, f"weights must be 'ema' or 'live', got {weights!r}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise _fail(source, "no 'state_dict' (not a Lightning checkpoint)")
    sd = ckpt["state_dict"]
    backbone = {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX)}
    head = {k.removeprefix(HEAD_PREFIX): v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    ignored = sorted(k for k in sd if not k.startswith((PREFIX, HEAD_PREFIX)))
    facts = {"global_step": ckpt.get("global_step") if isinstance(ckpt.get("global_step"), int) else None}
    if weights == "ema":
        ema = ckpt.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if not isinstance(shadow, list):
            raise _fail(source, "no EMA weights (ema.shadow_params); use weights=live for the live weights")
        names = [k for k in backbone if k != INV_FREQ]  # parameters in registration order (= the EMA's order)
        n_layers = 1 + max((int(m.group(1)) for k in names if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        order = [a for a, _ in mdlm_key_map(n_layers)]
        if names != order:
            found, want = names + [""], order + [""]
            at = next(i for i, (a, b) in enumerate(zip(found, want)) if a != b)
            raise _fail(source, f"state_dict's backbone tensors are not in MDLM's parameter order (position {at}: "
                                f"{found[at]!r}, expected {want[at]!r}): the EMA list cannot be placed")
        if len(shadow) != len(order):
            raise _fail(source, f"ema.shadow_params has {len(shadow)} tensors, the backbone {len(order)} parameters")
        for i, (name, value) in enumerate(zip(order, shadow)):
            if not isinstance(value, torch.Tensor) or value.shape != backbone[name].shape:
                raise _fail(source, f"ema.shadow_params[{i}] has shape {tuple(getattr(value, 'shape', ()))}, its "
                                    f"parameter {name} {tuple(backbone[name].shape)}")
            backbone[name] = value
        facts["ema_num_updates"] = ema.get("num_updates")
    return backbone, head, ignored, facts


def from_lightning_checkpoint(path: str | Path, *, weights: str = "ema", softmask_k: int | None = 3,
                              n_heads: int | None = None, vocab_pad_multiple: int = 1,
                              **overrides: Any) -> tuple[DiffusionLM, dict]:
    """(model, info) from an MDLM or SM Lightning checkpoint. The architecture comes from the tensors (n_heads from
    the rotary frequencies, else ``n_heads``); ``overrides`` set what tensors cannot tell (time_conditioning,
    default off as in MDLM OWT and the SM paper; dropout; max_seq_len). An SM checkpoint's learned ω fill the SM head;
    without them the head is fresh (ω_s ≈ 0: the binary model)."""
    source = str(path)
    backbone, head, ignored, facts = lightning_tensors(read_weights_file(path), weights, source)
    cfg = infer_config(backbone, source, n_heads=n_heads, softmask_k=softmask_k,
                       vocab_pad_multiple=vocab_pad_multiple, **overrides)
    state = {**convert_backbone(backbone, cfg, source), **convert_head(head, softmask_k, source)}
    model = _model(cfg, state, source)
    info = {"format": "lightning", "weights": weights, "objective": "sm" if head else "binary",
            "sm_head": model.sm_head.values() if head else None, "ignored_keys": ignored, **facts}
    return model, info

