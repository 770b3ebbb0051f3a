"""MDLM's DiT backbone and the loaders of MDLM / soft-masking checkpoints, against the golden fixture.

tests/assets/mdlm_dit (README there): a tiny random DiT in MDLM's hub layout, a fake Lightning SM checkpoint's tensors,
and the logits that MDLM's DiT and the SM code's two-pass forward gave on fixed inputs. Our loaders must reproduce them
to float tolerance, refuse what does not match with one line, and never run code from a checkpoint.
"""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.dit import DIT_FLAVORS, DiTConfig, build
from models.dit_loading import from_lightning_checkpoint, from_mdlm_hub_dir, mdlm_key_map

ASSET = Path(__file__).resolve().parent / "assets" / "mdlm_dit"
GOLDEN = load_file(str(ASSET / "golden.safetensors"))
META = json.loads((ASSET / "fixture.json").read_text())
MASK = META["mask_token_id"]
ATOL = 2e-5


def masked_logprobs(logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the real tokens at the masked positions (SUBS: [MASK] never predicted)."""
    z = logits.clone().float()
    z[..., MASK] = -1e6
    return torch.log_softmax(z[x_t == MASK], dim=-1)[:, :MASK]


def set_head(model, raw: dict) -> None:
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(raw["raw_scale"])
        model.sm_head.raw_centre.fill_(raw["raw_centre_neg"])
        model.sm_head.raw_steepness.fill_(raw["raw_steep"])


class Foreign:
    """Stands for a class a checkpoint pickles but the reader must never import or run (hyper-parameters)."""

    ran = []

    def __init__(self, payload):
        self.payload = payload

    def __setstate__(self, state):
        Foreign.ran.append(state)
        self.__dict__.update(state)


def lightning_ckpt(path: Path, *, drop: str | None = None, ema_len: int | None = None, extra=None) -> Path:
    """A torch.save file in the Lightning layout of the SM code, rebuilt from the fixture's tensors."""
    layout = META["lightning_checkpoint"]
    state = OrderedDict((k, GOLDEN[f"lightning.state_dict.{k}"].clone())
                        for k in layout["state_dict_keys"] if k != drop)
    shadow = [GOLDEN[f"lightning.ema.shadow_params.{i:03d}"].clone() for i in range(layout["ema"]["n_shadow_params"])]
    ckpt = {"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.5.0", "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}}, "callbacks": {},
            "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"config": Foreign({"algo": "mdlm_sm"}), "vocab_size": None},
            "ema": {"decay": layout["ema"]["decay"], "num_updates": layout["ema"]["num_updates"],
                    "shadow_params": shadow[:ema_len] if ema_len is not None else shadow},
            "sampler": {"random_state": None}, **(extra or {})}
    assert list(ckpt)[:12] == layout["top_level_keys"]
    torch.save(ckpt, path)
    return path


# --------------------------------------------------------------------------------------------- golden logits
@pytest.mark.parametrize("time_conditioning,golden", [(False, "mdlm.logits_sigma0"), (True, "mdlm.logits_sigma_t")])
def test_hub_checkpoint_reproduces_mdlms_logits(time_conditioning, golden):
    model, info = from_mdlm_hub_dir(ASSET / "hub", time_conditioning=time_conditioning)
    assert info["objective"] == "binary" and model.config.mask_token_id == MASK
    with torch.no_grad():
        logits = model.backbone(GOLDEN["x_t"], GOLDEN["t"])
    torch.testing.assert_close(logits, GOLDEN[golden], atol=ATOL, rtol=0)
    other = "mdlm.logits_sigma_t" if not time_conditioning else "mdlm.logits_sigma0"
    assert (logits - GOLDEN[other]).abs().max() > 100 * ATOL  # σ really reaches the network


def test_sm_feedback_matches_the_sm_codes_two_pass_forward():
    model, _ = from_mdlm_hub_dir(ASSET / "hub")
    set_head(model, META["sm_head_on_hub_weights"])
    x_t, t = GOLDEN["x_t"], GOLDEN["t"]
    with torch.no_grad():
        two_pass = model(x_t, t, two_pass=True)  # the training objective's pass 1 -> head -> pass 2
        one_pass = model(x_t, t)
        z = model(x_t, t)[x_t == MASK]
        ids, w, _ = model.sm_head.mix(x_t, x_t == MASK, z)
    ref = masked_logprobs(GOLDEN["sm.logits_pass2"], x_t)
    torch.testing.assert_close(masked_logprobs(two_pass, x_t), ref, atol=ATOL, rtol=0)
    assert (masked_logprobs(one_pass, x_t) - ref).abs().max() > 100 * ATOL  # the feedback changes the prediction
    m = x_t == MASK  # the soft input itself: [MASK] with 1 - λ, then the top-3 tokens with λ·π
    torch.testing.assert_close(w[m], GOLDEN["sm.input_probs"][m], atol=1e-6, rtol=0)
    assert torch.equal(ids[m], GOLDEN["sm.input_ids"][m])


def test_lightning_sm_checkpoint_gives_ema_weights_and_learned_omega(tmp_path):
    path = lightning_ckpt(tmp_path / "sm.ckpt")
    Foreign.ran.clear()
    model, info = from_lightning_checkpoint(path)
    assert not Foreign.ran, "the reader ran code of a pickled object"
    assert info["weights"] == "ema" and info["objective"] == "sm" and info["ema_num_updates"] == 3
    x_t, t = GOLDEN["x_t"], GOLDEN["t"]
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x_t, t), GOLDEN["lightning.logits_pass1"], atol=ATOL, rtol=0)
        sm = model(x_t, t, two_pass=True)
    torch.testing.assert_close(masked_logprobs(sm, x_t), masked_logprobs(GOLDEN["lightning.logits_pass2"], x_t),
                               atol=ATOL, rtol=0)
    raw = META["lightning_tran_head"]
    assert model.sm_head.raw_scale.item() == pytest.approx(raw["raw_scale"])
    assert model.sm_head.raw_centre.item() == pytest.approx(raw["raw_centre_neg"])
    assert model.sm_head.raw_steepness.item() == pytest.approx(raw["raw_steep"])

    live, info = from_lightning_checkpoint(path, weights="live")
    with torch.no_grad():
        torch.testing.assert_close(live.backbone(x_t, t), GOLDEN["lightning.logits_pass1_live"], atol=ATOL, rtol=0)
    assert (GOLDEN["lightning.logits_pass1_live"] - GOLDEN["lightning.logits_pass1"]).abs().max() > 100 * ATOL


def test_a_binary_lightning_checkpoint_gets_a_fresh_sm_head(tmp_path):
    layout = META["lightning_checkpoint"]["state_dict_keys"]
    path = lightning_ckpt(tmp_path / "mdlm.ckpt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"] = OrderedDict((k, v) for k, v in ckpt["state_dict"].items() if not k.startswith("tran_head."))
    torch.save(ckpt, path)
    model, info = from_lightning_checkpoint(path)
    assert info["objective"] == "binary" and info["sm_head"] is None and any(k.startswith("tran_head.") for k in layout)
    assert model.sm_head.omega_s.item() < 1e-5  # ω_s ≈ 0: starts as the binary model


# --------------------------------------------------------------------------------------------------- refusals
def test_pickled_code_never_runs_and_blocked_globals_are_refused(tmp_path):
    import models.weights_file as wf

    path = lightning_ckpt(tmp_path / "a.ckpt", extra={"note": Foreign({"x": 1})})
    Foreign.ran.clear()
    obj = wf.read_weights_file(path)
    assert not Foreign.ran and isinstance(obj["note"], wf.Opaque) and isinstance(obj["state_dict"], dict)

    class Payload:  # a pickle that calls os.system when unpickled by Python's pickle
        def __reduce__(self):
            import os

            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, bad, pickle_protocol=2)
    with pytest.raises(ValueError, match="not readable as weights without running its code") as e:
        wf.read_weights_file(bad)
    assert "\n" not in str(e.value) and not (tmp_path / "pwned").exists()
    pkl = tmp_path / "plain.pkl"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="plain.pkl"):
        wf.read_weights_file(pkl)


def _hub_copy(tmp_path, edit_tensors=None, edit_config=None) -> Path:
    out = tmp_path / "hub"
    out.mkdir()
    sd = load_file(str(ASSET / "hub" / "model.safetensors"))
    cfg = json.loads((ASSET / "hub" / "config.json").read_text())
    if edit_tensors:
        edit_tensors(sd)
    if edit_config:
        edit_config(cfg)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (lambda sd: sd.pop("backbone.blocks.1.attn_out.weight"), None, "blocks.1.attn_out.weight is missing"),
    (lambda sd: sd.__setitem__("backbone.blocks.0.mlp.0.bias", torch.zeros(63)), None,
     r"blocks.0.mlp.0.bias has shape \(63,\), expected \(64,\)"),
    (lambda sd: sd.__setitem__("backbone.blocks.0.extra", torch.zeros(2)), None, "unexpected tensor"),
    (lambda sd: sd["backbone.output_layer.linear.bias"].__setitem__(0, float("nan")), None, "non-finite"),
    (lambda sd: sd.__setitem__("backbone.output_layer.linear.bias", torch.zeros(40, dtype=torch.int64)), None,
     "expected a floating-point tensor"),
    (lambda sd: sd.__setitem__("backbone.rotary_emb.inv_freq", sd["backbone.rotary_emb.inv_freq"] * 2), None,
     "not rotary base 10000"),
    (None, lambda c: c.__setitem__("n_heads", 4), "n_heads=4 is declared but the tensors give 2"),
    (None, lambda c: c.__setitem__("hidden_dim", 32), "d_model=32 is declared but the tensors give 16"),
    (None, lambda c: c.__setitem__("model_type", "llama"), "model_type 'llama', expected 'mdlm'"),
])
def test_hub_checkpoints_that_do_not_match_are_refused_in_one_line(tmp_path, edit_tensors, edit_config, message):
    folder = _hub_copy(tmp_path, edit_tensors, edit_config)
    with pytest.raises(ValueError, match=message) as e:
        from_mdlm_hub_dir(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_lightning_checkpoints_that_do_not_match_are_refused(tmp_path):
    short = lightning_ckpt(tmp_path / "short.ckpt", ema_len=5)
    with pytest.raises(ValueError, match="ema.shadow_params has 5 tensors, the backbone 30 parameters"):
        from_lightning_checkpoint(short)
    no_rotary = lightning_ckpt(tmp_path / "norot.ckpt", drop="backbone.rotary_emb.inv_freq")
    with pytest.raises(ValueError, match="n_heads is needed"):
        from_lightning_checkpoint(no_rotary)
    model, _ = from_lightning_checkpoint(no_rotary, n_heads=2)  # told, it loads
    assert model.config.n_heads == 2
    swapped = tmp_path / "swapped.ckpt"
    ckpt = torch.load(lightning_ckpt(tmp_path / "s.ckpt"), weights_only=False)
    sh = ckpt["ema"]["shadow_params"]
    sh[0], sh[1] = sh[1], sh[0]  # same count, wrong places
    torch.save(ckpt, swapped)
    with pytest.raises(ValueError, match=r"ema.shadow_params\[0\] has shape \(8, 256\), its parameter "
                                         r"vocab_embed.embedding \(40, 16\)"):
        from_lightning_checkpoint(swapped)
    with pytest.raises(ValueError, match="no 'state_dict'"):
        torch.save({"weights": torch.zeros(2)}, tmp_path / "x.ckpt")
        from_lightning_checkpoint(tmp_path / "x.ckpt")


# ---------------------------------------------------------------------------------------------------- backbone
def test_dit_flavors_build_and_the_small_one_is_mdlm_owts_size():
    for name in DIT_FLAVORS:
        DiTConfig.from_flavor(name)
    with torch.device("meta"):
        small = build(DiTConfig.from_flavor("small"))
    assert sum(p.numel() for p in small.backbone.parameters()) == 169_627_218  # + 3 SM scalars = 169.6M (MDLM small)
    with pytest.raises(ValueError, match="n_heads"):
        DiTConfig(d_model=16, n_heads=3)
    ours = [n for n, _ in build(DiTConfig.from_flavor("test")).backbone.named_parameters()]
    assert sorted(b for _, b in mdlm_key_map(2)) == sorted(ours)  # the mapping covers every parameter once


def test_fresh_dit_starts_as_identity_blocks_and_roundtrips_through_save(tmp_path):
    import models

    torch.manual_seed(0)
    model = build(DiTConfig.from_flavor("test", time_conditioning=True)).eval()
    x = torch.randint(0, MASK, (2, 10))
    bb = model.backbone
    with torch.no_grad():
        h = bb.hidden(x, torch.tensor([0.3, 0.8]))
        ref = torch.nn.functional.layer_norm(bb.embed(x), (16,))  # zero adaLN: blocks and output modulation vanish
        torch.testing.assert_close(h, ref, atol=1e-5, rtol=0)
        for p in bb.parameters():
            p.normal_(0, 0.3)
        out = model(x, torch.tensor([0.3, 0.8]))
    models.save_pretrained(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["backbone"] == "dit"
    again = models.load_pretrained(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.tensor([0.3, 0.8])), out)
    with pytest.raises(ValueError, match="time_conditioning=True needs t"):
        again.backbone(x)


@pytest.mark.slow  # ~1 min of torch.compile on a CPU
def test_compiled_dit_trains_exactly_like_eager():
    """model.compile for backbone dit: models.compile.compile_model compiles the DiT blocks (adaLN, rotate-half
    rotary, fp32 LayerNorms) in place; a two-pass SM step and a binary step give the eager loss and gradients."""
    from models.compile import compile_model
    from models.objective import training_loss
    from models.objective_config import ObjectiveConfig

    torch.manual_seed(0)
    eager = build(DiTConfig.from_flavor("test", time_conditioning=True))
    with torch.no_grad():
        for p in eager.backbone.parameters():
            p.normal_(0, 0.3)
    compiled = build(eager.config)
    compiled.load_state_dict(eager.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    nll = compile_model(compiled)
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints keep their keys
    x0 = torch.randint(0, MASK, (2, 24))
    obj = ObjectiveConfig(kind="sm", p_sm=1.0)
    for step, two_pass in enumerate((True, False)):
        a, _ = training_loss(compiled, x0, obj, seed=0, step=step, two_pass=two_pass, nll=nll)
        b, _ = training_loss(eager, x0, obj, seed=0, step=step, two_pass=two_pass)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        a.backward()
        b.backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
