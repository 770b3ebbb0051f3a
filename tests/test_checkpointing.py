"""workers.checkpointing without Ray Train: the readers' and loaders' error paths, and restore() with a real DeepSpeed
engine (CPU, gloo, one rank, in a subprocess so that this test process keeps no torch.distributed state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import models
from infra.config import ConfigError
from workers import checkpointing

REPO = Path(__file__).resolve().parents[1]


def _debug(**over):
    torch.manual_seed(0)
    return models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=64, **over))


def test_read_export_needs_a_config_with_a_model_section(tmp_path):
    with pytest.raises(ConfigError, match=r"init_checkpoint: no config.json in .*not a softmask export"):
        checkpointing.read_export(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1, "metadata": {}}))
    with pytest.raises(ConfigError, match=r"init_checkpoint: .*config.json has no 'model' section"):
        checkpointing.read_export(str(tmp_path))
    out = models.save_pretrained(_debug(), tmp_path / "export", metadata={"objective": "sm"})
    assert checkpointing.read_export(str(out))["metadata"] == {"objective": "sm"}


def test_checkpoint_folders_without_train_state_are_not_checkpoints(tmp_path):
    run = tmp_path / "run"
    for name, state in (("checkpoint_00000002", {"step": 2}), ("checkpoint_00000004", None),
                        ("checkpoint_latest", {"step": 99}), ("other_00000006", {"step": 6})):
        (run / name).mkdir(parents=True)
        if state is not None:
            (run / name / checkpointing.STATE_FILE).write_text(json.dumps(state))
    (run / "checkpoint_00000004" / checkpointing.EMA_FILE).write_bytes(b"partial upload")
    assert checkpointing.list_checkpoints(str(run)) == [(2, str(run / "checkpoint_00000002"))]
    assert checkpointing.latest_train_state(str(run)) == {"step": 2}  # not step 4: its folder is incomplete
    assert checkpointing.list_checkpoints(str(tmp_path / "no-such-run")) == []
    assert checkpointing.latest_train_state(str(tmp_path / "no-such-run")) is None


def test_init_from_export_loads_the_backbone_and_refuses_an_export_without_it(tmp_path):
    src = _debug()
    with torch.no_grad():
        src.sm_head.raw_scale.fill_(1.5)
    out = models.save_pretrained(src, tmp_path / "export", metadata={"objective": "sm"})
    fresh = _debug()
    with torch.no_grad():
        for p in fresh.backbone.parameters():
            p.zero_()
    assert checkpointing.init_from_export(fresh, str(out), keep_sm_head=False) == {"objective": "sm"}
    for (name, a), b in zip(fresh.backbone.state_dict().items(), src.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.sm_head.raw_scale.item() != pytest.approx(1.5)  # keep_sm_head=False: the fresh head stays
    checkpointing.init_from_export(fresh, str(out), keep_sm_head=True)
    assert fresh.sm_head.raw_scale.item() == pytest.approx(1.5)
    deeper = _debug(n_layers=src.config.n_layers + 1)  # an export that lacks this model's last block
    with pytest.raises(ValueError, match=rf"init_checkpoint {out} lacks backbone weights \['backbone\.blocks\.\d"):
        checkpointing.init_from_export(deeper, str(out), keep_sm_head=True)


# Runs in a subprocess: one gloo rank, a real DeepSpeed engine (ZeRO-2) over the debug model with an EMA; writes a
# checkpoint in the layout checkpointing.save gives Ray Train, restores it into a fresh engine, then removes parts.
RESTORE_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys, tempfile
    from pathlib import Path
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from ray.train import Checkpoint
    import models
    from infra.deepspeed import DeepSpeedConfig, build_ds_config, build_engine
    from models.ema import EMA, checksum
    from models.optim import param_groups
    from workers import checkpointing as ck

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
    ds = DeepSpeedConfig(zero_stage=2)

    def engine_and_ema(seed):
        torch.manual_seed(seed)
        model = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=64))
        cfg = build_ds_config(ds, micro_batch=2, grad_accum=1, world_size=1, on_gpu=False)
        engine = build_engine(model, param_groups(model, 1e-2, 0.0, 1e-2), cfg, ds)
        return engine, EMA(engine.module, 0.5)

    engine, ema = engine_and_ema(0)
    x = torch.randint(0, 63, (2, 16))
    for _ in range(2):
        engine.backward(engine(x).logsumexp(-1).mean())
        engine.step()
        ema.update(engine.module)
    d = Path(tempfile.mkdtemp())
    engine.save_checkpoint(str(d), tag=ck.DS_TAG)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(d / ck.EMA_FILE))
    (d / ck.STATE_FILE).write_text(json.dumps({"step": 2, "cursor": 2}))
    out = {"saved_ema": checksum(ema.state_dict())}

    engine2, ema2 = engine_and_ema(1)
    out["fresh_ema"] = checksum(ema2.state_dict())
    out["state"] = ck.restore(engine2, ema2, Checkpoint.from_directory(str(d)))
    out["restored_ema"] = checksum(ema2.state_dict())
    out["weights_equal"] = all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(),
                                                                  engine2.module.state_dict().values()))
    for part in (ck.EMA_FILE, ck.DS_TAG):
        shutil.move(str(d / part), str(d.parent / f"{d.name}-{part}"))
        try:
            ck.restore(engine2, ema2, Checkpoint.from_directory(str(d)))
            out[part] = "restored"
        except Exception as e:
            out[part] = f"{type(e).__name__}: {e}"
        shutil.move(str(d.parent / f"{d.name}-{part}"), str(d / part))
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.mark.slow
def test_restore_brings_back_engine_and_ema_and_refuses_incomplete_checkpoints():
    from infra.net import free_port

    port = str(free_port())
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    r = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, port], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["state"] == {"step": 2, "cursor": 2} and out["weights_equal"]
    assert out["restored_ema"] == pytest.approx(out["saved_ema"], rel=1e-12)
    assert out["fresh_ema"] != pytest.approx(out["saved_ema"], rel=1e-3)
    assert out[checkpointing.EMA_FILE].startswith("RuntimeError: checkpoint ") and \
        "has no ema.safetensors, but this run keeps an EMA" in out[checkpointing.EMA_FILE]
    assert out[checkpointing.DS_TAG].startswith("RuntimeError: DeepSpeed found no engine state under ")
