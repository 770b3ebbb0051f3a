"""Building an HF-backed diffusion LM: from a transformers config dict, a local HF directory, or a checkpoint.

    model = from_config_dict({"model_type": "qwen2", "hidden_size": 64, ...})          # random init (tests)
    model, tok = from_hf_dir("/models/Qwen2.5-Coder-0.5B", shift_logits=True)          # AR checkpoint (Dream recipe)
    models.save_pretrained(model, out); tok.save(out)                                  # servable export
    model = build(cfg)          # the registry's builder for "backbone": "hf" (+ state_to_save / load_state hooks)

GGUF files come in through ``models.gguf`` (dequantised once into an HF directory, then ``from_hf_dir``).
An adapter-only checkpoint names its base checkpoint; :func:`build` reads that base here, through
``models.checkpoint_format`` (not the generic loader, which dispatches back to this module).

[MASK]: the tokenizer's mask token when it has one (``models.tokenizer`` role names, or ``mask_token=``), else
``<|mask|>`` is appended to the tokenizer; when its id is past the embedding rows the embeddings are resized (new
rows = the mean of the old ones, deterministic). The id is recorded in ``HFDiffusionConfig.mask_token_id``.
``trust_remote_code`` stays off unless asked: a model_type transformers knows (or an alias in ``ARCH_ALIASES``) is
built from transformers' own code; anything else needs ``trust_remote_code=True``.
transformers is imported inside the functions (importing models stays light).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from models.adapters import AdapterConfig, apply_adapters, is_adapter_key
from models.checkpoint_format import read_config_json, read_weights
from models.hf_backbone import DTYPES, HFDiffusionConfig, HFDiffusionLM
from models.optim import is_sm_param

# model_type -> transformers model_type with the same architecture and weight names (no remote code needed).
# Dream (Dream-org/Dream-v0-*-7B) is Qwen2 with full attention: identical config fields and tensor names.
ARCH_ALIASES: dict[str, str] = {"Dream": "qwen2"}


def hf_config_object(hf_config: dict, trust_remote_code: bool = False, source: str = ""):
    """A transformers PretrainedConfig from a config dict (aliases resolved; remote code only when allowed)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = ARCH_ALIASES.get(hf_config["model_type"], hf_config["model_type"])
    if model_type in CONFIG_MAPPING:
        d = {k: v for k, v in hf_config.items() if k not in ("model_type", "auto_map")}
        return CONFIG_MAPPING[model_type].from_dict(d)
    if not trust_remote_code:
        raise ValueError(f"model_type {hf_config['model_type']!r} is unknown to transformers: it needs the "
                         f"checkpoint's own code (trust_remote_code=True) or an entry in ARCH_ALIASES")
    if not source or not Path(source).is_dir():
        raise ValueError(f"remote-code model_type {model_type!r} needs its source directory (config.source)")
    conf = AutoConfig.from_pretrained(source, trust_remote_code=True, local_files_only=True)
    for k, v in hf_config.items():
        setattr(conf, k, v)
    return conf


def build_causal_lm(cfg: HFDiffusionConfig, init_weights: bool = True):
    """The transformers causal LM of ``cfg.hf_config`` (random init, or uninitialised memory to be loaded into)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    conf = hf_config_object(cfg.hf_config, cfg.trust_remote_code, cfg.source)
    with contextlib.nullcontext() if init_weights else no_init_weights():
        lm = AutoModelForCausalLM.from_config(conf, dtype=DTYPES[cfg.dtype],
                                              attn_implementation=cfg.attn_implementation,
                                              trust_remote_code=cfg.trust_remote_code)
    if not init_weights:
        lm.tie_weights()  # transformers 5 skips tying under no_init_weights
    return lm


@torch.no_grad()
def ensure_mask_row(causal_lm, mask_token_id: int) -> None:
    """Resize the embeddings (and the head) so that ``mask_token_id`` has a row; new rows = the mean of the old ones
    (deterministic: loading the same checkpoint twice gives the same [MASK] embedding)."""
    rows = causal_lm.get_input_embeddings().weight.shape[0]
    if mask_token_id < rows:
        return
    causal_lm.resize_token_embeddings(mask_token_id + 1, mean_resizing=False)
    for module in {id(m): m for m in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings())}.values():
        w = module.weight  # (V', d); tied input/output embeddings share it
        w[rows:] = w[:rows].float().mean(0).to(w.dtype)
        if getattr(module, "bias", None) is not None:
            module.bias[rows:] = module.bias[:rows].mean()


def _finish(causal_lm, mask_token_id: int, source: str, **cfg_kw) -> HFDiffusionLM:
    ensure_mask_row(causal_lm, mask_token_id)
    causal_lm.config.is_causal = False
    dtype = next(causal_lm.parameters()).dtype
    cfg = HFDiffusionConfig(hf_config=causal_lm.config.to_dict(), mask_token_id=int(mask_token_id), source=source,
                            dtype={v: k for k, v in DTYPES.items()}.get(dtype, "float32"), **cfg_kw)
    return HFDiffusionLM(cfg, causal_lm)


def from_config_dict(hf_config: dict, *, mask_token_id: int | None = None, shift_logits: bool = True,
                     softmask_k: int | None = 1, max_seq_len: int | None = None, dtype: str = "float32",
                     attn_implementation: str = "sdpa") -> HFDiffusionLM:
    """Random-init model of a transformers config dict (needs ``model_type``). ``mask_token_id=None`` appends a row."""
    tmp = HFDiffusionConfig(hf_config=dict(hf_config), mask_token_id=0, dtype=dtype,
                            attn_implementation=attn_implementation)
    lm = build_causal_lm(tmp, init_weights=True)
    mask = lm.get_input_embeddings().weight.shape[0] if mask_token_id is None else mask_token_id
    return _finish(lm, mask, "config", shift_logits=shift_logits, softmask_k=softmask_k, max_seq_len=max_seq_len,
                   attn_implementation=attn_implementation)


def _load_dir_weights(lm, folder: Path) -> None:
    """Safetensors weights of an HF dir (single file or sharded index) into an already built model."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    if not all((folder / name).is_file() for name in files):
        raise FileNotFoundError(f"{folder}: no safetensors weights ({', '.join(files)})")
    own, loaded, unexpected = set(lm.state_dict()), set(), []
    for name in files:  # one shard in memory at a time
        shard = load_file(str(folder / name))
        unexpected += [k for k in lm.load_state_dict(shard, strict=False).unexpected_keys
                       if not k.endswith("rotary_emb.inv_freq")]
        loaded |= set(shard) & own
        del shard
    tied = {"lm_head.weight"} if lm.config.tie_word_embeddings else set()
    missing = sorted(own - loaded - tied)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the architecture: missing={missing[:8]} "
                         f"unexpected={unexpected[:8]}")


def _causal_lm_from_dir(folder: Path, dtype: str, attn_implementation: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    hf_config = json.loads((folder / "config.json").read_text())
    conf = hf_config_object(hf_config, trust_remote_code, str(folder))  # raises for unknown types w/o remote code
    if hf_config["model_type"] in ARCH_ALIASES:  # same architecture as a native class: build it, load the tensors
        cfg = HFDiffusionConfig(hf_config=conf.to_dict(), mask_token_id=0, dtype=dtype,
                                attn_implementation=attn_implementation)
        lm = build_causal_lm(cfg, init_weights=False)
        _load_dir_weights(lm, folder)
        return lm
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=DTYPES[dtype],
                                                attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)


def _tokenizer_with_mask(folder: Path, mask_token: str | None, eos_token: str | None = None):
    """The folder's tokenizer (models.tokenizer.TextTokenizer) with a mask role, or None without tokenizer files.

    ``mask_token`` / ``eos_token``: existing tokens chosen for those roles (else the tokenizer's own; a missing EOS or
    MASK is appended as ``<|endoftext|>`` / ``<|mask|>``)."""
    from models.tokenizer import load_tokenizer

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    roles = {k: v for k, v in (("mask", mask_token), ("eos", eos_token)) if v is not None}
    return load_tokenizer(folder, add_missing_specials=True, roles=roles or None)  # MissingSpecialTokenError


def from_hf_dir(path, *, shift_logits: bool = True, softmask_k: int | None = 1, mask_token: str | None = None,
                mask_token_id: int | None = None, trust_remote_code: bool = False, dtype: str = "float32",
                attn_implementation: str = "sdpa", max_seq_len: int | None = None, eos_token: str | None = None):
    """(HFDiffusionLM, TextTokenizer | None) from a local HF causal-LM directory (never the network).

    ``shift_logits=True`` for AR checkpoints (and Dream); False for checkpoints trained as MDLM (LLaDA).
    Without tokenizer files, ``mask_token_id`` (or a new appended row) is the [MASK] id. ``mask_token`` /
    ``eos_token`` pick existing tokens for those roles (EOS: the document separator preprocessing inserts).
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an HF model directory (no config.json)")
    tok = _tokenizer_with_mask(folder, mask_token, eos_token)
    lm = _causal_lm_from_dir(folder, dtype, attn_implementation, trust_remote_code)
    mask = tok.mask_id if tok is not None else mask_token_id
    if mask is None:
        mask = lm.get_input_embeddings().weight.shape[0]
    model = _finish(lm, mask, str(folder), shift_logits=shift_logits, softmask_k=softmask_k,
                    max_seq_len=max_seq_len, attn_implementation=attn_implementation,
                    trust_remote_code=trust_remote_code)
    return model, tok


# -------------------------------------------------------------------- the registry's builder and checkpoint hooks
def _alias_keys(sd: dict) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (tied embeddings): saved once, re-tied on load."""
    seen, out = set(), set()
    for k, v in sd.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            out.add(k)
        seen.add(ptr)
    return out


def _own_keys(sd: dict) -> set[str]:
    """Keys an adapter-only checkpoint stores: adapters and the SM head (the rest lives in the base checkpoint)."""
    return {k for k in sd if is_adapter_key(k) or is_sm_param(k)}


def state_to_save(model: HFDiffusionLM, sd: dict) -> dict:
    if model.config.base_checkpoint:
        keep = _own_keys(sd)
        return {k: v for k, v in sd.items() if k in keep}
    drop = _alias_keys(model.state_dict())
    return {k: v for k, v in sd.items() if k not in drop}


def load_state(model: HFDiffusionLM, sd: dict, path) -> None:
    own = model.state_dict()
    required = _own_keys(own) if model.config.base_checkpoint else set(own) - _alias_keys(own)
    missing, unexpected = sorted(required - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing={missing[:8]} "
                         f"unexpected={unexpected[:8]}")
    model.load_state_dict(sd, strict=False)


def base_from_checkpoint(cfg: HFDiffusionConfig):
    """The causal LM of an adapter-only checkpoint's base (a softmask HF checkpoint with the same architecture, read
    through models.checkpoint_format: config.json, then its weights into an uninitialised model)."""
    data = read_config_json(cfg.base_checkpoint)
    base_cfg = HFDiffusionConfig.from_dict(data["model"]) if data.get("backbone") == "hf" else None
    same = (base_cfg is not None and not base_cfg.adapters and not base_cfg.base_checkpoint
            and base_cfg.hf_config == cfg.hf_config and base_cfg.mask_token_id == cfg.mask_token_id)
    if not same:
        raise ValueError(f"base_checkpoint {cfg.base_checkpoint} is not the un-adapted HF model these adapters "
                         f"were trained on (architecture / mask id differ, or it has adapters itself)")
    base = HFDiffusionLM(base_cfg, build_causal_lm(base_cfg, init_weights=False))
    load_state(base, read_weights(cfg.base_checkpoint), cfg.base_checkpoint)
    return base.causal_lm.eval()


def build(cfg: HFDiffusionConfig, init_weights: bool = True) -> HFDiffusionLM:
    """The model of ``cfg``: random init (``init_weights``), or the weights of ``cfg.base_checkpoint``; then the
    adapters recorded in ``cfg.adapters`` (fresh: identity at init)."""
    if cfg.base_checkpoint:
        model = HFDiffusionLM(cfg, base_from_checkpoint(cfg))
    else:
        model = HFDiffusionLM(cfg, build_causal_lm(cfg, init_weights=init_weights))
    if cfg.adapters:
        apply_adapters(model, AdapterConfig.from_dict(cfg.adapters))
    return model


def build_for_load(cfg: HFDiffusionConfig) -> HFDiffusionLM:
    """As :func:`build`, with uninitialised weights (the checkpoint loader fills every one of them)."""
    return build(cfg, init_weights=False)
