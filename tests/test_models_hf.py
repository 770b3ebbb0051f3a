"""HF backbone adapter: bidirectional attention, Dream shift, soft input, [MASK], loading (dir / alias / GGUF),
checkpoint round trips, LoRA/DoRA adapters, and a tiny end-to-end train + sample run (CPU, random-init Qwen2)."""
from __future__ import annotations

import json

import pytest
import torch

import models
from models.diffusion_lm import NEG_INF

QWEN = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)


def tiny(seed=0, **kw):
    from models.hf_loading import from_config_dict

    torch.manual_seed(seed)
    return from_config_dict({**QWEN, **kw.pop("hf", {})}, mask_token_id=kw.pop("mask_token_id", 299), **kw).eval()


def masked_batch(vocab=299, mask_id=299, B=2, L=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, L), generator=g)
    x[:, 1::2] = mask_id  # (B, L): every other position masked
    return x


def soft_on(model):
    """Make λ ≈ ω_s ≈ 0.82 on every masked row (ω_b ≪ 0), so the SM feedback visibly changes the input."""
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(1.5)
        model.sm_head.raw_centre.fill_(20.0)
    return model


def hf_causal_reference(model_type="qwen2", attn="sdpa", seed=0, **over):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(seed)
    conf = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in {**QWEN, **over}.items() if k != "model_type"})
    return AutoModelForCausalLM.from_config(conf, attn_implementation=attn).eval()


# --------------------------------------------------------------------------------------------- attention / shift
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_is_bidirectional_where_the_plain_model_is_causal(attn):
    model = tiny(attn_implementation=attn)
    plain = hf_causal_reference(attn=attn)
    plain.load_state_dict(model.causal_lm.state_dict())
    x = torch.randint(0, 299, (1, 12))
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 7) % 299  # change only the LAST token
    with torch.no_grad():
        ours = [model.backbone.hidden(v) for v in (x, x2)]  # (1, L, d); shift on: position 1 reads position 0
        ref = [plain.model(input_ids=v, use_cache=False).last_hidden_state for v in (x, x2)]
    assert (ref[0][0, :-1] - ref[1][0, :-1]).abs().max() == 0  # control: the AR model cannot see the future
    assert (ours[0][0, 0] - ours[1][0, 0]).abs().max() > 1e-4  # ours: position 0 sees the last token


def test_dream_shift_prediction_for_token_i_comes_from_position_i_minus_1():
    shifted = tiny(shift_logits=True)
    unshifted = tiny(shift_logits=False)
    unshifted.load_state_dict(shifted.state_dict())
    x = masked_batch()
    with torch.no_grad():
        raw = shifted.causal_lm(input_ids=x, use_cache=False).logits  # HF's own forward (bidirectional now)
        a, b = shifted(x), unshifted(x)  # (B, L, V)
    expected = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
    expected[..., shifted.mask_id] = NEG_INF
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:, 1:], b[:, :-1], atol=1e-5, rtol=1e-5)  # token i <- position i-1
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=1e-5)      # position 0 keeps its own
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-3  # the shift is not a no-op
    assert (a[..., shifted.mask_id] == NEG_INF).all()


def test_soft_mask_input_is_the_sparse_embedding_mixture():
    model = soft_on(tiny())
    x = masked_batch()
    E = model.backbone.embed.weight  # (V, d)
    ids = torch.stack([x, torch.randint(0, 299, x.shape)], -1)  # (B, L, 2)
    w = torch.rand(*x.shape, 2)
    with torch.no_grad():
        sparse = model.backbone.hidden((ids, w))
        dense_in = (w.unsqueeze(-1) * E[ids]).sum(-2)  # (B, L, d)
        dense = model.causal_lm.get_decoder()(inputs_embeds=dense_in, use_cache=False).last_hidden_state
        onehot = model.backbone.hidden((x.unsqueeze(-1), torch.ones(*x.shape, 1)))
        tokens = model.backbone.hidden(x)
        single, (two, stats) = model(x), model(x, two_pass=True, with_stats=True)
    torch.testing.assert_close(sparse, torch.cat([dense[:, :1], dense[:, :-1]], 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(onehot, tokens, atol=1e-5, rtol=1e-5)
    assert stats.means()["lambda_mean"] > 0.5
    assert (single - two).abs().max() > 1e-3  # the feedback changes the prediction


def test_init_parameters_reinitialises_every_module_through_gather():
    import contextlib

    model = tiny()
    q = model.backbone.lm.model.layers[0].self_attn.q_proj.weight
    before, seen = q.detach().clone(), []

    def gather(params):
        seen.extend(params)
        return contextlib.nullcontext()

    torch.manual_seed(5)
    model.backbone.init_parameters(gather)
    assert {id(p) for p in seen} == {id(p) for p in model.backbone.parameters()}
    assert (q - before).abs().max() > 1e-3 and abs(q.std().item() - 0.02) < 0.01  # HF's N(0, initializer_range)


# --------------------------------------------------------------------------------------------- [MASK] / loading
def _bpe(tmp_path, specials):
    from tokenizers import ByteLevelBPETokenizer

    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(["def add(a, b):\n    return a + b\n" * 20, "the quick brown fox " * 20],
                           vocab_size=290, min_frequency=1, special_tokens=specials, show_progress=False)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tk._tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tk.get_vocab_size()


def _hf_dir(tmp_path, specials, vocab_like_tokenizer=False):
    """An HF model dir (random Qwen2 + a tiny BPE tokenizer.json); embeddings have 300 rows or exactly the tokens."""
    n_tok = _bpe(tmp_path, specials)
    ref = hf_causal_reference(vocab_size=n_tok if vocab_like_tokenizer else 300)
    ref.save_pretrained(str(tmp_path))
    return ref, n_tok


def test_from_config_dict_appends_a_mask_row_and_records_it():
    from models.hf_loading import from_config_dict

    torch.manual_seed(0)
    model = from_config_dict(QWEN)  # no mask id: a row is appended
    assert model.config.mask_token_id == 300 and model.config.vocab_size == 301
    assert model.backbone.embed.weight.shape[0] == 301 and model.backbone.lm_head.weight.shape[0] == 301
    assert model.config.hf_config["vocab_size"] == 301 and model.config.hf_config["is_causal"] is False


def test_from_hf_dir_uses_the_tokenizers_mask_or_adds_one(tmp_path):
    from models.hf_loading import from_hf_dir

    _, n_tok = _hf_dir(tmp_path / "with", ["<|endoftext|>", "<|mask|>"])
    model, tok = from_hf_dir(tmp_path / "with")
    assert tok.mask_id == 1 and model.config.mask_token_id == 1 and model.config.vocab_size == 300  # no resize
    ref, n_tok = _hf_dir(tmp_path / "without", ["<|endoftext|>"], vocab_like_tokenizer=True)
    model, tok = from_hf_dir(tmp_path / "without")
    assert tok.mask_token == "<|mask|>" and tok.mask_id == n_tok == model.config.mask_token_id
    assert model.config.vocab_size == n_tok + 1  # resized for the new token
    x = torch.randint(0, n_tok, (2, 10))
    with torch.no_grad():  # the old rows are the checkpoint's: the adapter reads the same weights
        torch.testing.assert_close(model.backbone.embed.weight[:n_tok], ref.get_input_embeddings().weight)
        assert model(x).shape == (2, 10, n_tok + 1)


def test_dream_alias_loads_without_remote_code_and_unknown_types_refuse(tmp_path):
    from models.hf_loading import from_hf_dir

    ref, _ = _hf_dir(tmp_path / "q", ["<|endoftext|>", "<|mask|>"])
    qwen, _ = from_hf_dir(tmp_path / "q")
    dream = tmp_path / "dream"
    _bpe(dream, ["<|endoftext|>", "<|mask|>"])
    ref.save_pretrained(str(dream))
    cfg = json.loads((dream / "config.json").read_text())
    cfg.update(model_type="Dream", architectures=["DreamModel"],
               auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"})
    (dream / "config.json").write_text(json.dumps(cfg))
    (dream / "modeling_dream.py").write_text("raise RuntimeError('remote code must not run')\n")
    model, _ = from_hf_dir(dream)
    x = masked_batch(mask_id=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), qwen(x), atol=1e-5, rtol=1e-5)
    cfg["model_type"] = "SomethingNew"
    (dream / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code"):
        from_hf_dir(dream)


def _write_gguf(path, ref, tokenizer_json):
    import gguf
    import numpy as np
    from gguf.quants import quantize

    c, vocab = ref.config, tokenizer_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # id 0 = <|endoftext|> (control)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]])
    w.add_eos_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    deq = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied
        base, suffix = k.rsplit(".", 1)
        arr = v.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:  # Q8_0 blocks of 32: really exercise dequantisation
            q = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"{names.get_name(base)}.{suffix}", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq[k] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
        else:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


def test_gguf_is_dequantised_once_and_cached(tmp_path, monkeypatch):
    from models import gguf
    from models.gguf import from_gguf
    from models.hf_loading import from_config_dict

    n_tok = _bpe(tmp_path / "tok", ["<|endoftext|>"])
    ref = hf_causal_reference(vocab_size=n_tok)
    deq = _write_gguf(tmp_path / "tiny.gguf", ref, json.loads((tmp_path / "tok" / "tokenizer.json").read_text()))
    model, tok = from_gguf(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache")
    assert tok.mask_id == n_tok == model.config.mask_token_id and model.config.vocab_size == n_tok + 1
    assert tok.encode("def add(a, b)") and tok.decode(tok.encode("def add(a, b)")) == "def add(a, b)"
    # reference: the original weights with the Q8_0 round trip applied, same [MASK] row, same adapter
    expect = from_config_dict({**QWEN, "vocab_size": n_tok}, mask_token_id=n_tok).eval()
    sd = {**ref.state_dict(), **deq}
    own = expect.causal_lm.state_dict()
    sd = {k: (torch.cat([v, own[k][n_tok:]]) if v.shape[0] == n_tok else v) for k, v in sd.items()}
    sd["model.embed_tokens.weight"][n_tok] = model.backbone.embed.weight[n_tok].detach()  # its mean-resized row
    sd.pop("lm_head.weight")  # tied to the embeddings
    assert expect.causal_lm.load_state_dict(sd, strict=False).missing_keys == ["lm_head.weight"]
    x = masked_batch(vocab=n_tok, mask_id=n_tok)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expect(x), atol=1e-5, rtol=1e-5)
    assert list((tmp_path / "cache").iterdir()) and any((tmp_path / "cache").rglob("model.safetensors"))

    def no_convert(*a, **k):
        raise AssertionError("GGUF converted twice")

    monkeypatch.setattr(gguf, "convert_gguf", no_convert)
    again, _ = from_gguf(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    # a servable export: weights + config + tokenizer whose roles match the model (what the Serve deployment checks)
    from models.tokenizer import load_tokenizer

    export = models.save_pretrained(model, tmp_path / "export")
    tok.save(export)
    served_tok, served = load_tokenizer(export / "tokenizer.json"), models.load_pretrained(export)
    assert served_tok.mask_id == served.config.mask_token_id and served_tok.vocab_size <= served.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- checkpoints
def test_hf_checkpoint_round_trip_and_registry_dispatch(tmp_path):
    model = soft_on(tiny())
    x = masked_batch()
    out = models.save_pretrained(model, tmp_path / "hf", metadata={"note": "x"})
    data = json.loads((out / "config.json").read_text())
    assert data["backbone"] == "hf" and data["model"]["mask_token_id"] == 299
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "softmask_head.json"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "backbone.lm.model.embed_tokens.weight" in keys and "backbone.lm.lm_head.weight" not in keys  # tied: once
    cfg, meta = models.read_config(out)
    from models.hf_backbone import HFDiffusionConfig, HFDiffusionLM

    assert isinstance(cfg, HFDiffusionConfig) and cfg == model.config and meta == {"note": "x"}
    loaded = models.load_pretrained(out)
    assert isinstance(loaded, HFDiffusionLM)
    assert loaded.backbone.lm_head.weight is loaded.backbone.embed.weight  # re-tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, two_pass=True), model(x, two_pass=True), atol=0, rtol=0)
    data["model"]["hf_config"].update(num_hidden_layers=3, layer_types=["full_attention"] * 3)
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match"):
        models.load_pretrained(out)
    data["backbone"] = "nope"
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown backbone"):
        models.load_pretrained(out)


def test_core_checkpoints_are_written_and_read_as_before(tmp_path):
    torch.manual_seed(0)
    core = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    out = models.save_pretrained(core, tmp_path / "core")
    assert "backbone" not in json.loads((out / "config.json").read_text())  # old format, byte for byte
    loaded = models.load_pretrained(out)
    assert type(loaded) is models.DiffusionLM and loaded.config == core.config
    x = torch.randint(0, 63, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), core(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- adapters
def test_dora_adapters_round_trip_adapter_only_save_and_merge(tmp_path):
    from models.adapters import AdapterConfig, apply_adapters, merge_adapters
    from models.checkpoint import save_adapters

    model = soft_on(tiny())
    base = models.save_pretrained(model, tmp_path / "base")  # the frozen base the adapters are trained on
    apply_adapters(model, AdapterConfig(r=4, alpha=8, dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("sm_head.") for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == {"q_proj", "k_proj",
                                                                                            "v_proj", "o_proj"}
    with torch.no_grad():  # as if trained: move every adapter off its identity init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            elif "magnitude" in n:
                p.mul_(1.1)
    x = masked_batch()
    with torch.no_grad():
        want = model(x, two_pass=True)
        assert (want - models.load_pretrained(base)(x, two_pass=True)).abs().max() > 1e-3  # adapters matter

    full = models.save_pretrained(model, tmp_path / "full")  # unmerged adapters + config.adapters
    assert json.loads((full / "config.json").read_text())["model"]["adapters"]["dora"] is True
    only = save_adapters(model, tmp_path / "adapters", base_checkpoint=base)  # adapters + SM head; base from `base`
    assert model.config.base_checkpoint is None
    assert (only / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size / 5
    for path in (full, only):
        loaded = models.load_pretrained(path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, two_pass=True), want, atol=0, rtol=0)
        assert loaded.sm_head.values() == model.sm_head.values()

    merged = merge_adapters(models.load_pretrained(only))
    assert not any("lora_" in n for n, _ in merged.named_parameters()) and merged.config.adapters is None
    merged.config.base_checkpoint = None
    with torch.no_grad():
        torch.testing.assert_close(merged(x, two_pass=True), want, atol=1e-5, rtol=0)
    re = models.load_pretrained(models.save_pretrained(merged, tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(re(x, two_pass=True), merged(x, two_pass=True), atol=0, rtol=0)


def test_adapter_only_checkpoint_refuses_a_base_it_was_not_trained_on(tmp_path):
    from models.adapters import AdapterConfig, apply_adapters
    from models.checkpoint import save_adapters

    model = apply_adapters(tiny(), AdapterConfig(r=2, alpha=2, dora=False))
    other_mask = models.save_pretrained(tiny(mask_token_id=298), tmp_path / "other_mask")  # same architecture
    core = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=64, d_model=32, n_layers=1,
                                                             n_heads=2))
    not_hf = models.save_pretrained(core, tmp_path / "core")
    adapted = models.save_pretrained(model, tmp_path / "adapted")  # has adapters itself
    for i, base in enumerate((other_mask, not_hf, adapted)):
        only = save_adapters(model, tmp_path / f"only{i}", base_checkpoint=base)
        with pytest.raises(ValueError, match="is not the un-adapted HF model"):
            models.load_pretrained(only)


def test_worker_adapter_wrapper_targets_hf_projections():
    from workers.train_adapters import apply_adapters, core_state_dict

    model = apply_adapters(tiny(), freeze_backbone=True, lora_r=2, lora_alpha=4, use_dora=False,
                           targets=["q_proj", "v_proj"])
    assert model.config.adapters == {"r": 2, "alpha": 4, "dora": False, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    sd = core_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    assert set(sd) == set(tiny().state_dict())


# --------------------------------------------------------------------------------------------- end to end
def test_tiny_qwen2_trains_with_the_sm_objective_and_samples_with_every_algorithm():
    from models.objective import ObjectiveConfig, training_loss, validation_nll
    from models.optim import param_groups
    from models.sampling import ALGORITHMS, SamplerConfig, sample

    model = tiny(seed=3).train()
    obj = ObjectiveConfig(kind="sm", p_sm=1.0)
    opt = torch.optim.AdamW(param_groups(model, lr=3e-3, sm_lr=1e-2))
    x0 = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))  # a small fixed batch to fit

    def fixed_noise_elbo():  # the same 4 noise draws (t, masks) every time: a noise-free before/after comparison
        return sum(validation_nll(model, x0, obj, seed=123, step=s, two_pass=True)[0] for s in range(4))

    before = fixed_noise_elbo()
    model.train()
    for step in range(30):
        loss, m = training_loss(model, x0, obj, seed=0, step=step, two_pass=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert m["two_pass"] == 1.0 and "lambda_mean" in m and loss.item() == loss.item()
    assert model.sm_head.raw_scale.grad is not None  # ω reached through λ
    after = fixed_noise_elbo()
    assert after < 0.8 * before, (before, after)  # ~ ln(300) -> ~ ln(40) per token and below

    prompt = [[5, 6, 7], [8, 9, 10]]
    for alg in ALGORITHMS:
        out = sample(model, SamplerConfig(steps=6, algorithm=alg, soft_mask=True), num_samples=2, length=16,
                     prompt_ids=prompt, seed=0)
        assert out.tokens.shape == (2, 16) and not (out.tokens == model.mask_id).any(), alg
        assert out.tokens[:, :3].tolist() == prompt and 1 <= out.nfe <= 7, alg


@pytest.mark.parametrize("two_pass", [False, True])
def test_masked_only_forward_gives_the_masked_rows_of_the_full_logits(two_pass):
    model = soft_on(tiny(shift_logits=True))
    x = masked_batch()
    with torch.no_grad():
        full = model(x, two_pass=two_pass)  # (B, L, V)
        rows = model(x, two_pass=two_pass, masked_only=True)  # (M, V)
    torch.testing.assert_close(rows, full[x == model.mask_id], atol=1e-5, rtol=1e-5)
