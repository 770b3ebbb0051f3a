"""The paper's sampling / training protocol, item by item, on hand-made inputs: nucleus boundary rule, the time grid
and the noise-removal forward, the unchanged-input forward cache, ReMDM remasked positions fed back as one-hot,
padded vocabulary out of pass 1, Dream's loss normalisation and noise, and the gate diagnostics."""
import math

import numpy as np
import pytest
import torch

import models
from models.diffusion_lm import MaskedLogits
from models.objective import ObjectiveConfig, noise_batch, training_loss
from models.sampling import SamplerConfig, sample
from models.sampling_rules import nucleus


def _model(vocab=60, **kw):
    torch.manual_seed(0)
    m = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=vocab, max_seq_len=32, **kw))
    with torch.no_grad():
        m.sm_head.raw_scale.fill_(1.0)   # ω_s ≈ 0.73: SM feedback matters
        m.sm_head.raw_centre.fill_(6.0)  # ω_b ≈ −6: the gate is open even for a flat random model
    return m.eval()


class Recorder(torch.nn.Module):
    """Wraps a DiffusionLM and records the time and the feedback of every forward (the model itself is unchanged)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x, t, **kw):
        out = self.inner(x, t, **kw)
        z = out[0] if isinstance(out, tuple) else out
        self.calls.append({"x": x.clone(), "t": float(t[0]), "prev": kw.get("prev_logits"), "z": z.detach().clone()})
        return out


# ------------------------------------------------------------------------------------------------ nucleus
def test_nucleus_keeps_while_cumulative_is_at_most_p_and_always_the_first():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    mdlm = nucleus(p, 0.9, "mdlm")  # cumulative 0.5, 0.8, 0.95: the crossing token (0.15) is dropped
    assert torch.allclose(mdlm, torch.tensor([[0.0, 0.5, 0.0, 0.3]]) / 0.8)
    dream = nucleus(p, 0.9, "dream")  # Dream / HF keep the token that crosses p
    assert torch.allclose(dream, torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)
    assert torch.equal(nucleus(p, 0.3, "mdlm"), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # first kept though 0.5 > 0.3
    assert torch.equal(nucleus(p, 1.0, "mdlm"), p)


def test_sampler_draws_from_the_filtered_copy_but_feeds_back_the_unfiltered_prediction():
    m = Recorder(_model())
    cfg = SamplerConfig(steps=4, top_p=0.5, soft_mask=True, cache_unchanged=False)
    out = sample(m, cfg, num_samples=6, length=16, seed=1)
    assert not (out.tokens == m.mask_id).any()
    for prev, nxt in zip(m.calls, m.calls[1:]):
        fed = nxt["prev"]
        assert isinstance(fed, MaskedLogits)
        assert torch.equal(fed.z, prev["z"])  # the raw logits of the previous forward, no top-p applied
        assert torch.isfinite(fed.z[:, :m.mask_id]).float().mean() > 0.9
    # every revealed token lies inside the nucleus of the prediction it was drawn from
    for call, after in zip(m.calls, [c["x"] for c in m.calls[1:]] + [out.tokens]):
        rows = call["x"] == m.mask_id
        newly = (after != m.mask_id) & rows
        z_all = torch.full((*rows.shape, call["z"].shape[-1]), -math.inf)
        z_all[rows] = call["z"]
        kept = nucleus(torch.softmax(z_all[newly], -1), 0.5, "mdlm") > 0
        assert kept[torch.arange(int(newly.sum())), after[newly]].all()


# ------------------------------------------------------------------------------------------------ time grid
def test_time_grid_runs_from_one_to_t_eps_then_one_noise_removal_forward_with_feedback():
    m = Recorder(_model())
    cfg = SamplerConfig(steps=5, t_eps=0.5, soft_mask=True, cache_unchanged=False)  # ends at t = 0.5: masks remain
    out = sample(m, cfg, num_samples=4, length=24, seed=0)
    grid = torch.linspace(1.0, 0.5, 6, dtype=torch.float64)[:5].tolist()
    assert [c["t"] for c in m.calls[:5]] == pytest.approx(grid)
    last = m.calls[-1]
    assert len(m.calls) == 6 == out.nfe and last["t"] == pytest.approx(0.5)  # the noise-removal forward
    assert isinstance(last["prev"], MaskedLogits)  # ... reads SM feedback of the last prediction
    left = last["x"] == m.mask_id
    assert left.any()
    assert torch.equal(out.tokens[left], last["z"].argmax(-1))  # ... and is decoded by argmax
    assert not (out.tokens == m.mask_id).any()


def test_default_grid_ends_at_the_papers_t_eps():
    assert SamplerConfig().t_eps == 1e-5 and SamplerConfig().top_p_rule == "mdlm"


# ------------------------------------------------------------------------------------------------ forward cache
@pytest.mark.parametrize("soft_mask", [False, True])
def test_forward_is_skipped_while_x_is_unchanged_and_nfe_counts_forwards(soft_mask):
    m = Recorder(_model())
    cfg = SamplerConfig(steps=48, soft_mask=soft_mask, cache_unchanged=True)  # 48 steps for 8 tokens: idle steps
    out = sample(m, cfg, num_samples=1, length=8, seed=2, return_trajectory=True)
    states = [torch.full((1, 8), m.mask_id)] + out.trajectory
    changed = [bool((a != b).any()) for a, b in zip(states, states[1:])]
    removal = bool((out.trajectory[-1] == m.mask_id).any())
    expected = 1 + sum(changed[:-1]) + removal  # a forward after every step that changed x (and the first)
    assert out.nfe == len(m.calls) == expected < 48
    assert all(not torch.equal(a["x"], b["x"]) for a, b in zip(m.calls, m.calls[1:]))  # never the same x twice
    full = sample(_model(), SamplerConfig(steps=48, soft_mask=soft_mask, cache_unchanged=False), 1, 8, seed=2,
                  return_trajectory=True)
    assert full.nfe == len(full.trajectory) + bool((full.trajectory[-1] == m.mask_id).any()) > out.nfe
    if not soft_mask:  # the prediction of an unchanged x is the same: the cache changes no token
        assert torch.equal(full.tokens, out.tokens)


# ------------------------------------------------------------------------------------------------ ReMDM feedback
def test_a_remasked_position_is_fed_back_as_the_one_hot_of_the_token_it_held():
    m = _model()
    L, V = 6, m.config.vocab_size
    held = torch.tensor([[7, 9, 11, 13, 15, 17]])
    before = held.clone()
    before[0, [0, 1]] = m.mask_id  # predicted while masked: positions 0 and 1
    z = torch.randn(2, V)
    z[:, m.mask_id] = -math.inf
    prev = MaskedLogits(before == m.mask_id, z, tokens=before)
    now = before.clone()
    now[0, 1] = 20  # revealed since
    now[0, 3] = m.mask_id  # remasked (ReMDM): held token 13 when the prediction was made
    (ids, w), _, stats = m.feedback_input(now, prev)
    w = w.detach()
    assert stats.rows == 2  # position 0 (stored row) and position 3 (one-hot)
    head = m.sm_head
    lam_certain = (head.omega_s * torch.sigmoid(head.omega_a * (0.0 - head.omega_b))).detach()  # H = 0: one-hot
    assert ids[0, 3, 1] == 13 and w[0, 3, 1] == pytest.approx(float(lam_certain), rel=1e-5)
    assert w[0, 3, 0] == pytest.approx(1 - float(lam_certain), rel=1e-5)
    assert w[0, 3, 2:].abs().max() < 1e-6  # the other top-k slots carry nothing
    assert ids[0, 0, 1] == int(z[0].argmax())  # the stored prediction for the position that stayed masked
    assert torch.equal(ids[0, [1, 2, 4, 5], 0], now[0, [1, 2, 4, 5]]) and (w[0, [1, 2, 4, 5], 1:] == 0).all()


# ------------------------------------------------------------------------------------------------ padded vocab
def test_padded_vocabulary_columns_are_out_of_pass_one():
    m = _model(vocab=50, vocab_pad_multiple=64)  # 14 padding rows in the output matrix
    with torch.no_grad():
        m.backbone.lm_head.weight[50:] = 5.0 * m.backbone.lm_head.weight[:14].sign()  # padding rows would win
    seen = {}
    mix = m.sm_head.mix

    def spy(x_t, masked, z, *a, **k):
        seen["z"] = z
        out = mix(x_t, masked, z, *a, **k)
        seen["ids"] = out[0]
        return out

    m.sm_head.mix = spy
    x0 = torch.randint(0, 48, (4, 16))
    training_loss(m, x0, ObjectiveConfig(kind="sm"), seed=0, step=0, two_pass=True)
    assert (seen["z"][:, 50:] <= -1e5).all() and (seen["z"][:, :48] > -1e5).all()
    assert int(seen["ids"].max()) < 50


# ------------------------------------------------------------------------------------------------ Dream recipe
def test_dream_noise_and_loss_normalisation_by_hand():
    m = _model().train()
    obj = ObjectiveConfig(kind="binary", schedule="dream", per_batch_t=True, t_min=0.2, t_max=0.8,
                          loss_norm="masked", min_one_masked=True)
    x0 = torch.randint(0, 50, (8, 16))
    loss, _ = training_loss(m, x0, obj, seed=3, step=5, two_pass=False)
    t, x_t, schedule = noise_batch(x0, obj, 3, 5, 0, 1, None, m.mask_id)
    assert torch.all(t == t[0]) and 0.2 <= float(t[0]) <= 0.8  # one t per batch, in Dream's range
    assert schedule.weight(t)[0] == pytest.approx(1 / float(t[0]))
    masked = x_t == m.mask_id
    logits = m(x_t, t)
    nll = torch.nn.functional.cross_entropy(logits[masked], x0[masked], reduction="none")
    assert float(loss) == pytest.approx(float((nll / t[0]).mean()), rel=1e-4)  # (1/t) · mean over masked tokens
    ours = ObjectiveConfig(kind="binary")
    loss_tok, _ = training_loss(m, x0, ours, seed=3, step=5, two_pass=False)
    t2, x2, s2 = noise_batch(x0, ours, 3, 5, 0, 1, None, m.mask_id)
    mk = x2 == m.mask_id
    nll2 = torch.nn.functional.cross_entropy(m(x2, t2)[mk], x0[mk], reduction="none")
    w = s2.weight(t2)[mk.nonzero()[:, 0]]
    assert float(loss_tok) == pytest.approx(float((w * nll2).sum() / x0.numel()), rel=1e-4)  # per scored token


def test_dream_mask_probability_and_at_least_one_masked_token_per_row():
    obj = ObjectiveConfig(kind="binary", schedule="dream", per_batch_t=True, t_min=0.2, t_max=0.2 + 1e-6,
                          min_one_masked=True)
    x0 = torch.randint(0, 50, (4000, 4))
    _, x_t, _ = noise_batch(x0, obj, 0, 0, 0, 1, None, 59)
    rate = float((x_t == 59).float().mean())
    assert (x_t == 59).any(1).all()  # a row with nothing masked would carry no loss
    p = (1 - 1e-3) * 0.2 + 1e-3
    with_floor = p * 4 + (1 - p) ** 4  # expected masked count per row once empty rows get one
    assert rate == pytest.approx(with_floor / 4, abs=0.01)
    _, plain, _ = noise_batch(x0, ObjectiveConfig(kind="binary", schedule="dream", per_batch_t=True, t_min=0.2,
                                                  t_max=0.2 + 1e-6), 0, 0, 0, 1, None, 59)
    assert not (plain == 59).any(1).all()


# ------------------------------------------------------------------------------------------------ gate diagnostics
def _centre_at(m, h: torch.Tensor) -> None:
    """Put the gate centre at the median entropy: about half of the rows open."""
    with torch.no_grad():
        m.sm_head.raw_centre.fill_(math.log(math.expm1(float(h.median()))))


def test_training_metrics_carry_the_gate_open_share_and_mean_lambda_by_hand():
    m = _model()
    x0 = torch.randint(0, 50, (8, 16))
    obj = ObjectiveConfig(kind="sm")
    t, x_t, _ = noise_batch(x0, obj, 1, 2, 0, 1, None, m.mask_id)
    with torch.no_grad():
        p = torch.softmax(m(x_t, t)[x_t == m.mask_id], -1)  # pass 1: pure masks
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    _centre_at(m, h)
    _, metrics = training_loss(m, x0, obj, seed=1, step=2, two_pass=True)
    head = m.sm_head
    share = float((h <= -head.omega_b).float().mean())
    lam = (head.omega_s * torch.sigmoid(head.omega_a * (-h - head.omega_b))).detach()
    assert 0 < share < 1 and float(metrics["gate_open"]) == pytest.approx(share)
    assert float(metrics["lambda_mean"]) == pytest.approx(float(lam.mean()), rel=1e-3)
    _, one = training_loss(m, x0, obj, seed=1, step=2, two_pass=False, gate_centre=float(head.omega_b))
    assert float(one["gate_open"]) == pytest.approx(share)  # a one-pass step reads pure masks, as pass 1 does


def test_eval_gate_diagnostics_by_hand():
    from pipelines.evaluate import gate_diagnostics

    m = _model()
    rows = np.random.default_rng(0).integers(0, 50, size=(12, 16))
    obj = ObjectiveConfig(kind="binary", antithetic=False)
    x = torch.as_tensor(rows)
    hs = []
    with torch.no_grad():
        for i, b in enumerate(range(0, 12, 5)):
            t, x_t, _ = noise_batch(x[b:b + 5], obj, 4, i, 0, 1, None, m.mask_id)
            p = torch.softmax(m(x_t, t)[x_t == m.mask_id], -1)
            hs.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
    h = torch.cat(hs)
    _centre_at(m, h)
    d = gate_diagnostics(m, rows, seed=4, batch=5)
    assert d["masked_positions"] == h.numel() and 0.3 < d["gate_open"] < 0.7
    assert d["gate_open"] == pytest.approx(float((h <= -m.sm_head.omega_b).float().mean()))
    assert d["omega_s"] == pytest.approx(float(m.sm_head.omega_s))
    assert d["share_h_below_0.75"] == pytest.approx(float((h <= 0.75).float().mean()))


# ------------------------------------------------------------------------------------------------ Dream code preset
def test_dream_transfer_count_uses_the_batch_mean_and_reveals_everything_on_the_last_step():
    from models.sampling_rules import reveal_counts

    active = torch.zeros(3, 10, dtype=torch.bool)
    active[0, :10], active[1, :4], active[2, :1] = True, True, True  # 10, 4, 1 masked: mean 5
    assert reveal_counts(active, 1.0, 0.5, False, "dream").tolist() == [2, 2, 1]  # int(5 · 0.5) = 2, capped
    assert reveal_counts(active, 1.0, 0.9, False, "dream").tolist() == [0, 0, 0]  # int(0.5) = 0: none this step
    assert reveal_counts(active, 1.0, 0.5, False, "round").tolist() == [5, 2, 1]  # per row, at least one
    assert reveal_counts(active, 0.1, 1e-3, True, "dream").tolist() == [10, 4, 1]


def test_dream_code_preset_and_its_errors():
    cfg = SamplerConfig.preset("dream_code", steps=8, soft_mask=False)
    assert (cfg.algorithm, cfg.temperature, cfg.top_p, cfg.top_p_rule, cfg.transfer_rule, cfg.t_eps) == \
        ("entropy", 0.1, 0.9, "dream", "dream", 1e-3)
    assert cfg.steps == 8 and not cfg.soft_mask
    with pytest.raises(ValueError, match="unknown sampler preset 'dreem'"):
        SamplerConfig.preset("dreem")
    out = sample(_model(), cfg, num_samples=2, length=12, prompt_ids=[[3, 4], [5]], seed=0)
    assert not (out.tokens == 59).any() and out.tokens[0, :2].tolist() == [3, 4]


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_prompt_and_the_code_of_a_reply_run_as_a_humaneval_program(tmp_path):
    import json

    from models.evaluation.humaneval import chat_prompt, code_from_reply, load_chat_template, program_for

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_LIKE}))
    tpl = load_chat_template(tmp_path)
    text = chat_prompt(tpl, "write add")
    assert text == "<|im_start|>user\nwrite add<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no chat template"):
        load_chat_template(tmp_path / "missing")
    problem = {"prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    whole = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    body = "    return a + b\ndef other():\n    pass\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    for reply, ok in ((whole, True), (body, True), (wrong, False)):
        program = program_for(problem, code_from_reply(problem, reply))
        if ok:
            exec(compile(program, "<program>", "exec"), {})
        else:
            with pytest.raises(AssertionError):
                exec(compile(program, "<program>", "exec"), {})
