"""`softmask mdlm-import`, the dit backbone in the training stage's config / preflight, the continued-pretraining
recipes and their ZeRO-2 memory estimate at the real size (fast: no Ray, no DeepSpeed engine)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from infra.config import ConfigError, from_dict
from pipelines import cli
from test_train_config import write_dataset

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "mdlm_dit"
GOLDEN = load_file(str(ASSET / "golden.safetensors"))
TINY_TOKENIZER = {"spec": "tiny", "sha256": "", "vocab_size": 40, "eos_id": 0, "mask_id": 39, "pad_id": 0}
RECIPES = {k: ROOT / "configs" / f"continue_mdlm_owt_{k}.yaml" for k in ("sm", "binary")}


def test_cli_imports_the_hub_layout_idempotently(tmp_path, capsys):
    import models

    out = tmp_path / "mdlm"
    args = ["mdlm-import", "--source", str(ASSET / "hub"), "--output", str(out), "--tokenizer", "none"]
    assert cli.main(args) == 0
    assert "imported in" in capsys.readouterr().out
    model = models.load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(GOLDEN["x_t"]), GOLDEN["mdlm.logits_sigma0"], atol=2e-5, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "dit" and cfg["metadata"]["objective"] == "binary"
    assert json.loads((out / "import.json").read_text())["source_kind"] == "mdlm_hub"
    assert cli.main(args) == 0 and "already imported" in capsys.readouterr().out
    assert cli.main(args + ["--softmask_k", "1"]) == 2  # other settings into the same output: refused, kept
    assert "set overwrite=true" in capsys.readouterr().err
    assert cli.main(args + ["--softmask_k", "1", "--overwrite"]) == 0
    assert models.load_pretrained(out).config.softmask_k == 1


def test_cli_imports_a_lightning_sm_checkpoint_with_its_omega(tmp_path, capsys):
    import models
    from test_dit import lightning_ckpt

    out = tmp_path / "sm"
    ckpt = lightning_ckpt(tmp_path / "sm.ckpt")
    assert cli.main(["mdlm-import", "--source", str(ckpt), "--output", str(out), "--tokenizer", "none"]) == 0
    assert "omega_s=" in capsys.readouterr().out
    model = models.load_pretrained(out)
    assert model.checkpoint_metadata["objective"] == "sm" and model.checkpoint_metadata["weights"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(GOLDEN["x_t"]), GOLDEN["lightning.logits_pass1"], atol=2e-5, rtol=0)
    head = json.loads((out / "softmask_head.json").read_text())
    assert head["omega_s"] == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item())


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "gpt2"], "tokenizer: 'gpt2' has 50258 ids with [MASK] = 50257; the checkpoint has 40 rows"),
    (["--n_heads", "4"], "n_heads=4 is declared but the tensors give 2"),
])
def test_cli_refuses_a_mismatch_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert cli.main(["mdlm-import", "--source", str(ASSET / "hub"), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_cli_refuses_a_source_that_is_not_a_checkpoint(tmp_path, capsys):
    assert cli.main(["mdlm-import", "--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    assert cli.main(["mdlm-import", "--source", str(tmp_path / "notes.ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "not readable as weights without running its code" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ training stage config
@pytest.fixture()
def imported(tmp_path) -> str:
    from pipelines.mdlm_import import MDLMImportConfig, run

    return run(MDLMImportConfig(source=str(ASSET / "hub"), output=str(tmp_path / "mdlm"), tokenizer="none")).output


def test_preflight_continues_a_dit_export_and_refuses_mismatches(tmp_path, imported):
    from workers.train_config import TrainConfig, preflight

    data = write_dataset(str(tmp_path / "ds"), seq_len=32, tokenizer=TINY_TOKENIZER)
    base = {"mode": "continue", "init_checkpoint": imported, "micro_batch": 2, "global_batch": 4,
            "data": {"manifest": data}, "model": {"backbone": "dit", "overrides": {"dropout": 0.0}},
            "objective": {"kind": "sm", "k": 2}}
    plan = preflight(from_dict(TrainConfig, base))
    assert plan.backbone == "dit" and plan.model_config["softmask_k"] == 2 and plan.model_config["n_layers"] == 2
    assert plan.model_config["dropout"] == 0.0 and plan.init_objective == "binary"

    other = write_dataset(str(tmp_path / "ds259"), seq_len=32)  # the byte tokenizer: 259 ids, [MASK] 257
    with pytest.raises(ConfigError, match=r"init_checkpoint: .* different model: .*vocab_size=40 \(configured 259\)"):
        preflight(from_dict(TrainConfig, {**base, "data": {"manifest": other}}))
    with pytest.raises(ConfigError, match="model.backbone dit needs a dit export"):
        preflight(from_dict(TrainConfig, {**base, "init_checkpoint": _core(tmp_path)}))
    scratch = {**base, "mode": "pretrain", "init_checkpoint": "", "model": {"backbone": "dit", "flavor": "test"}}
    assert preflight(from_dict(TrainConfig, scratch)).model_config["flavor"] == "test"
    with pytest.raises(ConfigError, match="model.flavor: 'tiny' is not a dit flavor"):
        preflight(from_dict(TrainConfig, {**scratch, "model": {"backbone": "dit", "flavor": "tiny"}}))
    with pytest.raises(ConfigError, match="compile: is only available for backbones core and dit"):
        from_dict(TrainConfig, {**base, "model": {"backbone": "hf", "compile": True}})


def _core(tmp_path) -> str:
    import models

    out = tmp_path / "core"
    models.save_pretrained(models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=40)), out)
    return str(out)


# ------------------------------------------------------------------------------------------------------ recipes
def test_recipes_are_the_papers_continued_pretraining_and_twins():
    sm, binary = (yaml.safe_load(p.read_text()) for p in RECIPES.values())
    t = sm["train"]
    assert (t["mode"], t["steps"], t["global_batch"], t["ema_decay"]) == ("continue", 100_000, 512, 0.9999)
    assert t["model"]["backbone"] == "dit" and t["deepspeed"]["precision"] == "bf16"
    assert t["optim"] == {"lr": 3.0e-4, "warmup_steps": 2500, "schedule": "constant"}
    assert t["objective"] == {"kind": "sm", "p_sm": 0.8, "k": 3, "sm_lr": 1.0e-2}
    assert sm["preprocess"]["tokenizer"] == "gpt2" and sm["preprocess"]["seq_len"] == 1024
    assert binary["train"]["objective"]["kind"] == "binary"
    strip = lambda d: {k: v for k, v in d.items() if k not in ("objective", "run_name")}  # noqa: E731
    assert strip(binary["train"]) == strip(t) and binary["preprocess"] == sm["preprocess"]
    for path in RECIPES.values():
        cfg = cli.build_config(cli.COMMANDS["run"], str(path), [], {})
        assert cfg.train.grad_accum == 1 and cfg.train.scaling.num_workers * cfg.train.micro_batch == 512


def test_zero2_estimate_for_the_real_size_is_deepspeeds():
    from models.dit import DIT_FLAVORS
    from pipelines.train import zero_memory_estimate
    from workers.train_config import RunPlan

    cfg = cli.build_config(cli.COMMANDS["run"], str(RECIPES["sm"]), [], {}).train
    model = {**DIT_FLAVORS["small"], "flavor": "small", "softmask_k": 3}
    plan = RunPlan(model_config=model, seq_len=1024, data_mode="pretrain", train_uris=[], val_uris=[],
                   init_objective="", resume_step=0, backbone="dit")
    est = zero_memory_estimate(cfg, plan)
    n = 169_627_221  # MDLM small with GPT-2 + [MASK] (50258) and the 3 SM scalars
    assert est["n_params"] == n and est["total_gpus"] == 16
    assert est["per_gpu_bytes"] == 2 * n + int(18 * n / 16) and est["per_gpu_gib"] == 0.49  # as in the recipe
    assert "ZeRO-2" in est["summary"]
    assert zero_memory_estimate(dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=1)),
                                plan) is None
