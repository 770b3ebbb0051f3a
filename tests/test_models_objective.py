"""The MDLM ELBO, schedules, time sampling, the rank-consistent coin, overfitting and the golden loss."""
import json
import math
import pathlib

import pytest
import torch

import models
from models.objective import ObjectiveConfig, elbo_terms, training_loss, uses_two_pass, validation_nll
from models.schedule import Cosine, LogLinear, mask_tokens, sample_t

GOLDEN = pathlib.Path(__file__).parent / "assets" / "golden_loss_debug.json"


def test_elbo_matches_hand_computation():
    # vocab 4 (mask = 3), one sequence of 3 tokens, position 1 and 2 masked, t = 0.5
    logits = torch.tensor([[[0.0, 0.0, 0.0, -1e6], [1.0, 2.0, 0.5, -1e6], [0.0, 0.0, 3.0, -1e6]]])
    x0 = torch.tensor([[0, 1, 2]])
    x_t = torch.tensor([[0, 3, 3]])
    t = torch.tensor([0.5])
    terms = elbo_terms(logits, x0, x_t, t, LogLinear(), mask_id=3)
    nll1 = -(2.0 - math.log(math.exp(1) + math.exp(2) + math.exp(0.5)))
    nll2 = -(3.0 - math.log(2 + math.exp(3)))
    assert terms[0, 0] == 0
    torch.testing.assert_close(terms[0, 1:], torch.tensor([nll1 / 0.5, nll2 / 0.5]))


def test_schedules():
    t = torch.tensor([0.25, 0.5, 1.0])
    ll = LogLinear(1e-3)
    torch.testing.assert_close(ll.alpha(t), 1 - 0.999 * t)
    torch.testing.assert_close(ll.weight(t), 1 / t)
    cos = Cosine(1e-3)
    assert cos.alpha(torch.tensor(0.0)) == pytest.approx(1.0) and cos.alpha(torch.tensor(1.0)) == pytest.approx(1e-3, abs=1e-6)
    # numerical derivative check of the cosine weight
    h = 1e-4
    d = (cos.alpha(t[:2] + h) - cos.alpha(t[:2] - h)) / (2 * h)
    torch.testing.assert_close(cos.weight(t[:2]), -d / (1 - cos.alpha(t[:2])), rtol=1e-3, atol=1e-3)


def test_global_antithetic_t_and_masking():
    world, B = 4, 8
    parts = []
    for rank in range(world):
        shared = torch.Generator().manual_seed(7)
        local = torch.Generator().manual_seed(100 + rank)
        parts.append(sample_t(B, shared=shared, local=local, rank=rank, world=world, t_min=0.0, t_max=1.0))
    t = torch.cat(parts)  # the global batch, rank-major
    n = world * B
    # one draw per stratum [i/n, (i+1)/n) of the global batch, in stratum order (the paper's trainer) ...
    assert torch.equal(torch.floor(t * n).long(), torch.arange(n))
    # ... and independent draws within the strata (not one shared offset, which would space them evenly)
    assert (t * n - torch.arange(n)).std() > 0.1
    again = sample_t(B, shared=torch.Generator().manual_seed(7), local=torch.Generator().manual_seed(0), rank=1,
                     world=world, t_min=0.0, t_max=1.0)
    assert torch.equal(again, parts[1])  # a rank's slice depends on the shared generator only
    x0 = torch.randint(0, 9, (2000, 50))
    keep = torch.ones_like(x0, dtype=torch.bool)
    keep[:, :10] = False
    xt = mask_tokens(x0, torch.full((2000,), 0.3), LogLinear(), 9, torch.Generator().manual_seed(0), keep)
    assert not (xt[:, :10] == 9).any()  # never masks non-maskable (prompt) positions
    assert abs((xt[:, 10:] == 9).float().mean().item() - 0.3 * 0.999) < 0.01


def test_coin_is_rank_independent_and_has_rate_p():
    obj = ObjectiveConfig(kind="sm", p_sm=0.8)
    coins = [uses_two_pass(obj, seed=3, step=s) for s in range(2000)]
    assert abs(sum(coins) / 2000 - 0.8) < 0.03
    assert coins == [uses_two_pass(obj, seed=3, step=s) for s in range(2000)]  # replay / every rank
    assert not any(uses_two_pass(ObjectiveConfig(kind="binary"), 3, s) for s in range(100))


def test_loss_mask_scores_only_response():
    """loss_mask 0 (prompt, padding) columns are never masked; the loss is Σ_masked (1/t)·NLL over the scored tokens
    only, recomputed here by hand from the dense logits of the very x_t the objective drew."""
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor("debug")).eval()
    x0 = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(3))
    lm = torch.zeros_like(x0)
    lm[:, 12:28] = 1  # prompt 0..11, response 12..27, padding 28..31
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        loss, m = training_loss(model, x0, ObjectiveConfig(kind="binary"), seed=0, step=1, loss_mask=lm)
        s_val, n_val = validation_nll(model, x0, ObjectiveConfig(), seed=0, loss_mask=lm)
    finally:
        hook.remove()
    (x_t, t), _ = seen
    masked = x_t == model.mask_id
    assert torch.equal(x_t[lm == 0], x0[lm == 0])  # prompt and padding columns are never masked
    assert int(masked.sum()) >= 10 and not masked[lm == 0].any()
    with torch.no_grad():
        logp = torch.log_softmax(model(x_t, t).double(), -1)  # dense (B, L, V)
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
    by_hand = (nll / t.double().unsqueeze(1))[masked].sum() / 48  # 48 scored tokens, not the 96 of the batch
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert float(m["masked_frac"]) == pytest.approx(float(masked.float().mean()))
    assert n_val == 48  # the validation bound counts the scored tokens too


@pytest.mark.parametrize("kind", ["binary", "sm", "self_cond"])
def test_debug_model_overfits_one_batch(kind):
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor("debug", self_conditioning=kind == "self_cond"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 3e-3 plateaus on some thread counts
    x0 = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    obj = ObjectiveConfig(kind=kind, p_sm=1.0)
    losses = []
    for _ in range(150):
        loss, _ = training_loss(model, x0, obj, seed=0, step=0)  # the same batch and noise every time
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def _golden_run():
    torch.manual_seed(1234)
    model = models.build_model(models.ModelConfig.from_flavor("debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 1000, (20, 4, 64), generator=torch.Generator().manual_seed(99))
    obj = ObjectiveConfig(kind="sm", p_sm=0.8)
    out = []
    for step in range(20):
        loss, _ = training_loss(model, data[step], obj, seed=5, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(round(loss.item(), 6))
    return out


def test_golden_loss_debug_flavor():
    """Guards regressions in init, masking, loss and the two-pass path (regenerate only on purpose)."""
    assert GOLDEN.is_file(), (f"{GOLDEN.name} is missing: it is committed with the repository; to regenerate it on "
                              f"purpose, write {{'losses': _golden_run()}} there and commit it")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(golden) == 20
    losses = _golden_run()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), rtol=2e-4, atol=2e-4)


def test_validation_nll_single_and_two_pass():
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor("debug")).eval()
    x0 = torch.randint(0, 1000, (4, 32))
    s1, n1 = validation_nll(model, x0, ObjectiveConfig(), seed=0, two_pass=False)
    s2, n2 = validation_nll(model, x0, ObjectiveConfig(), seed=0, two_pass=True)
    assert n1 == n2 == 128 and abs(s1 - s2) / s1 < 1e-4  # ω_s ≈ 0 at init
    assert 0.5 * math.log(1024) < s1 / n1 < 3 * math.log(1024)


def test_padded_vocab_is_never_predicted_or_sampled():
    """vocab_pad_multiple pads the matrices (GPU matmul shapes) without adding tokens."""
    from models import ModelConfig, build_model
    from models.objective import ObjectiveConfig, training_loss
    from models.sampling import SamplerConfig, sample

    cfg = ModelConfig.from_flavor("debug", vocab_size=1000, vocab_pad_multiple=64, d_model=64, n_layers=2, n_heads=2)
    assert cfg.padded_vocab_size == 1024 and cfg.mask_token_id == 999
    torch.manual_seed(0)
    model = build_model(cfg)
    x0 = torch.randint(0, 999, (4, 32))
    logits = model(torch.full_like(x0, 999), torch.ones(4))
    assert logits.shape == (4, 32, 1024) and (logits[..., 1000:] <= -1e5).all()
    loss, _ = training_loss(model, x0, ObjectiveConfig(kind="sm", p_sm=1.0), seed=0, step=0, two_pass=True)
    assert torch.isfinite(loss)
    out = sample(model, SamplerConfig(steps=8, algorithm="ancestral", soft_mask=True), num_samples=3, length=16, seed=0)
    assert int(out.tokens.max()) < 999


def _model_with_visible_feedback(**over):
    """Debug model in eval mode with λ well away from 0, so the SM input differs from pure masks."""
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor("debug", **over)).eval()
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(1.5)
        model.sm_head.raw_centre.fill_(20.0)
    return model


def _noised_batch(model, seed: int, ts: list[float], length: int):
    """(x0, t, x_t, masked) for one random batch, one row per time in ``ts``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, model.config.vocab_size - 1, (len(ts), length), generator=g)
    t = torch.tensor(ts)
    x_t = mask_tokens(x0, t, LogLinear(), model.mask_id, g)
    return x0, t, x_t, x_t == model.mask_id


@pytest.mark.parametrize("self_conditioning", [False, True])
def test_masked_only_forward_matches_full_logits_and_the_loss_is_unchanged(self_conditioning):
    from models.objective import masked_elbo_terms

    model = _model_with_visible_feedback(self_conditioning=self_conditioning)
    x0, t, x_t, masked = _noised_batch(model, 3, [0.3, 0.6, 0.9], 32)
    for two_pass in (False, True):
        with torch.no_grad():
            full = model(x_t, t, two_pass=two_pass)
            rows = model(x_t, t, two_pass=two_pass, masked_only=True)
        assert rows.shape == (int(masked.sum()), full.shape[-1])
        torch.testing.assert_close(rows, full[masked], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked_elbo_terms(rows, x0, masked, t, LogLinear()),
                                   elbo_terms(full, x0, x_t, t, LogLinear(), model.mask_id)[masked],
                                   atol=1e-5, rtol=1e-5)


def test_flat_row_indices_select_what_the_boolean_mask_selects_and_metrics_stay_on_the_device():
    """The training path gathers masked rows by flat index (one device->host wait per forward instead of one per
    boolean index): rows by index == rows by mask, for the core model, the SM head's feedback and the ELBO terms."""
    from models.softmask import flat_rows
    from models.objective import masked_elbo_terms

    model = _model_with_visible_feedback()
    x0, t, x_t, masked = _noised_batch(model, 4, [0.2, 0.5, 0.95], 24)
    flat = flat_rows(masked)
    assert flat.dtype == torch.long and flat.tolist() == [i for i, m in enumerate(masked.flatten().tolist()) if m]
    with torch.no_grad():
        by_mask = model(x_t, t, rows=masked)
        by_index = model(x_t, t, rows=flat)
        torch.testing.assert_close(by_index, by_mask, atol=0, rtol=0)
        z = by_mask
        ids_a, w_a, _ = model.sm_head.mix(x_t, masked, z)
        ids_b, w_b, _ = model.sm_head.mix(x_t, masked, z, flat)
    assert torch.equal(ids_a, ids_b) and torch.equal(w_a, w_b)
    assert torch.equal(ids_a[~masked][:, 0], x_t[~masked]) and bool((w_a[~masked][:, 0] == 1).all())
    assert torch.equal(ids_a[masked][:, 0], x_t[masked])  # slot 0 of a masked row is [MASK] with weight 1 - λ
    torch.testing.assert_close(w_a[masked].sum(-1), torch.ones(int(masked.sum())))
    torch.testing.assert_close(masked_elbo_terms(z, x0, flat, t, LogLinear()),
                               masked_elbo_terms(z, x0, masked, t, LogLinear()), atol=0, rtol=0)
    loss, m = training_loss(model, x0, ObjectiveConfig(kind="sm", p_sm=1.0), seed=0, step=0, two_pass=True)
    assert all(isinstance(m[k], torch.Tensor) and m[k].dim() == 0 for k in ("loss", "masked_frac", "t_mean",
                                                                              "lambda_mean"))
    assert float(m["loss"]) == pytest.approx(loss.item()) and 0 < float(m["lambda_mean"]) < 1


def test_compiled_model_and_loss_train_exactly_like_eager():
    """models.compile.compile_model: blocks and the SM head's entropy compiled in place, and the compiled per-token
    NLL (dynamic row count: the masked rows change every step) give the eager losses and gradients, for two-pass SM
    (λ well away from 0, so the entropy matters) and single-pass steps."""
    from models.compile import compile_model
    from models.objective import token_nll

    eager = _model_with_visible_feedback()
    cfg = eager.config
    compiled = models.build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    nll = compile_model(compiled)
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints keep their keys
    assert compiled.sm_head.neg_entropy_fn is not eager.sm_head.neg_entropy_fn
    z = torch.randn(7, 50, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 50, (7,))
    torch.testing.assert_close(nll(z, target), token_nll(z, target), atol=1e-5, rtol=1e-5)
    x0 = torch.randint(0, cfg.vocab_size - 1, (2, 48))
    obj = ObjectiveConfig(kind="sm", p_sm=1.0)
    for step, two_pass in enumerate((True, False, True)):  # each step masks a different number of rows
        a, ma = training_loss(compiled, x0, obj, seed=0, step=step, two_pass=two_pass, nll=nll)
        b, mb = training_loss(eager, x0, obj, seed=0, step=step, two_pass=two_pass)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if two_pass:
            lam = float(mb["lambda_mean"])
            assert lam > 0.05 and float(ma["lambda_mean"]) == pytest.approx(lam)
        a.backward()
        b.backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
