"""CPU dry run of configs/continue_mdlm_owt_sm.yaml and its binary twin through the real training stage.

A randomly initialised DiT with the fixture's dimensions, written in MDLM's hub layout (byte vocabulary + [MASK] as
the last row, as MDLM appends it), goes through `softmask mdlm-import`; each recipe, loaded by the CLI's own config
builder with CPU-sized overrides only (2 gloo workers, 3 steps, micro-batch 2, local storage, no GPU), runs
pipelines.train.run: real Ray Train + DeepSpeed (bf16 as the recipes say; ZeRO-2 for the SM recipe, ZeRO-3 for the
binary twin so that the dit backbone's partitioned build is exercised too), the Ray Data loader, EMA export; the
export loads as a dit model and samples.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import cli
from test_train_config import write_dataset
from test_train_ray import records, train_losses

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BYTES_MASK_LAST = {"spec": "bytes", "sha256": "", "vocab_size": 258, "eos_id": 256, "mask_id": 257, "pad_id": 256}


def hub_checkpoint(out: Path) -> Path:
    """A random MDLM DiT (test flavor dims, vocab 258) in the kuleshov-group/mdlm-owt layout."""
    from models.dit import DiTConfig, build
    from models.dit_loading import INV_FREQ, PREFIX, mdlm_key_map

    cfg = DiTConfig.from_flavor("test", vocab_size=258, max_seq_len=64)
    torch.manual_seed(0)
    sd = build(cfg).backbone.state_dict()
    tensors = {PREFIX + theirs: (sd[ours] + 0.05 * torch.randn(sd[ours].shape)).contiguous()
               for theirs, ours in mdlm_key_map(cfg.n_layers)}  # adaLN / output not zero: a non-trivial network
    tensors[PREFIX + INV_FREQ] = 1.0 / 10000 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "mdlm", "vocab_size": 258, "model_length": 64, "hidden_dim": cfg.d_model,
        "cond_dim": cfg.cond_dim, "n_blocks": cfg.n_layers, "n_heads": cfg.n_heads, "dropout": 0.1,
        "time_conditioning": False}))
    return out


@pytest.mark.long  # the GPU recipes' toy run (two Ray Train runs, ~45 s): `make test-all`; the DiT itself is in test_dit.py
def test_continue_recipes_dry_run_on_cpu(ray_session, tmp_path):
    import models
    from models.dit import DiTBackbone
    from models.sampling import SamplerConfig, sample
    from pipelines.mdlm_import import MDLMImportConfig, run as mdlm_import
    from pipelines.train import run as train

    imported = mdlm_import(MDLMImportConfig(source=str(hub_checkpoint(tmp_path / "hub")),
                                            output=str(tmp_path / "mdlm"), tokenizer="none")).output
    data = write_dataset(str(tmp_path / "ds"), seq_len=64, tokenizer=BYTES_MASK_LAST)
    cpu = ["--train.init_checkpoint=" + imported, "--train.data.manifest=" + data, "--train.steps=3",
           "--train.micro_batch=2", "--train.global_batch=4", "--train.eval_every=3", "--train.log_every=1",
           "--train.scaling.num_workers=2", "--train.scaling.cpus_per_worker=0.5", "--train.scaling.use_gpu=false",
           "--train.checkpoint.storage_path=" + str(tmp_path / "runs"), "--train.checkpoint.every=3",
           "--train.data.val_batches=1", "--train.checkpoint.max_failures=0"]
    for name, extra in (("sm", []), ("binary", ["--train.deepspeed.zero_stage=3"])):
        recipe = ROOT / "configs" / f"continue_mdlm_owt_{name}.yaml"
        cfg = cli.build_config(cli.COMMANDS["run"], str(recipe), cpu + extra, {}).train
        assert cfg.model.backbone == "dit" and cfg.deepspeed.precision == "bf16" and cfg.mode == "continue"
        res = train(cfg, progress=False)
        recs = records(res.output_uri)
        losses = train_losses(recs)
        assert sorted(losses) == [1, 2, 3] and all(l == l and l < 20 for l in losses.values()), losses
        assert any(r["kind"] == "val" and r["val_ppl"] > 1 for r in recs)
        export = models.load_pretrained(res.export_uri)
        assert isinstance(export.backbone, DiTBackbone) and export.config.vocab_size == 258
        meta = export.checkpoint_metadata
        assert meta["objective"] == name and meta["weights"] == "ema" and meta["step"] == 3
        if name == "sm":  # the SM head trains with its own lr (1e-2 vs 3e-4, same warmup); ω logged every step
            steps = [r for r in recs if r["kind"] == "train"]
            assert all("omega_s" in r and r["sm_lr"] / r["lr"] == pytest.approx(1e-2 / 3e-4) for r in steps)
            assert 0 < steps[-1]["lr"] <= 3e-4 * 4 / 2500 * 1.001  # still warming up (2,500 steps)
        out = sample(export, SamplerConfig(steps=8, algorithm="ancestral", soft_mask=name == "sm"), num_samples=2,
                     length=32, seed=0)
        assert tuple(out.tokens.shape) == (2, 32) and not (out.tokens == 257).any()
