"""Fast decoding: confidence-threshold parallel decoding and the block-wise key/value cache (models.kv_cache)."""
import pytest
import torch

import models
from models.dit import DiTConfig, build as build_dit
from models.kv_cache import hidden_window, window
from models.sampling import SamplerConfig, sample

PROMPTS = [[5, 6, 7, 8, 9], [10], [11, 12]]


@pytest.fixture(scope="module")
def model(sampling_model):
    return sampling_model


# ------------------------------------------------------------------------------------------ threshold decoding
@pytest.mark.parametrize("soft_mask", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_threshold_one_is_one_token_per_step_confidence_decoding(model, soft_mask, temperature):
    """steps = length: the confidence rule reveals one position per step (round(#masked·(1 − s/t)) = 1); threshold
    1.0 (no probability reaches it) reveals only the most confident one: the same draws, the same tokens."""
    kw = dict(steps=24, block_length=8, soft_mask=soft_mask, temperature=temperature, cache_unchanged=False)
    ref = sample(model, SamplerConfig(algorithm="confidence", **kw), 3, 24, prompt_ids=PROMPTS, seed=4,
                 return_trajectory=True)
    thr = sample(model, SamplerConfig(algorithm="threshold", threshold=1.0, **kw), 3, 24, prompt_ids=PROMPTS,
                 seed=4, return_trajectory=True)
    assert torch.equal(ref.tokens, thr.tokens)
    assert thr.nfe == ref.nfe == 7 + 8 + 8  # the first block: 7 steps (row 1's 7 masked positions)
    per_row = [(x == model.mask_id).sum(1) for x in thr.trajectory]  # (N,) masked per step
    assert all(bool(((p - c) <= 1).all()) for p, c in zip(per_row, per_row[1:]))  # at most one per row and step


def test_threshold_reveals_several_positions_per_step_and_at_least_one(model):
    """A low threshold decodes a block in fewer forwards than it has positions; every step reveals >= 1 position,
    and nothing is left masked."""
    cfg = SamplerConfig(steps=32, block_length=8, algorithm="threshold", threshold=0.004, temperature=0.0)
    out = sample(model, cfg, 2, 32, seed=0, return_trajectory=True)
    assert not (out.tokens == model.mask_id).any()
    counts = [int((x == model.mask_id).sum()) for x in out.trajectory]
    steps = [a - b for a, b in zip([2 * 32] + counts, counts)]
    assert all(c >= 1 for c in steps), steps
    assert max(steps) > 2 and out.nfe < 32 and out.nfe == len(steps)  # several per row in some step
    every = sample(model, SamplerConfig(steps=32, block_length=8, algorithm="threshold", threshold=1e-9,
                                        temperature=0.0), 2, 32, seed=0)
    assert every.nfe == 4  # every position passes: one forward per block


def test_threshold_and_cache_are_validated():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            SamplerConfig(algorithm="threshold", threshold=bad)
    with pytest.raises(ValueError, match="cache"):
        SamplerConfig(cache="everything")


# ------------------------------------------------------------------------------------- per-row settings
@pytest.mark.parametrize("algorithm", ["ancestral", "threshold", "confidence"])
def test_per_row_values_equal_to_the_config_change_nothing(model, algorithm):
    """The per-row path with every row at cfg's values draws the same tokens as the scalar path (same seed)."""
    cfg = SamplerConfig(steps=16, block_length=8, algorithm=algorithm, threshold=0.05, temperature=0.8, top_p=0.9)
    ref = sample(model, cfg, 3, 24, prompt_ids=PROMPTS, seed=2)
    same = sample(model, cfg, 3, 24, prompt_ids=PROMPTS, seed=2,
                  per_row={"temperature": [0.8] * 3, "top_p": [0.9] * 3, "threshold": [0.05] * 3})
    assert torch.equal(ref.tokens, same.tokens) and ref.nfe == same.nfe


def test_rows_of_one_call_follow_their_own_threshold(model):
    """Threshold 1.0 on row 0 reveals one position per step; 1e-9 on row 1 reveals its whole block in one step."""
    cfg = SamplerConfig(steps=24, block_length=8, algorithm="threshold", temperature=0.0, cache_unchanged=False)
    out = sample(model, cfg, 2, 24, seed=0, return_trajectory=True, per_row={"threshold": [1.0, 1e-9]})
    masked = [(x == model.mask_id).sum(1).tolist() for x in out.trajectory]  # per step: [row 0, row 1]
    revealed = [[a - b for a, b in zip(p, c)] for p, c in zip([[24, 24]] + masked, masked)]
    assert all(r[0] <= 1 for r in revealed), revealed
    assert revealed[0][1] == 8 and masked[-1] == [0, 0]


def test_a_greedy_row_beside_a_sampled_one_decodes_as_alone(model):
    """Temperature 0 on row 0 of a mixed call gives the tokens of a greedy call of that row alone (greedy confidence
    decoding reads no random numbers); the sampled row 1 differs from its greedy twin."""
    cfg = SamplerConfig(steps=16, block_length=8, algorithm="confidence", temperature=0.0)
    alone = sample(model, cfg, 2, 16, seed=5)
    mixed = sample(model, cfg, 2, 16, seed=5, per_row={"temperature": [0.0, 1.5], "top_p": [1.0, 1.0]})
    assert torch.equal(mixed.tokens[0], alone.tokens[0])
    assert not torch.equal(mixed.tokens[1], alone.tokens[1])


def test_per_row_settings_are_validated_naming_the_problem(model):
    cfg = SamplerConfig(steps=4, algorithm="threshold")
    for per_row, match in (({"steps": [4, 4]}, "cannot differ"), ({"threshold": [0.5]}, "num_samples=2"),
                           ({"threshold": [0.5, 0.0]}, "threshold must be in"),
                           ({"temperature": [1.0, -1.0]}, "temperature must be")):
        with pytest.raises(ValueError, match=match):
            sample(model, cfg, 2, 8, per_row=per_row)


# ------------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_window_over_unchanged_inputs_equals_the_full_forward(model, mode):
    torch.manual_seed(1)
    _check_window(model.backbone, mode, vocab=200)


@torch.no_grad()
def _check_window(bb, mode: str, vocab: int, back: int = 0):
    """Cached keys/values of a refresh + the window recomputed from the same (soft) input = the full forward there;
    a window after a different refresh gives another result (the cache is read)."""
    B, L, K = 2, 32, 4
    ids = torch.randint(0, vocab, (B, L, K))
    w = torch.softmax(torch.randn(B, L, K), -1)
    full = bb.hidden((ids, w))  # (B, L, d)
    h0, kv = hidden_window(bb, (ids, w), 0, None)
    assert torch.equal(h0, full)  # the refresh is the backbone's own forward
    a, e = window(mode, (8, 16), L, back)
    assert a == 8 - back
    hw, _ = hidden_window(bb, (ids[:, a:e], w[:, a:e]), a, kv)  # (B, e - a, d)
    assert hw.shape == (B, e - a, full.shape[-1])
    torch.testing.assert_close(hw, full[:, a:e], rtol=1e-5, atol=1e-5)
    outside = [torch.cat([k[:, :, :a], k[:, :, e:]], 2).clone() for k in kv.keys + kv.values]
    changed = ids.clone()
    changed[:, a:e] = torch.randint(0, vocab, (B, e - a, K))
    hc, _ = hidden_window(bb, (changed[:, a:e], w[:, a:e]), a, kv)  # a later step of the block: new window inputs
    assert torch.equal(hc, hidden_window(bb, (changed[:, a:e], w[:, a:e]), a, kv)[0])  # its own write is overwritten
    assert all(torch.equal(torch.cat([k[:, :, :a], k[:, :, e:]], 2), o)  # nothing outside the window is written
               for k, o in zip(kv.keys + kv.values, outside))
    _, kv2 = hidden_window(bb, (torch.randint(0, vocab, (B, L, K)), w), 0, None)
    assert not torch.allclose(hidden_window(bb, (ids[:, a:e], w[:, a:e]), a, kv2)[0], full[:, a:e], atol=1e-3)


@pytest.mark.parametrize("backbone", ["model", "qwen"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("soft_mask", [True, False])
def test_cache_equals_no_cache_with_one_step_per_block(request, backbone, mode, soft_mask):
    """One step per block: every step is a refresh, the same tokens as without a cache (and the same NFE); our
    Backbone and a tiny HF Qwen2 with Dream's shift."""
    model = request.getfixturevalue(backbone)
    kw = dict(steps=4, block_length=8, algorithm="confidence", soft_mask=soft_mask, cache_unchanged=False)
    ref = sample(model, SamplerConfig(**kw), 3, 32, prompt_ids=PROMPTS, seed=2)
    out = sample(model, SamplerConfig(cache=mode, **kw), 3, 32, prompt_ids=PROMPTS, seed=2)
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe
    assert out.positions == ref.positions == 3 * 32 * ref.nfe


@pytest.mark.parametrize("algorithm", ["confidence", "threshold", "ancestral"])
@pytest.mark.parametrize("soft_mask", [True, False])
def test_cached_decoding_is_valid_and_computes_fewer_positions(model, algorithm, soft_mask):
    """Several steps per block: no [MASK] left, prompts kept, and the backbone computes fewer positions: prefix
    (block + suffix) < none, dual (block only) < prefix; the confidence rule runs the same number of forwards."""
    L, blk = 32, 8
    kw = dict(steps=16, block_length=blk, algorithm=algorithm, soft_mask=soft_mask, threshold=0.02,
              cache_unchanged=False)
    outs = {mode: sample(model, SamplerConfig(cache=mode, **kw), 3, L, prompt_ids=PROMPTS, seed=5)
            for mode in ("none", "prefix", "dual")}
    for mode, out in outs.items():
        assert not (out.tokens == model.mask_id).any(), mode
        for i, p in enumerate(PROMPTS):
            assert out.tokens[i, :len(p)].tolist() == p, mode
        if soft_mask:
            assert out.lambda_mean is not None and out.lambda_mean > 0
    assert outs["prefix"].positions < outs["none"].positions
    assert outs["dual"].positions < outs["prefix"].positions
    if algorithm == "confidence":
        nfe = outs["none"].nfe
        assert outs["prefix"].nfe == outs["dual"].nfe == nfe == 16
        # dual: per block one full refresh (L) + (steps - 1) windows of blk positions
        assert outs["dual"].positions == 3 * 4 * (L + 3 * blk)
        assert outs["prefix"].positions == 3 * sum(L + 3 * (L - a) for a in range(0, L, blk))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_refresh_feeds_back_a_prediction_of_every_masked_position(model, monkeypatch, mode):
    """Soft-masking through the cache: a cached step predicts its window only; the refresh of the next block still
    gets a previous prediction for every position masked then (the window's inside it, the last refresh's outside)."""
    import models.sampling as sampling

    missing, real = [], sampling.predict_window

    def spy(m, x, rows, span, cache, prev_logits=None, sm_scale=None):
        if span == (0, x.shape[1]) and prev_logits is not None:
            missing.append(int(((x == m.mask_id) & ~prev_logits.rows).sum()))
        return real(m, x, rows, span, cache, prev_logits=prev_logits, sm_scale=sm_scale)

    monkeypatch.setattr(sampling, "predict_window", spy)
    sample(model, SamplerConfig(steps=32, block_length=8, cache=mode, cache_unchanged=False), 2, 32, seed=0)
    assert len(missing) >= 3 and not any(missing)  # blocks 2-4 (prefix: block 1's window is the whole sequence)


def test_cache_refuses_models_it_cannot_serve_naming_the_field():
    timed = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=64, time_conditioning=True))
    with pytest.raises(ValueError, match="^cache: .*time conditioning"):
        sample(timed, SamplerConfig(steps=4, block_length=8, cache="dual"), 1, 16)
    dit = build_dit(DiTConfig.from_flavor("test", time_conditioning=True))
    with pytest.raises(ValueError, match="^cache: .*time conditioning"):
        sample(dit, SamplerConfig(steps=4, block_length=8, cache="prefix"), 1, 16)


@pytest.fixture(scope="module")
def dit():
    """A DiT without time conditioning, every weight random (MDLM's init zeroes the adaLN maps: no block would act)."""
    torch.manual_seed(0)
    m = build_dit(DiTConfig.from_flavor("test", time_conditioning=False))
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.normal_(0.0, 0.3)
    return m.eval()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_the_dit_caches_too(dit, mode):
    """DiT (adaLN, σ = 0): a window over unchanged inputs equals the full forward, one step per block equals no cache,
    several steps per block decode validly with fewer positions."""
    x = torch.randint(0, 39, (2, 32))
    full = dit.backbone.hidden(x)  # (B, L, d)
    h0, kv = hidden_window(dit.backbone, x, 0, None)
    assert torch.equal(h0, full)
    a, e = window(mode, (8, 16), 32)
    torch.testing.assert_close(hidden_window(dit.backbone, x[:, a:e], a, kv)[0], full[:, a:e], rtol=1e-5, atol=1e-5)
    kw = dict(block_length=8, algorithm="confidence", cache_unchanged=False)
    ref = sample(dit, SamplerConfig(steps=4, **kw), 2, 32, seed=1)
    assert torch.equal(sample(dit, SamplerConfig(steps=4, cache=mode, **kw), 2, 32, seed=1).tokens, ref.tokens)
    slow = sample(dit, SamplerConfig(steps=16, **kw), 2, 32, seed=1)
    fast = sample(dit, SamplerConfig(steps=16, cache=mode, **kw), 2, 32, seed=1)
    assert not (fast.tokens == dit.mask_id).any() and fast.positions < slow.positions


# ------------------------------------------------------------------------------------------ HF decoder backbones
def _hf(model_type="qwen2", shift=True, attn="sdpa", **hf):
    """A tiny random HF decoder (vocabulary 300, [MASK] = 299) with a visible SM head (λ ≈ 0.8 on masked rows)."""
    from models.hf_loading import from_config_dict

    torch.manual_seed(0)
    m = from_config_dict(dict(model_type=model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                              max_position_embeddings=128, tie_word_embeddings=True, **hf),
                         mask_token_id=299, shift_logits=shift, attn_implementation=attn)
    with torch.no_grad():
        m.sm_head.raw_scale.fill_(1.5)
        m.sm_head.raw_centre.fill_(20.0)
    return m.eval()


@pytest.fixture(scope="module")
def qwen():
    return _hf()


@pytest.mark.parametrize("model_type,shift,attn", [("qwen2", True, "sdpa"), ("qwen2", False, "eager"),
                                                   ("llama", True, "eager")])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_hf_window_over_unchanged_inputs_equals_the_full_forward(model_type, shift, attn, mode):
    """HF decoder (GQA, its own rotary / attention kernel, Dream's shift or not): the window test above; with the
    shift the window's first position reads the refresh's output before it."""
    _check_window(_hf(model_type, shift, attn).backbone, mode, vocab=299, back=int(shift))


@pytest.mark.parametrize("soft_mask", [True, False])
def test_hf_cached_decoding_is_valid_and_computes_fewer_positions(qwen, soft_mask):
    """Several steps per block: no [MASK] left, prompts kept, SM fed; with Dream's shift a window starts one position
    before its block (the block's first prediction reads it), so dual computes per block one refresh (L) and
    (steps - 1) windows of blk + 1 positions (blk in the first block)."""
    L, blk = 32, 8
    kw = dict(steps=16, block_length=blk, algorithm="confidence", soft_mask=soft_mask, cache_unchanged=False)
    outs = {mode: sample(qwen, SamplerConfig(cache=mode, **kw), 3, L, prompt_ids=PROMPTS, seed=5)
            for mode in ("none", "prefix", "dual")}
    for mode, out in outs.items():
        assert not (out.tokens == qwen.mask_id).any(), mode
        assert all(out.tokens[i, :len(p)].tolist() == p for i, p in enumerate(PROMPTS)), mode
        assert out.nfe == 16, mode
        if soft_mask:
            assert out.lambda_mean is not None and out.lambda_mean > 0.5, mode
    assert outs["none"].positions == 3 * L * 16
    assert outs["dual"].positions == 3 * (4 * L + 3 * blk + 3 * 3 * (blk + 1))
    assert outs["prefix"].positions == 3 * (4 * L + 3 * L + sum(3 * (L - a + 1) for a in range(blk, L, blk)))


def test_hf_cache_refuses_sliding_window_decoders_naming_the_field():
    m = _hf(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="^cache: .*sliding window layers: True"):
        sample(m, SamplerConfig(steps=4, block_length=8, cache="dual"), 1, 16)
