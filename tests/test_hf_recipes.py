"""Cluster recipe for large HF diffusion LMs: DeepSpeed's ZeRO-3 memory estimate (the figures the training stage
prints before launch) and configs/finetune_dream7b_sm.yaml against the training stage's typed config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.deepspeed import estimate_zero3_memory

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "finetune_dream7b_sm.yaml"
DREAM_7B = 7_615_616_512            # Qwen2.5-7B / Dream-v0-7B parameters
DREAM_EMBED = 152_064 * 3_584       # its largest layer: the (untied) embedding matrix
GIB = 2 ** 30


def test_zero3_estimate_for_7b_on_8_gpus_is_in_the_expected_range():
    full = estimate_zero3_memory(DREAM_7B, 8, 1, offload=False, largest_layer_params=DREAM_EMBED, gpu_memory_gib=80)
    # 18 bytes/param (bf16 param + grad, fp32 master + Adam m, v) over 8 GPUs + the largest layer gathered in fp32
    assert full["per_gpu_bytes"] == 4 * DREAM_EMBED + int(18 * DREAM_7B / 8)
    assert 17.0 < full["per_gpu_gib"] < 19.0 and full["fits"] is True
    assert full["offload_optimizer"] == "none" and full["zero_init"] is True and full["total_gpus"] == 8

    off = estimate_zero3_memory(DREAM_7B, 8, 1, offload=True, largest_layer_params=DREAM_EMBED)
    assert 3.0 < off["per_gpu_gib"] < 4.5 and 150 < off["per_node_cpu_gib"] < 190 and off["fits"] is None
    assert off["per_gpu_bytes"] == 4 * DREAM_EMBED + int(2 * DREAM_7B / 8)  # only bf16 params stay on the GPUs

    two_nodes = estimate_zero3_memory(DREAM_7B, 8, 2, offload=False, largest_layer_params=DREAM_EMBED)
    assert two_nodes["per_gpu_gib"] < full["per_gpu_gib"] and two_nodes["total_gpus"] == 16
    one_gpu = estimate_zero3_memory(DREAM_7B, 1, 1, offload=False, largest_layer_params=DREAM_EMBED,
                                    gpu_memory_gib=80)
    assert one_gpu["per_gpu_gib"] > 120 and one_gpu["fits"] is False and "does NOT fit" in one_gpu["summary"]
    default = estimate_zero3_memory(DREAM_7B, 8, 1, offload=False)
    assert default["largest_layer_params"] == DREAM_7B // 10 and 17.0 < default["per_gpu_gib"] < 20.0


def test_zero3_estimate_table_is_what_deepspeed_prints(capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    est = estimate_zero3_memory(DREAM_7B, 8, 1, offload=False, largest_layer_params=DREAM_EMBED)
    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(total_params=DREAM_7B, largest_layer_params=DREAM_EMBED,
                                                   num_gpus_per_node=8, num_nodes=1)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "GB |" in ln]
    assert len(est["table"]) == len(printed) == 6  # same variants, same order as DeepSpeed's table
    for row, line in zip(est["table"], printed):
        numbers = f" {row['per_node_cpu_bytes'] / GIB:7.2f}GB | {row['per_gpu_bytes'] / GIB:6.2f}GB | "
        assert line.startswith(numbers), (numbers, line)
        assert f"offload_param={'none' if row['offload_param'] == 'none' else 'OffloadDeviceEnum.cpu'}" in line
        assert f"offload_optimizer={'none' if row['offload_optimizer'] == 'none' else 'OffloadDeviceEnum.cpu'}" in line
        assert line.endswith(f"zero_init={int(row['zero_init'])}")


def test_dream7b_recipe_is_the_papers_setting():
    data = yaml.safe_load(RECIPE.read_text())
    assert data["model"]["backbone"] == "hf" and data["mode"] == "finetune"
    assert data["deepspeed"]["zero_stage"] == 3 and data["deepspeed"]["precision"] == "bf16"
    assert data["deepspeed"]["activation_checkpointing"] is True
    ft = data["finetune"]
    assert (ft["freeze_backbone"], ft["lora_r"], ft["lora_alpha"], ft["use_dora"]) == (True, 16, 16.0, True)
    assert ft["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    obj = data["objective"]
    assert (obj["kind"], obj["k"], obj["t_min"], obj["t_max"], obj["sm_lr"]) == ("sm", 1, 0.2, 0.8, 1e-2)
    assert data["scaling"]["use_gpu"] and data["global_batch"] == 8


def test_dream7b_recipe_loads_as_a_train_config():
    from infra.config import load_config
    from workers.train_config import ModelSection, TrainConfig

    if "backbone" not in ModelSection.__dataclass_fields__:
        pytest.fail("workers.train_config.ModelSection has no `backbone` field yet (the recipe needs backbone: hf)")
    cfg = load_config(TrainConfig, RECIPE)
    assert cfg.model.backbone == "hf" and cfg.grad_accum == 1 and cfg.deepspeed.zero_stage == 3
    assert cfg.finetune.use_dora and cfg.finetune.lora_r == 16 and cfg.objective.k == 1


def test_training_stage_estimate_counts_the_real_model():
    """The pre-launch ZeRO-3 estimate counts parameters on the meta device: same count as the built model."""
    from infra.config import from_dict
    from models import ModelConfig, build_model
    from pipelines.train import zero_memory_estimate
    from workers.train_config import RunPlan, TrainConfig

    mcfg = ModelConfig.from_flavor("debug")
    cfg = from_dict(TrainConfig, {"data": {"manifest": "unused"}, "deepspeed": {"zero_stage": 3}})
    plan = RunPlan(model_config=mcfg.to_dict(), seq_len=64, data_mode="pretrain", train_uris=[], val_uris=[],
                   init_objective="", resume_step=0)
    est = zero_memory_estimate(cfg, plan)
    model = build_model(mcfg)
    assert est["n_params"] == sum(p.numel() for p in model.parameters())
    assert est["largest_layer_params"] == max(p.numel() for p in model.parameters())
    assert est["total_gpus"] == cfg.scaling.num_workers and "GiB per GPU" in est["summary"]


def test_qwen_coder_recipes_load_as_typed_configs():
    """The small code recipes: SM DoRA fine-tune of the imported Qwen2.5-Coder with ZeRO-3 on 2 CPU workers,
    on the stdlib code corpus tokenized with the model's own tokenizer."""
    from infra.config import from_dict, load_config
    from pipelines.preprocess import PreprocessConfig
    from workers.train_config import TrainConfig

    root = RECIPE.parent
    cfg = load_config(TrainConfig, root / "finetune_qwen_coder_sm.yaml")
    assert cfg.model.backbone == "hf" and cfg.deepspeed.zero_stage == 3 and cfg.scaling.num_workers == 2
    assert (cfg.objective.kind, cfg.objective.k, cfg.objective.t_min, cfg.objective.t_max) == ("sm", 1, 0.2, 0.8)
    assert cfg.finetune.freeze_backbone and cfg.finetune.use_dora and cfg.finetune.lora_r == 16
    assert cfg.finetune.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    pre = from_dict(PreprocessConfig, yaml.safe_load((root / "preprocess_code_qwen.yaml").read_text())["preprocess"])
    assert pre.sources[0].path == "corpus://python-stdlib" and pre.output == cfg.data.manifest
    assert pre.tokenizer == cfg.init_checkpoint


def test_python_stdlib_corpus_is_real_code(tmp_path):
    import ast

    from pipelines.corpus import ensure_corpus

    root = ensure_corpus("python-stdlib", cache=tmp_path)
    files = sorted(root.glob("*.py.txt"))
    assert len(files) > 150 and (root / "json.decoder.py.txt").is_file()
    assert not any(f.name.startswith(("test.", "idlelib.")) for f in files)
    ast.parse((root / "json.decoder.py.txt").read_text())  # the module's source, unchanged
    assert ensure_corpus("python-stdlib", cache=tmp_path) == root  # cached: returned as is
