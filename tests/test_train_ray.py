"""Training stage end to end: real Ray Train (2 CPU workers, gloo), real DeepSpeed ZeRO-0/2/3, real S3 (SeaweedFS).

Runs (each a TorchTrainer fit; they share the session's Ray):
- ZeRO-3 SM pretraining with one worker SIGKILLed mid-run: restores the latest checkpoint, finishes, redone steps
  replay the killed attempt's losses exactly; loss falls; the EMA export loads and samples.
- binary pretraining (1 worker, ZeRO-0, Ray Data loader) -> its export initialises:
  - continue (binary -> SM, ZeRO-2, checkpoints on S3): stopped at step 3, resumed by run name to step 6;
  - finetune on SFT data, frozen backbone + DoRA on qkv: prompt tokens are never masked; only the SM head and the
    (merged) adapted weights change.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from test_train_config import train_cfg, write_dataset

pytestmark = pytest.mark.slow


def make_cfg(manifest: str, storage: str, name: str, **over):
    return train_cfg(manifest, {"run_name": name, "steps": 6, "eval_every": 3, "ema_decay": 0.9,
                                "data": {"val_batches": 1}, "optim": {"lr": 3e-3},
                                "checkpoint": {"storage_path": storage, "every": 2, "keep_last": 2},
                                "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}, **over)


def records(output_uri: str) -> list[dict]:
    """Every metrics line of a run (restored attempts included), read from local disk or S3."""
    from infra.storage import filesystem

    fs, path = filesystem(f"{output_uri.rstrip('/')}/metrics.jsonl")
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def train_losses(recs, attempt=None) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train" and attempt in (None, r["attempt"])}


def check_export_samples(export_dir) -> dict:
    """The export loads with the core loader and samples tokens (no [MASK] left)."""
    from models import load_pretrained
    from models.sampling import SamplerConfig, sample

    model = load_pretrained(export_dir)
    out = sample(model, SamplerConfig(steps=8, algorithm="ancestral", soft_mask=True), num_samples=2, length=32,
                 seed=0)
    assert tuple(out.tokens.shape) == (2, 32)
    assert not (out.tokens == model.config.mask_token_id).any()
    return model.checkpoint_metadata


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {"pretrain": write_dataset(str(root / "pretrain")), "sft": write_dataset(str(root / "sft"), sft=True)}


def test_trainer_leaves_out_the_placement_group_cleaner_only_without_a_dashboard(ray_session, datasets, tmp_path):
    """The session's Ray has no dashboard, so Ray Train's PlacementGroupCleaner could never query the controller and
    each fit would end waiting 12 s for it: our trainer leaves that one callback out, and keeps every other."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from infra.ray_runtime import state_api_available
    from pipelines.train import build_trainer
    from workers.train_config import preflight

    assert not state_api_available()
    cfg = make_cfg(datasets["pretrain"], str(tmp_path / "runs"), "callbacks")
    trainer = build_trainer(cfg, preflight(cfg))
    ours = [type(cb) for cb in trainer._create_default_callbacks()]
    ray_default = [type(cb) for cb in super(type(trainer), trainer)._create_default_callbacks()]
    assert PlacementGroupCleanerCallback in ray_default and PlacementGroupCleanerCallback not in ours
    assert ours == [cb for cb in ray_default if cb is not PlacementGroupCleanerCallback]
    assert type(trainer).__name__ == "TorchTrainer"


def test_zero3_sm_survives_worker_kill_and_replays_exactly(ray_session, datasets, tmp_path):
    from pipelines.train import run

    cfg = make_cfg(datasets["pretrain"], str(tmp_path / "runs"), "z3-fault", steps=16, eval_every=4,
                   deepspeed={"zero_stage": 3}, checkpoint={"max_failures": 2, "every": 4})
    N, every = cfg.steps, cfg.checkpoint.every
    metrics_file = Path(cfg.resolved_output_dir) / "metrics.jsonl"
    killed: dict = {}

    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every ~2 s, which can
    # be several fast steps later); a kill before that loses it. Kill rank 1 once a checkpoint is *registered* (Ray's
    # own snapshot file) and training has moved past it; the restart then redoes at most the steps since that
    # registered checkpoint. 16 steps leave room for a registration that lags several fast steps.
    snapshot = Path(cfg.storage_run_uri) / "checkpoint_manager_snapshot.json"

    def kill_rank1_after_a_registered_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            time.sleep(0.05)
            try:
                registered = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
                recs = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            done = max(r["step"] for r in recs if r["kind"] == "train")
            if registered < done < N:
                killed.update(pid=[r for r in recs if r["kind"] == "setup"][-1]["pids"][1], after_step=done,
                              registered=registered)
                os.kill(killed["pid"], signal.SIGKILL)
        # keep the EMA of the checkpoint the restarted attempt restores (keep_last deletes it later): its setup
        # record names the step, and that checkpoint stays the latest until the attempt's next save
        while time.time() < deadline:
            time.sleep(0.05)
            try:
                setup = [json.loads(x) for x in metrics_file.read_text().splitlines() if '"setup"' in x][1]
                ema_file = Path(cfg.storage_run_uri) / f"checkpoint_{setup['step']:08d}" / "ema.safetensors"
                killed["restored_ema"] = ema_file.read_bytes()
                return
            except (OSError, ValueError, IndexError):
                continue

    watcher = threading.Thread(target=kill_rank1_after_a_registered_checkpoint, daemon=True)
    watcher.start()
    result = run(cfg)
    watcher.join(30)
    assert killed, "the worker was never killed"
    assert result.metrics["step"] == N
    recs = records(result.output_uri)
    setups = [r for r in recs if r["kind"] == "setup"]
    assert [s["attempt"] for s in setups] == [0, 1] and killed["pid"] not in setups[1]["pids"]
    restored_at = setups[1]["step"]  # the checkpoint the second attempt started from
    before, after = train_losses(recs, attempt=0), train_losses(recs, attempt=1)
    assert restored_at % every == 0 and killed["registered"] <= restored_at < killed["after_step"]
    redone = sorted(set(before) & set(after))
    assert min(after) == restored_at + 1 and max(after) == N
    assert len(redone) <= killed["after_step"] - killed["registered"]  # only steps after the registered checkpoint
    for s in redone:  # resume determinism: the replayed steps give the killed attempt's losses
        assert after[s] == pytest.approx(before[s], rel=1e-5, abs=1e-6)
    # the restarted attempt continues the checkpoint's EMA (not a fresh average of the restored weights)
    from safetensors.torch import load

    from models.ema import checksum

    assert setups[1]["ema_checksum"] == pytest.approx(checksum(load(killed["restored_ema"])), rel=1e-9)
    assert setups[1]["ema_checksum"] != pytest.approx(setups[0]["ema_checksum"], rel=1e-3)  # the fresh one differs
    losses = train_losses(recs)
    assert losses[N] < losses[1] - 0.5 and (losses[N - 1] + losses[N]) / 2 < (losses[1] + losses[2]) / 2 - 0.5
    vals = {r["step"]: r for r in recs if r["kind"] == "val"}
    assert vals[N]["val_ppl"] < vals[4]["val_ppl"] and "val_ppl_two_pass" in vals[N]
    sm_rows = [r for r in recs if r["kind"] == "train"]
    assert all({"omega_s", "omega_a", "omega_b", "grad_norm", "lr", "sm_lr", "tokens_per_s"} <= set(r)
               for r in sm_rows)
    assert all("lambda_mean" in r for r in sm_rows if r["two_pass"] > 0)
    meta = check_export_samples(result.export_uri)
    assert meta["weights"] == "ema" and meta["objective"] == "sm" and meta["step"] == N
    assert Path(result.plot_uri).stat().st_size > 1000
    assert list((Path(result.output_uri) / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in Path(result.run_uri).glob("checkpoint_0*") if p.is_dir())
    assert ckpts == [f"checkpoint_{N - every:08d}", f"checkpoint_{N:08d}"]  # keep_last = 2
    assert len(list((Path(result.run_uri) / ckpts[-1] / "ds").glob("zero_pp_rank_*_model_states.pt"))) == 2


@pytest.fixture(scope="module")
def binary_run(ray_session, datasets, tmp_path_factory):
    """Binary MDLM pretraining: 1 worker, ZeRO-0, Ray Data streaming loader, blocks and loss compiled."""
    from pipelines.train import run

    cfg = make_cfg(datasets["pretrain"], str(tmp_path_factory.mktemp("bin") / "runs"), "binary", steps=8,
                   global_batch=4, eval_every=8, objective={"kind": "binary"}, data={"loader": "ray_data"},
                   model={"compile": True},
                   scaling={"num_workers": 1}, deepspeed={"zero_stage": 0}, checkpoint={"every": 8})
    return run(cfg)


def test_binary_pretrain_with_ray_data(binary_run):
    recs = records(binary_run.output_uri)
    losses = train_losses(recs)
    assert sorted(losses) == list(range(1, 9))
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2 - 0.5
    assert all(r["two_pass"] == 0.0 for r in recs if r["kind"] == "train")  # binary: never two-pass
    assert [r["compiled"] for r in recs if r["kind"] == "setup"] == [True]  # model.compile reached the worker
    assert all(0 < r["grad_norm"] < 1e4 for r in recs if r["kind"] == "train")  # ZeRO-0 too reports its norm
    assert [r for r in recs if r["kind"] == "val"][-1].keys() >= {"val_ppl"}
    assert check_export_samples(binary_run.export_uri)["objective"] == "binary"


def test_continue_binary_to_sm_on_s3_stop_and_resume(binary_run, datasets, s3_server, capsys):
    from models import load_pretrained
    from pipelines.train import run
    from workers.checkpointing import download_dir, list_checkpoints

    s3_server.create_bucket("train-ckpt")
    common = dict(mode="continue", init_checkpoint=binary_run.export_uri, deepspeed={"zero_stage": 2},
                  objective={"kind": "sm"}, eval_every=0)
    first = run(make_cfg(datasets["pretrain"], "s3://train-ckpt/runs", "continue-sm", steps=3, **common))
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in printed if line.startswith("train step")] == \
        [["train", "step", f"{k}/3"] for k in (1, 2, 3)], printed  # progress from the S3 metrics file
    second = run(make_cfg(datasets["pretrain"], "s3://train-ckpt/runs", "continue-sm", steps=6, **common))
    printed = capsys.readouterr().out.splitlines()
    assert "train restored (attempt 1) at step 3: 2 workers" in "\n".join(printed), printed
    assert [line.split()[2] for line in printed if line.startswith("train step")] == ["4/6", "5/6", "6/6"], printed
    assert first.metrics["step"] == 3 and second.resumed_from_step == 3 and second.metrics["step"] == 6
    recs = records(second.output_uri)
    assert min(train_losses(recs, attempt=1)) == 4  # the second run went on from the step-3 checkpoint
    step1 = next(r for r in recs if r["kind"] == "train" and r["step"] == 1)
    assert step1["omega_s"] < 1e-5  # binary source: the SM head starts at its ω_s ≈ 0 init
    binary_first = train_losses(records(binary_run.output_uri))[1]
    assert step1["loss"] < binary_first - 0.5  # the backbone came from the trained binary checkpoint
    ckpts = list_checkpoints("s3://train-ckpt/runs/continue-sm")
    assert [s for s, _ in ckpts] == [4, 6] and ckpts[-1][1].startswith("s3://")
    with tempfile.TemporaryDirectory() as tmp:
        meta = check_export_samples(download_dir(second.export_uri, tmp))
        assert meta["objective"] == "sm" and meta["mode"] == "continue"
        exported = load_pretrained(tmp)
        head = json.loads(Path(tmp, "softmask_head.json").read_text())
        assert head["omega_s"] == pytest.approx(exported.sm_head.omega_s.item())
        # NOTE: from ω_s ≈ 1e-6 the head's gradients are ~1e-6 of the backbone's, so a few steps barely move it.


def test_finetune_sft_dora_masks_only_responses_with_frozen_backbone(binary_run, datasets, tmp_path):
    from models import load_pretrained
    from models.optim import is_sm_param
    from pipelines.train import run

    cfg = make_cfg(datasets["sft"], str(tmp_path / "runs"), "sft", mode="finetune",
                   init_checkpoint=binary_run.export_uri, steps=4, eval_every=4, objective={"kind": "sm", "p_sm": 1.0},
                   finetune={"freeze_backbone": True, "lora_r": 4, "use_dora": True, "lora_targets": ["qkv"]},
                   deepspeed={"zero_stage": 2}, checkpoint={"every": 4})
    result = run(cfg)
    recs = [r for r in records(result.output_uri) if r["kind"] == "train"]
    assert len(recs) == 4
    assert all(r["sft_prompt_masked"] == 0 for r in recs)  # prompt tokens never masked (never scored)
    assert all(r["sft_response_masked"] > 0 for r in recs)
    before = load_pretrained(binary_run.export_uri).state_dict()
    after = load_pretrained(result.export_uri)  # DoRA merged back: a plain core checkpoint
    assert after.checkpoint_metadata["adapters"]["kind"] == "dora"
    changed = {n for n, v in after.state_dict().items() if not (v == before[n]).all()}
    assert changed - {n for n in changed if is_sm_param(n)} == {f"backbone.blocks.{i}.attn.qkv.weight"
                                                              for i in range(after.config.n_layers)}
    assert all(r["sm_lr"] > 0 for r in recs)  # the SM head is in the optimizer; everything else stays frozen


def test_in_process_loop_and_ray_stage_give_the_same_loss_curve(ray_session, datasets, tmp_path):
    """The experiment's in-process backend (pipelines.train.run_local) is the stage's loop, not a copy: the same
    config and seed give the same 20 losses and ω as Ray Train (1 worker, ZeRO-0)."""
    from pipelines.train import run, run_local

    over = dict(steps=20, global_batch=4, eval_every=20, objective={"kind": "sm"}, scaling={"num_workers": 1},
                deepspeed={"zero_stage": 0}, checkpoint={"every": 10})
    staged = run(make_cfg(datasets["pretrain"], str(tmp_path / "stage"), "same-stage", **over))
    local = run_local(make_cfg(datasets["pretrain"], str(tmp_path / "local"), "same-local", **over))
    a, b = (records(r.output_uri) for r in (staged, local))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    assert max(abs(la[s] - lb[s]) for s in la) < 1e-5
    wa = [r["omega_s"] for r in a if r["kind"] == "train"]
    assert wa == pytest.approx([r["omega_s"] for r in b if r["kind"] == "train"], rel=1e-5)
    assert local.checkpoint_uri.endswith("checkpoint_00000020")
