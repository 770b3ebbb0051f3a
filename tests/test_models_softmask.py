"""SM head against an independent dense reference, init behaviour, and where gradients flow."""
import pytest
import torch

import models
from models.softmask import SoftMaskHead


def reference_head(head, x_t, logits, mask_id, k):
    """Straightforward dense implementation of the paper's formulas (independent of the fast path)."""
    p = torch.softmax(logits.double(), -1)
    H = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    ws, wa, wb = head.omega_s.double(), head.omega_a.double(), head.omega_b.double()
    lam = ws * torch.sigmoid(wa * (-H - wb))
    masked = x_t == mask_id
    lam = torch.where(masked, lam, torch.zeros_like(lam))
    top_p, top_i = p.topk(k, -1)
    pi = top_p / top_p.sum(-1, keepdim=True)
    w = torch.cat([(1 - lam).unsqueeze(-1), lam.unsqueeze(-1) * pi], -1)
    w = torch.where(masked.unsqueeze(-1), w, torch.cat([torch.ones_like(lam).unsqueeze(-1), torch.zeros_like(pi)], -1))
    return top_i, w, lam


@pytest.mark.parametrize("k", [1, 3, 5])
def test_head_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    head = SoftMaskHead(k=k, omega_s=0.7, omega_b=-1.3, omega_a=2.0)
    B, L, V, mask_id = 3, 17, 50, 49
    logits = torch.randn(B, L, V, generator=g) * 3
    x_t = torch.randint(0, V - 1, (B, L), generator=g)
    x_t[torch.rand(B, L, generator=g) < 0.5] = mask_id
    ids, w = head(x_t, logits, mask_id)
    ref_ids, ref_w, lam = reference_head(head, x_t, logits, mask_id, k)
    assert ids.shape == (B, L, k + 1) and w.shape == (B, L, k + 1) and ids.dtype == torch.long
    assert torch.equal(ids[..., 0], x_t)
    masked = x_t == mask_id
    assert torch.equal(ids[..., 1:][masked], ref_ids[masked])
    torch.testing.assert_close(w.double(), ref_w, atol=1e-5, rtol=1e-5)
    assert (lam[masked] > 1e-3).any(), "test must exercise non-trivial λ"
    # unmasked positions: exactly the token, weight 1
    assert torch.all(w[~masked][:, 0] == 1) and torch.all(w[~masked][:, 1:] == 0)


def test_init_values_and_full_vocab_variant():
    head = SoftMaskHead(k=3)
    assert abs(head.omega_s.item() - 1e-6) < 1e-7
    assert abs(head.omega_b.item() + 0.75) < 1e-5 and abs(head.omega_a.item() - 6.66) < 1e-5
    assert head.omega_s.dim() == 0
    full = SoftMaskHead(k=None, omega_s=0.5)
    x_t = torch.tensor([[9, 2, 9]])
    logits = torch.randn(1, 3, 10)
    ids, w = full(x_t, logits, 9)
    assert ids.shape == (1, 3, 11)
    torch.testing.assert_close(w[0, 0].sum(), torch.tensor(1.0))  # convex combination
    assert abs(full.temperature.item() - 1.0) < 1e-5


def _debug_model(**kw):
    torch.manual_seed(0)
    return models.build_model(models.ModelConfig.from_flavor("debug", **kw)).eval()


def _xt(model, B=2, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.mask_id, (B, L), generator=g)
    x[torch.rand(B, L, generator=g) < 0.5] = model.mask_id
    return x


def test_init_sm_equals_binary():
    model = _debug_model()
    x_t = _xt(model)
    torch.testing.assert_close(model(x_t, two_pass=True), model(x_t), atol=1e-6, rtol=0)


def test_sm_never_touches_unmasked_positions():
    model = _debug_model()
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(3.0)  # ω_s ≈ 0.95: SM clearly on
    x_t = _xt(model)
    prev = model(x_t)
    (ids, w), _, _ = model.feedback_input(x_t, prev)
    un = x_t != model.mask_id
    assert torch.equal(ids[..., 0], x_t) and torch.all(w[un][:, 0] == 1) and torch.all(w[un][:, 1:] == 0)
    # embeddings of unmasked positions are exactly the token embeddings
    emb = model.backbone.embed_input((ids, w))
    torch.testing.assert_close(emb[un], model.backbone.embed(x_t)[un])


def test_gradients_reach_omega_only_through_pass_two():
    model = _debug_model()
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(0.0)  # ω_s = 0.5
        model.sm_head.raw_steepness.fill_(0.0)
    x_t = _xt(model)
    model(x_t).sum().backward()  # single pass: the head is unused
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.sm_head.parameters())
    model.zero_grad(set_to_none=True)
    model(x_t, two_pass=True).logsumexp(-1).sum().backward()
    assert model.sm_head.raw_scale.grad.abs() > 0
    grads_two_pass = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}
    # the same gradients when pass 1 is run by hand and detached: pass 1 contributes nothing
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        prev = model(x_t)
    model(x_t, prev_logits=prev).logsumexp(-1).sum().backward()
    for n, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, grads_two_pass[n])


@pytest.mark.parametrize("k", [1, 3])
def test_entropy_topk_chunking_and_infinite_logits(k):
    """Any chunking gives the same (−H, top-k); rows holding −inf logits get a finite entropy (the rare path)."""
    from models.softmask import entropy_topk

    g = torch.Generator().manual_seed(0)
    z = torch.randn(70, 501, generator=g) * 3
    z[5, :400] = float("-inf")  # mostly impossible tokens
    ref_p = torch.softmax(z, -1)
    ref_h = -(ref_p * torch.log(ref_p.clamp_min(1e-45))).sum(-1)
    for chunk in (None, 7, 70):
        neg_h, top_z, top_i = entropy_topk(z, k, chunk)
        assert torch.isfinite(neg_h).all()
        torch.testing.assert_close(-neg_h, ref_h, rtol=1e-4, atol=1e-5)
        vals, idx = torch.topk(z, k, dim=-1)
        torch.testing.assert_close(top_z, vals)
        assert torch.equal(top_i, idx)
    zb = z.to(torch.bfloat16)  # GPU training: bf16 logits, top-k on them directly, entropy in fp32
    neg_h, top_z, top_i = entropy_topk(zb, k, 16)
    assert top_z.dtype == torch.float32 and torch.isfinite(neg_h).all()
    torch.testing.assert_close(top_z, torch.topk(zb.float(), k, dim=-1).values, atol=0, rtol=0)
    pb = torch.softmax(zb.float(), -1)
    torch.testing.assert_close(-neg_h, -(pb * torch.log(pb.clamp_min(1e-45))).sum(-1), rtol=1e-4, atol=1e-5)


def test_sparse_embed_half_precision_matches_fp32():
    """bf16 weights take the gather path (embedding_bag has no bf16 per-sample-weight backward on CUDA)."""
    from models.backbone import sparse_embed

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=g)
    ids = torch.randint(0, 50, (2, 5, 3), generator=g)
    w = torch.rand(2, 5, 3, generator=g)
    ref = sparse_embed(weight, ids, w)
    wb = weight.to(torch.bfloat16).requires_grad_()
    out = sparse_embed(wb, ids, w)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    expected = torch.zeros(50).index_add_(0, ids.reshape(-1), w.reshape(-1))  # d(sum)/dE[v] = Σ weights of v
    torch.testing.assert_close(wb.grad.float().sum(-1) / 16, expected, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------ full-vocabulary variant (k=None)
def reference_full_vocab(head, x_t, logits, mask_id):
    """The paper's k = |V| ablation written out densely, in float64: p = softmax(z / τ) gives both H(p) and the mixture,
    λ = ω_s·σ(ω_a·(−H(p) − ω_b)), weights [1 − λ, λ·p_1 … λ·p_V] on masked rows, [1, 0 … 0] elsewhere. Differentiable
    in the head's parameters (τ included)."""
    p = torch.softmax(logits.double() / head.temperature.double(), -1)  # (B, L, V)
    H = -(p * p.log()).sum(-1)
    lam = head.omega_s.double() * torch.sigmoid(head.omega_a.double() * (-H - head.omega_b.double()))
    masked = (x_t == mask_id).unsqueeze(-1)
    w = torch.cat([(1 - lam).unsqueeze(-1), lam.unsqueeze(-1) * p], -1)
    plain = torch.cat([torch.ones_like(lam).unsqueeze(-1), torch.zeros_like(p)], -1)
    return torch.where(masked, w, plain), lam


def _full_vocab_case(temperature=0.6, seed=4):
    g = torch.Generator().manual_seed(seed)
    head = SoftMaskHead(k=None, omega_s=0.7, omega_b=-1.3, omega_a=2.0, temperature=temperature)
    B, L, V, mask_id = 2, 9, 30, 29
    logits = torch.randn(B, L, V, generator=g) * 2
    x_t = torch.randint(0, V - 1, (B, L), generator=g)
    x_t[torch.rand(B, L, generator=g) < 0.6] = mask_id
    return head, x_t, logits, mask_id


def test_full_vocab_head_matches_the_dense_reference_with_temperature():
    head, x_t, logits, mask_id = _full_vocab_case()
    B, L, V = logits.shape
    assert head.temperature.item() == pytest.approx(0.6, abs=1e-5)
    ids, w = head(x_t, logits, mask_id)
    ref_w, lam = reference_full_vocab(head, x_t, logits, mask_id)
    masked = x_t == mask_id
    assert ids.shape == w.shape == (B, L, V + 1)
    assert torch.equal(ids[..., 0], x_t) and torch.equal(ids[masked][:, 1:], torch.arange(V).expand(int(masked.sum()), V))
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    lam = lam.detach()[masked]
    assert 0.05 < float(lam.min()) and float(lam.max()) < 0.65, "λ must be non-trivial"
    # τ matters: the same head at τ = 1 gives other weights (so the comparison above did check the temperature)
    untempered, _ = reference_full_vocab(SoftMaskHead(k=None, omega_s=0.7, omega_b=-1.3, omega_a=2.0), x_t, logits,
                                         mask_id)
    assert (w.double() - untempered)[masked].abs().max() > 1e-2


def test_full_vocab_gradient_reaches_the_temperature():
    """The loss's gradient reaches raw_temperature (through λ and the mixture) and equals the reference's."""
    head, x_t, logits, mask_id = _full_vocab_case(temperature=1.3, seed=5)
    probe = torch.randn(*logits.shape[:2], logits.shape[-1] + 1, generator=torch.Generator().manual_seed(6))
    _, w = head(x_t, logits, mask_id)
    (w * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad(set_to_none=True)
    ref_w, _ = reference_full_vocab(head, x_t, logits, mask_id)
    (ref_w * probe.double()).sum().backward()
    assert got["raw_temperature"].abs() > 1e-3
    for n, p in head.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad.double(), atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be >= 1 or None"),
    ({"k": -2}, "k must be >= 1 or None"),
    ({"omega_s": 0.0}, "needs 0 < omega_s < 1, got 0.0$"),
    ({"omega_s": 1.0}, "needs 0 < omega_s < 1, got 1.0$"),
    ({"omega_b": 0.0}, "needs omega_b < 0, got 0.0$"),
    ({"omega_a": 0.0}, "needs omega_a > 0, got 0.0$"),
    ({"k": None, "temperature": 0.0}, "needs temperature > 0, got"),
    ({"k": None, "temperature": -1.0}, "needs temperature > 0, got"),
])
def test_head_constructor_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftMaskHead(**kwargs)


@pytest.mark.parametrize("k", [None, 2])
def test_head_with_no_masked_rows_feeds_every_token_unchanged(k):
    """No position masked (e.g. a fully prompted row): every input is its own token with weight 1; the feedback
    measured nothing (0 rows, λ sum 0, not NaN)."""
    head = SoftMaskHead(k=k, omega_s=0.7)
    x_t = torch.tensor([[3, 1, 4, 1], [5, 0, 2, 6]])
    logits = torch.randn(2, 4, 8)
    ids, w = head(x_t, logits, mask_id=7)
    K = 8 if k is None else k
    assert ids.shape == w.shape == (2, 4, K + 1)
    assert torch.equal(ids, x_t.unsqueeze(-1).expand(2, 4, K + 1))
    assert bool((w[..., 0] == 1).all()) and bool((w[..., 1:] == 0).all())
    ids_m, w_m, stats = head.mix(x_t, torch.zeros(2, 4, dtype=torch.bool), logits.reshape(-1, 8)[:0])
    assert torch.equal(ids_m, ids) and torch.equal(w_m, w)
    assert (float(stats.lambda_sum), float(stats.gate_open), stats.rows) == (0.0, 0.0, 0)
