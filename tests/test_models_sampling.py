"""Sampler invariants for every algorithm x soft-mask on/off."""
import pytest
import torch

import models
from models.sampling import ALGORITHMS, SamplerConfig, _pad_after_eos, sample


@pytest.fixture(scope="module")
def model(sampling_model):
    return sampling_model


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("soft_mask", [True, False])
def test_invariants(model, algorithm, soft_mask):
    prompts = [[5, 6, 7, 8, 9], [10], [11, 12]]
    cfg = SamplerConfig(steps=12, algorithm=algorithm, soft_mask=soft_mask, top_p=0.9, cache_unchanged=False)
    out = sample(model, cfg, num_samples=3, length=24, prompt_ids=prompts, seed=3, return_trajectory=True)
    assert out.tokens.shape == (3, 24) and out.tokens.dtype == torch.long
    assert not (out.tokens == model.mask_id).any()
    for i, p in enumerate(prompts):
        assert out.tokens[i, :len(p)].tolist() == p
    again = sample(model, cfg, num_samples=3, length=24, prompt_ids=prompts, seed=3)
    assert torch.equal(out.tokens, again.tokens)
    removal = bool((out.trajectory[-1] == model.mask_id).any())  # masks left after the grid: one more forward
    assert out.nfe == 12 + removal  # one forward per step; SM adds none


def test_sm_changes_samples_but_not_nfe(model):
    on = sample(model, SamplerConfig(steps=16, soft_mask=True), 4, 32, seed=0)
    off = sample(model, SamplerConfig(steps=16, soft_mask=False), 4, 32, seed=0)
    assert on.nfe == off.nfe == 16
    assert not torch.equal(on.tokens, off.tokens)


def test_fixed_positions_blocks_eos_and_trajectory(model):
    L = 32
    fixed = torch.full((2, L), model.mask_id)
    fixed[:, 10] = 42
    fixed[:, 31] = 43
    seen = []
    out = sample(model, SamplerConfig(steps=8, block_length=8, algorithm="confidence"), 2, L, seed=1,
                 fixed_tokens=fixed, on_step=lambda i, x: seen.append(i), return_trajectory=True)
    assert (out.tokens[:, 10] == 42).all() and (out.tokens[:, 31] == 43).all()
    assert seen == list(range(1, len(seen) + 1)) and len(out.trajectory) == len(seen) == 8
    # semi-AR: after the first block's steps the later blocks are still fully masked
    assert (out.trajectory[1][:, 16:30] == model.mask_id).all()
    # EOS policy: everything after the first *generated* EOS becomes EOS; prompt EOS never truncates
    x = torch.tensor([[5, 7, 5, 5, 7, 9, 9, 9]])
    fixed = torch.tensor([[True, True, False, False, False, False, False, False]])
    assert _pad_after_eos(x, fixed, 7).tolist() == [[5, 7, 5, 5, 7, 7, 7, 7]]
    # the policy is applied after decoding, so the same seed without it shows where each row's first EOS falls;
    # the EOS is a token both rows generate, so the check below runs for every row
    fixed = torch.full((2, L), model.mask_id)
    fixed[:, 10], fixed[:, 30] = 42, 43
    raw = sample(model, SamplerConfig(steps=8), 2, L, seed=1, fixed_tokens=fixed).tokens
    generated = (fixed == model.mask_id)[0]  # (L,): the same positions in both rows
    common = set(raw[0, generated].tolist()) & set(raw[1, generated].tolist())
    assert common, "seed 1 must give the rows a common generated token"
    eos = min(common)
    res = sample(model, SamplerConfig(steps=8, eos_id=eos, eos_policy="pad_after_eos"), 2, L, seed=1,
                 fixed_tokens=fixed).tokens
    for r in range(2):
        first = min(i for i in range(L) if generated[i] and raw[r, i] == eos)
        assert torch.equal(res[r, :first], raw[r, :first])  # before the first generated EOS: unchanged
        after = generated.clone()
        after[:first] = False
        assert first < 30 and bool((res[r, after] == eos).all())  # from it on: EOS ...
        assert res[r, 10] == 42 and res[r, 30] == 43  # ... except the fixed positions


def test_greedy_and_cache(model):
    g1 = sample(model, SamplerConfig(steps=16, temperature=0.0, algorithm="confidence"), 2, 16, seed=1)
    g2 = sample(model, SamplerConfig(steps=16, temperature=0.0, algorithm="confidence"), 2, 16, seed=2)
    assert torch.equal(g1.tokens, g2.tokens)  # greedy confidence decoding ignores the seed
    cached = sample(model, SamplerConfig(steps=64, cache_unchanged=True), 2, 16, seed=1)
    assert cached.nfe < 64 and not (cached.tokens == model.mask_id).any()


def test_bad_config_and_prompt(model):
    with pytest.raises(ValueError, match="algorithm"):
        SamplerConfig(algorithm="nope")
    with pytest.raises(ValueError, match="top_p"):
        SamplerConfig(top_p=0)
    with pytest.raises(ValueError, match="longer than length"):
        sample(model, SamplerConfig(steps=2), 1, 4, prompt_ids=[[1, 2, 3, 4, 5]])


@pytest.mark.parametrize("soft_mask", [True, False])
def test_output_layer_runs_only_where_the_prediction_is_read(model, soft_mask):
    """Each step's lm_head sees exactly the still-masked positions (SM: all of them, for the feedback) or, without SM,
    only the current block's masked ones; prompt and decoded positions cost the backbone only."""
    rows_seen, states = [], []
    hook = model.backbone.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    try:
        prompts = [[5, 6, 7, 8], [9, 10]]
        cfg = SamplerConfig(steps=8, soft_mask=soft_mask, block_length=8)
        sample(model, cfg, 2, 24, prompt_ids=prompts, seed=1, on_step=lambda i, x: states.append(x.clone()))
    finally:
        hook.remove()
    x0 = torch.full((2, 24), model.mask_id)
    x0[0, :4], x0[1, :2] = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])
    before = [x0] + states[:-1]  # the input of each step's forward
    block_of_step = [s // (8 // 3) for s in range(len(states))]  # 8 steps over 3 blocks of 8 -> 2 steps per block
    assert len(rows_seen) == len(states) == 6
    for x, blk, seen in zip(before, block_of_step, rows_seen):
        masked = x == model.mask_id
        if not soft_mask:
            in_block = torch.zeros(24, dtype=torch.bool)
            in_block[8 * blk:8 * blk + 8] = True
            masked &= in_block
        assert seen == int(masked.sum())


def test_feedback_from_masked_rows_equals_dense_feedback():
    """A prediction kept only on the masked rows feeds back exactly what the dense one does; a position masked now
    but not predicted before (ReMDM remasking) gets the pure [MASK] embedding."""
    from models.diffusion_lm import MaskedLogits

    for sc in (False, True):
        torch.manual_seed(0)
        m = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=200, self_conditioning=sc)).eval()
        with torch.no_grad():
            m.sm_head.raw_scale.fill_(2.0)
            if sc:
                m.sc_proj.weight.normal_(0, 0.05)
        g = torch.Generator().manual_seed(1)
        x_prev = torch.randint(0, m.mask_id, (2, 16), generator=g)
        x_prev[torch.rand(2, 16, generator=g) < 0.6] = m.mask_id
        x_now = x_prev.clone()
        x_now[0, (x_prev[0] == m.mask_id).nonzero()[0]] = 7  # one position decoded since
        rows_prev = x_prev == m.mask_id
        with torch.no_grad():
            dense = m(x_prev)
            sparse = MaskedLogits(rows_prev, m(x_prev, masked_only=True))
            torch.testing.assert_close(sparse.z, dense[rows_prev])
            want = m(x_now, prev_logits=dense)[x_now == m.mask_id]
            got = m(x_now, prev_logits=sparse, masked_only=True)
            torch.testing.assert_close(got, want)
            with pytest.raises(ValueError, match="not in rows"):
                sparse.at(~rows_prev)
            remasked = x_now.clone()
            pos = (x_prev[1] != m.mask_id).nonzero()[0]
            remasked[1, pos] = m.mask_id
            inputs, extra, _ = m.feedback_input(remasked, sparse)
            if not sc:
                ids, w = inputs
                assert ids[1, pos, 0].item() == m.mask_id and w[1, pos, 0].item() == 1 and w[1, pos, 1:].abs().sum() == 0
            else:
                torch.testing.assert_close(extra[1, pos], m.sc_proj(m.backbone.embed.weight[m.mask_id]).reshape(1, -1))


def test_sm_scale_scales_lambda_per_sample_and_zero_is_the_binary_input(model):
    """sm_scale (B,) multiplies ω_s per sample: 1 changes nothing, 0 feeds the pure [MASK] embedding (the same
    logits as no feedback), 0.5 halves λ."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, model.mask_id, (2, 16), generator=g)
    x[torch.rand(2, 16, generator=g) < 0.7] = model.mask_id
    with torch.no_grad():
        prev = model(x)
        full = model(x, prev_logits=prev)
        torch.testing.assert_close(model(x, prev_logits=prev, sm_scale=torch.ones(2)), full)
        off = model(x, prev_logits=prev, sm_scale=torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(off[0], model(x)[0])  # sample 0: no feedback at all
        torch.testing.assert_close(off[1], full[1])       # sample 1: untouched
        assert not torch.allclose(full[0], model(x)[0])   # (the feedback does matter for this model)
        (_, w_full), _, _ = model.feedback_input(x, prev)
        (_, w_half), _, _ = model.feedback_input(x, prev, torch.full((2,), 0.5))
    masked = x == model.mask_id
    torch.testing.assert_close(w_half[..., 1:].sum(-1)[masked], 0.5 * w_full[..., 1:].sum(-1)[masked])


@pytest.mark.parametrize("transparency", ["linear", "stepwise"])
def test_transparency_scheduling_follows_the_masked_fraction(model, transparency):
    """Every feedback forward gets sm_scale = schedule(fraction of the sample's generated positions still masked in
    its input): linear fades SM out, stepwise feeds nothing (λ = 0) once half or less is masked. Same NFE."""
    length, prompt = 24, [[5, 6, 7, 8], [9, 10]]
    generated = torch.tensor([length - 4, length - 2])
    seen = []  # (input x, sm_scale, mean λ fed) of every forward

    def spy(module, args, kwargs, output):
        _, stats = output  # the sampler asks every forward for its feedback statistics
        lam = float(stats.lambda_sum) / stats.rows if stats is not None else -1.0
        seen.append((args[0].clone(), kwargs.get("sm_scale"), lam))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        out = sample(model, SamplerConfig(steps=12, soft_mask=True, transparency=transparency, cache_unchanged=False,
                                          t_eps=0.0), 2, length, prompt_ids=prompt, seed=1)
    finally:
        handle.remove()
    assert out.nfe == len(seen) == 12
    assert seen[0][1] is None  # the first step has nothing to feed back
    for x, scale, lam in seen[1:]:
        frac = (x == model.mask_id).sum(1) / generated
        want = frac if transparency == "linear" else (frac > 0.5).float()
        torch.testing.assert_close(scale, want)
        if transparency == "stepwise" and not want.any():
            assert lam == 0.0
    assert any(not s.any() for _, s, _ in seen[1:]) == (transparency == "stepwise")
    assert seen[1][2] > 0  # early steps do feed back


def test_transparency_none_is_the_default_and_bad_names_are_rejected(model):
    a = sample(model, SamplerConfig(steps=8), 2, 16, seed=0)
    b = sample(model, SamplerConfig(steps=8, transparency="none"), 2, 16, seed=0)
    c = sample(model, SamplerConfig(steps=8, transparency="linear"), 2, 16, seed=0)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="transparency must be one of"):
        SamplerConfig(transparency="cosine")


def test_remdm_loop_phases(model):
    """ReMDM-loop on the grid 1 -> t_eps: up to t_on it only reveals, reaching ~1 - alpha_on decoded; between t_on and
    t_off the masked share stays ~1 - alpha_on while decoded tokens are remasked and refined; then it finishes."""
    steps, length, n = 40, 64, 8
    cfg = SamplerConfig(steps=steps, algorithm="remdm_loop", soft_mask=True, cache_unchanged=False)
    out = sample(model, cfg, n, length, seed=5, return_trajectory=True)
    removal = bool((out.trajectory[-1] == model.mask_id).any())
    assert out.nfe == steps + removal and not (out.tokens == model.mask_id).any()
    ts = torch.linspace(1.0, cfg.t_eps, steps + 1, dtype=torch.float64).tolist()
    masks = [torch.ones(n, length, dtype=torch.bool)] + [x == model.mask_id for x in out.trajectory]
    remasked = [int((m_after & ~m_before).sum()) for m_before, m_after in zip(masks, masks[1:])]  # per step
    frac = [float(m.float().mean()) for m in masks]
    phase1 = [i for i in range(steps) if ts[i] > cfg.loop_t_on]
    loop = [i for i in range(steps) if cfg.loop_t_off < ts[i] <= cfg.loop_t_on]
    assert sum(remasked[i] for i in phase1) == 0  # MDLM steps never remask
    assert abs(frac[phase1[-1] + 1] - (1 - cfg.loop_alpha_on)) < 0.06  # ~alpha_on decoded when the loop starts
    assert sum(remasked[i] for i in loop) > 0
    assert all(abs(frac[i + 1] - (1 - cfg.loop_alpha_on)) < 0.08 for i in loop)  # the masked share holds
    with pytest.raises(ValueError, match="eta <="):
        SamplerConfig(algorithm="remdm_loop", eta=0.5)
    with pytest.raises(ValueError, match="loop_t_off < loop_t_on"):
        SamplerConfig(loop_t_on=0.1, loop_t_off=0.2)
