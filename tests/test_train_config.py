"""Training stage without Ray: typed config validation, preflight errors, DeepSpeed config, LR schedule, data reader.

Fast (no worker processes). The Ray Train + DeepSpeed runs are in test_train_ray.py.
"""
from __future__ import annotations

import json
import pathlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from infra.config import ConfigError, from_dict, load_config
from infra.deepspeed import DeepSpeedConfig, build_ds_config, lr_lambda

REPO = Path(__file__).resolve().parents[1]
BYTE_TOKENIZER = {"spec": "bytes", "sha256": "", "vocab_size": 259, "eos_id": 256, "mask_id": 257, "pad_id": 258}


def write_dataset(root: str, *, seq_len: int = 64, n_train: int = 64, n_val: int = 16, sft: bool = False,
                  source: str = "textwrap.py", shards: int = 2, tokenizer: dict | None = None) -> str:
    """A tiny dataset in the preprocessing layout: bytes of a real stdlib source file as token ids (0..255).

    sft: the first half of every row is the prompt (loss_mask 0), the second half the response (loss_mask 1).
    """
    import pyarrow as pa

    from infra.storage import join as join_uri
    from workers.shard_io import DatasetManifest, ShardInfo, write_parquet_atomic

    text = pathlib.Path(sysconfig.get_paths()["stdlib"], source).read_bytes()
    ids = np.resize(np.frombuffer(text, dtype=np.uint8).astype(np.int32), (n_train + n_val) * seq_len)
    ids = ids.reshape(-1, seq_len)
    splits = {}
    for split, rows, n_shards in (("train", ids[:n_train], shards), ("validation", ids[n_train:], 1)):
        infos = []
        for s, part in enumerate(np.array_split(rows, n_shards)):
            cols = {"input_ids": pa.array(part.tolist(), pa.list_(pa.int32()))}
            if sft:
                lm = np.ones_like(part, dtype=np.int8)
                lm[:, : seq_len // 2] = 0
                cols["loss_mask"] = pa.array(lm.tolist(), pa.list_(pa.int8()))
            rel = f"{split}/shard-{s:05d}.parquet"
            sha = write_parquet_atomic(pa.table(cols), join_uri(root, rel))
            infos.append(ShardInfo(path=rel, rows=len(part), tokens=len(part) * seq_len, sha256=sha))
        splits[split] = infos
    DatasetManifest(mode="sft" if sft else "pretrain", seq_len=seq_len, tokenizer=dict(tokenizer or BYTE_TOKENIZER),
                    splits=splits, config_hash="test").save(root)
    return root


def train_cfg(manifest: str, *layers: dict, **over):
    """A TrainConfig: small defaults, then each of ``layers`` and ``over`` (a section's keys merge into it)."""
    from workers.train_config import TrainConfig

    base = {"run_name": "unit", "steps": 4, "micro_batch": 4, "global_batch": 8, "data": {"manifest": manifest}}
    for layer in (*layers, over):
        for k, v in layer.items():
            if isinstance(v, dict):
                base.setdefault(k, {}).update(v)
            else:
                base[k] = v
    return from_dict(TrainConfig, base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("data")))


# ------------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("over, field_name", [
    ({"global_batch": 12}, "global_batch"),                                  # 12 % (4 * 2) != 0
    ({"micro_batch": 0}, "micro_batch"),
    ({"deepspeed": {"zero_stage": 4}}, "zero_stage"),
    ({"deepspeed": {"zero_stage": 3}, "finetune": {"freeze_backbone": True}}, "finetune.freeze_backbone"),
    ({"deepspeed": {"offload_optimizer": True}}, "deepspeed.offload_optimizer"),  # CPU workers
    ({"mode": "continue"}, "init_checkpoint"),
    ({"init_checkpoint": "/x"}, "init_checkpoint"),                          # pretrain with an init checkpoint
    ({"objective": {"kind": "binary"}, "finetune": {"freeze_backbone": True}}, "finetune.freeze_backbone"),
    ({"objective": {"p_sm": 1.5}}, "p_sm"),
    ({"data": {"manifest": ""}}, "data.manifest"),
    ({"model": {"compile": True}, "deepspeed": {"zero_stage": 3}}, "model.compile"),
    ({"model": {"backbone": "hf", "compile": True}}, "compile"),
])
def test_config_errors_name_the_field(over, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        train_cfg("/some/manifest", **over)


def test_unknown_key_and_derived_values():
    with pytest.raises(ConfigError, match="optim.lrr"):
        train_cfg("/m", optim={"lrr": 1.0})
    cfg = train_cfg("/m", global_batch=32, scaling={"num_workers": 2})
    assert cfg.grad_accum == 4
    assert cfg.resolved_output_dir == "runs/unit/output"
    from workers.train_config import TrainConfig
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the dict that travels to the workers round-trips


def test_relative_local_paths_reach_the_workers_absolute(monkeypatch, tmp_path):
    """Ray workers run in their own directories: the stage hands them absolute local paths, URIs unchanged."""
    from pipelines.train import _absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = _absolute_local_paths(train_cfg("datasets/d", mode="continue", init_checkpoint="hf/model",
                                          checkpoint={"storage_path": "runs"}))
    assert cfg.data.manifest == str(tmp_path / "datasets/d") and cfg.init_checkpoint == str(tmp_path / "hf/model")
    assert cfg.resolved_output_dir == f"{tmp_path}/runs/unit/output"
    remote = _absolute_local_paths(train_cfg("s3://b/d", checkpoint={"storage_path": "s3://b/runs"}))
    assert remote.data.manifest == "s3://b/d" and remote.storage_run_uri == "s3://b/runs/unit"


def test_recipes_load_and_validate():
    from workers.train_config import TrainConfig

    for name in ("train_debug", "continue_sm", "finetune_sft"):
        cfg = load_config(TrainConfig, REPO / "configs" / f"{name}.yaml", ["steps=3"])
        assert cfg.steps == 3 and cfg.global_batch % (cfg.micro_batch * cfg.scaling.num_workers) == 0
    assert load_config(TrainConfig, REPO / "configs/train_debug.yaml").scaling.num_workers == 2


def test_preflight_errors(dataset, tmp_path):
    from models import ModelConfig, build_model, save_pretrained
    from workers.train_config import preflight

    plan = preflight(train_cfg(dataset))
    assert plan.seq_len == 64 and plan.model_config["vocab_size"] == 259 and len(plan.train_uris) == 2
    with pytest.raises(ConfigError, match="data.manifest: not found"):
        preflight(train_cfg(str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="data.manifest: seq_len 64 exceeds the max_seq_len 32"):
        preflight(train_cfg(dataset, model={"overrides": {"max_seq_len": 32}}))
    with pytest.raises(ConfigError, match="data.manifest: mode finetune needs an sft dataset"):
        preflight(train_cfg(dataset, mode="finetune", init_checkpoint=str(tmp_path)))
    # an init checkpoint whose model differs from the configured one
    other = build_model(ModelConfig.from_flavor("debug", vocab_size=259, mask_token_id=257, d_model=64, n_heads=4))
    save_pretrained(other, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"init_checkpoint: .*d_model=64 \(configured 128\)"):
        preflight(train_cfg(dataset, mode="continue", init_checkpoint=str(tmp_path / "other")))
    # resuming a run whose checkpoint was written with another world size
    ckpt = tmp_path / "runs" / "unit" / "checkpoint_00000002"
    ckpt.mkdir(parents=True)
    old = train_cfg(dataset, scaling={"num_workers": 1})
    (ckpt / "train_state.json").write_text(json.dumps({"step": 2, "train_config": old.to_dict(),
                                                       "model_config": plan.model_config}))
    with pytest.raises(ConfigError, match="scaling.num_workers: is 2 but the checkpoint of run 'unit'"):
        preflight(train_cfg(dataset, checkpoint={"storage_path": str(tmp_path / "runs")}))
    # ... or without an EMA: the EMA cannot be switched on (or off) on resume, only its decay may change
    old = train_cfg(dataset, ema_decay=0.0)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 2, "train_config": old.to_dict(),
                                                       "model_config": plan.model_config}))
    runs = {"storage_path": str(tmp_path / "runs")}
    with pytest.raises(ConfigError, match=r"ema_decay: is 0.999 but the checkpoint of run 'unit' \(step 2\) was "
                                          r"written with 0.0: an EMA cannot be switched on or off on resume"):
        preflight(train_cfg(dataset, ema_decay=0.999, checkpoint=runs))
    assert preflight(train_cfg(dataset, ema_decay=0.0, checkpoint=runs)).resume_step == 2


# ------------------------------------------------------------------------------------------ DeepSpeed glue
def test_ds_config_and_schedules():
    ds = build_ds_config(DeepSpeedConfig(zero_stage=3, grad_clip=0.5), micro_batch=4, grad_accum=2, world_size=2,
                         on_gpu=False)
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] is False  # auto -> fp32 on CPU
    assert build_ds_config(DeepSpeedConfig(), micro_batch=1, grad_accum=1, world_size=1, on_gpu=True)["bf16"] == {
        "enabled": True, "check_grad_overflow": True}  # DeepSpeed's default, kept unless the recipe turns it off
    assert build_ds_config(DeepSpeedConfig(check_grad_overflow=False), micro_batch=1, grad_accum=1, world_size=1,
                           on_gpu=True)["bf16"]["check_grad_overflow"] is False
    assert "optimizer" not in ds  # always the client torch AdamW (no JIT-compiled DeepSpeed Adam)
    const = lr_lambda("constant", 4, 100)
    assert [const(s) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]
    cos = lr_lambda("cosine", 2, 12, min_lr_ratio=0.1)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0) and cos(12) == pytest.approx(0.1)
    assert cos(7) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda("linear", 0, 10)


def test_fused_adam_choice_and_same_steps_as_foreach():
    import torch

    from infra.deepspeed import build_optimizer

    def groups(seed: int):
        torch.manual_seed(seed)
        w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
        return [{"params": [w], "lr": 1e-2, "weight_decay": 0.1}, {"params": [b], "lr": 5e-2, "weight_decay": 0.0}]

    def fused(ds, device):
        return build_optimizer(groups(0), ds, device).defaults["fused"]

    assert fused(DeepSpeedConfig(), "cuda") is True  # auto: fused where the optimizer steps on CUDA
    assert fused(DeepSpeedConfig(), "cpu") is None  # torch's default (foreach / for-loop)
    assert fused(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), "cuda") is None  # states live on the CPU
    assert fused(DeepSpeedConfig(fused_adam="off"), "cuda") is None
    assert fused(DeepSpeedConfig(fused_adam="on"), "cpu") is True
    with pytest.raises(ConfigError, match="fused_adam"):
        from_dict(DeepSpeedConfig, {"fused_adam": "yes"})
    # the fused kernel takes each group's lr / weight decay and gives the same update (here its CPU kernel)
    opts = [build_optimizer(groups(0), DeepSpeedConfig(fused_adam=m), "cpu") for m in ("on", "off")]
    for step in range(3):
        for opt in opts:
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = torch.sin(p.detach() * (step + 1))
            opt.step()
    for ga, gb in zip(opts[0].param_groups, opts[1].param_groups):
        torch.testing.assert_close(ga["params"][0], gb["params"][0])


# ------------------------------------------------------------------------------------------ data reader
def test_local_reader_partitions_and_resumes(dataset):
    from workers.shard_io import DatasetManifest
    from workers.train_data import LocalShardReader

    uris = DatasetManifest.load(dataset).shard_uris("train")
    readers = [LocalShardReader(uris, micro_batch=4, rank=r, world=2, seed=3, shuffle=True, with_mask=False)
               for r in range(2)]
    assert readers[0].per_epoch == 8  # 64 rows / (4 * 2)
    epoch0 = [readers[r].batch(c)[0] for c in range(8) for r in range(2)]
    rows = {tuple(x.tolist()) for b in epoch0 for x in b}
    assert len(rows) == len({tuple(r) for r in readers[0].x.tolist()})  # every row once per epoch, ranks disjoint
    # a fresh reader (a restored worker) returns the same batch for the same cursor; epoch 2 is reshuffled
    again = LocalShardReader(uris, micro_batch=4, rank=1, world=2, seed=3, shuffle=True, with_mask=False)
    assert np.array_equal(again.batch(13)[0].numpy(), readers[1].batch(13)[0].numpy())
    assert not np.array_equal(readers[0].batch(8)[0].numpy(), readers[0].batch(0)[0].numpy())


# ------------------------------------------------------------------------------------------ model wrappers
def _debug_model(seed=0):
    import torch

    from models import ModelConfig, build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig.from_flavor("debug", vocab_size=259, mask_token_id=257, n_layers=2))


def test_dora_adapters_train_only_what_they_should_and_merge_into_a_core_checkpoint(tmp_path):
    import torch

    from models import load_pretrained, save_pretrained
    from workers.train_adapters import apply_adapters, core_state_dict

    model = apply_adapters(_debug_model(), freeze_backbone=True, lora_r=4, lora_alpha=8, use_dora=True,
                           targets=["qkv"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("sm_head.") for n in trainable)
    for n, p in model.named_parameters():  # as if trained: move every adapter off its identity init
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    x = torch.randint(0, 256, (2, 16))
    x[:, ::3] = 257
    with torch.no_grad():
        expected = model(x)
    sd = core_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    save_pretrained(_debug_model(), tmp_path / "merged", state_dict=sd)
    with torch.no_grad():
        got = load_pretrained(tmp_path / "merged")(x)
    assert torch.allclose(got, expected, atol=1e-4)


def test_activation_checkpointing_and_scalar_promotion_keep_the_math():
    import torch

    from infra.deepspeed import apply_activation_checkpointing, match_shapes, promote_scalar_params
    from models.objective import ObjectiveConfig, training_loss

    x0 = torch.randint(0, 256, (2, 32))
    obj = ObjectiveConfig(kind="sm", p_sm=1.0)
    grads = []
    for wrap in (False, True):
        model = _debug_model()
        if wrap:
            assert promote_scalar_params(model) == ["sm_head.raw_scale", "sm_head.raw_centre", "sm_head.raw_steepness"]
            assert apply_activation_checkpointing(model) == 2
        loss, _ = training_loss(model, x0, obj, seed=1, step=0, two_pass=True)
        loss.backward()
        grads.append({n: p.grad.reshape(-1).clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name
    fresh = _debug_model()
    restored = match_shapes(model.state_dict(), fresh.state_dict())
    fresh.load_state_dict(restored)  # (1,)-shaped scalars go back into the core's 0-dim parameters


def test_resume_point_is_the_checkpoint_ray_registered(tmp_path):
    """A checkpoint folder written but not yet registered by Ray Train (other ranks still uploading, or the run
    stopped in between) is not the resume point: preflight must name the step Ray restores."""
    import json

    from workers.checkpointing import RAY_SNAPSHOT, latest_train_state, registered_checkpoint

    run = tmp_path / "run"
    for step in (4, 8):
        d = run / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        (d / "train_state.json").write_text(json.dumps({"step": step}))
    assert registered_checkpoint(str(run)) is None and latest_train_state(str(run))["step"] == 8  # no Ray record
    snap = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000004", "metrics": {"step": 4}}}
    (run / RAY_SNAPSHOT).write_text(json.dumps(snap))
    assert latest_train_state(str(run))["step"] == 4  # step 8's folder exists but Ray never registered it
    (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": None}))
    assert latest_train_state(str(run)) is None  # Ray registered none: a fresh start
    (run / RAY_SNAPSHOT).write_text("{not json")
    assert latest_train_state(str(run))["step"] == 8  # unreadable record: fall back to the folders
