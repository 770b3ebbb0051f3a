"""An HF backbone (tiny random-init Qwen2) through the same stages as our own model, on real Ray / DeepSpeed / Serve.

AR checkpoint (the layout `softmask hf-import` writes) -> preprocess real Python source with its tokenizer ->
AR->diffusion adaptation (binary objective, shifted logits, ZeRO-3, 2 workers) -> SM fine-tune (k=1, DoRA r=4 on
q/k/v/o, ZeRO-3, 2 workers) -> the merged export served by Ray Serve -> one HTTP completion.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from test_train_ray import make_cfg, records, train_losses

pytestmark = pytest.mark.slow

TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False}
SOURCES = ["textwrap.py", "string.py", "shlex.py"]  # real code from this interpreter's standard library


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory) -> Path:
    """A random-init causal LM saved as a softmask HF checkpoint + its BPE tokenizer (trained on real code)."""
    import torch

    import models
    from models.hf_loading import from_config_dict
    from models.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_bpe([str(stdlib / s) for s in SOURCES], 512)
    torch.manual_seed(0)
    model = from_config_dict(dict(TINY_QWEN2, vocab_size=tok.vocab_size), mask_token_id=tok.mask_id)
    out = tmp_path_factory.mktemp("hf") / "ar"
    models.save_pretrained(model, out, metadata={"objective": "ar"})
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def code_dataset(ray_session, ar_checkpoint, tmp_path_factory) -> str:
    from pipelines.preprocess import PreprocessConfig, run

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("hf-data") / "ds"
    run(PreprocessConfig(sources=[str(stdlib / s) for s in SOURCES], output=str(out), seq_len=64,
                         tokenizer=str(ar_checkpoint / "tokenizer.json"), validation_fraction=0.2,
                         text_document="paragraph", progress=False, num_workers=2))
    return str(out)


def test_hf_adapt_zero3_then_sm_dora_then_serve(ray_session, ar_checkpoint, code_dataset, tmp_path):
    import torch

    import models
    from models.hf_backbone import HFDiffusionLM
    from pipelines.serve import ServeStageConfig, run as serve, shutdown
    from pipelines.train import run

    # 1. AR -> diffusion adaptation: binary objective, ZeRO-3 over 2 workers
    adapt = run(make_cfg(code_dataset, str(tmp_path / "runs"), "hf-adapt", mode="continue", steps=6,
                         init_checkpoint=str(ar_checkpoint), model={"backbone": "hf"},
                         objective={"kind": "binary", "k": 1}, deepspeed={"zero_stage": 3},
                         optim={"lr": 5e-3}, ema_decay=0.0))
    losses = train_losses(records(adapt.output_uri))
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    exported = json.loads(Path(adapt.export_uri, "config.json").read_text())
    assert exported["backbone"] == "hf" and exported["metadata"]["objective"] == "binary"
    adapted = models.load_pretrained(adapt.export_uri)
    assert isinstance(adapted, HFDiffusionLM) and adapted.config.shift_logits
    ar = models.load_pretrained(ar_checkpoint)
    moved = [n for n, p in adapted.state_dict().items() if not torch.equal(p, ar.state_dict()[n])]
    assert any("layers.0.self_attn.q_proj" in n for n in moved)  # the backbone was trained

    # 2. SM fine-tune from the adapted model: k=1, DoRA on q/k/v/o (backbone frozen), SM head trainable, ZeRO-3
    sm = run(make_cfg(code_dataset, str(tmp_path / "runs"), "hf-sm", mode="continue", steps=4,
                      init_checkpoint=adapt.export_uri, model={"backbone": "hf"},
                      objective={"kind": "sm", "p_sm": 1.0, "k": 1}, deepspeed={"zero_stage": 3},
                      finetune={"lora_r": 4, "use_dora": True}, ema_decay=0.0))
    recs = [r for r in records(sm.output_uri) if r["kind"] == "train"]
    assert all("omega_s" in r and "lambda_mean" in r for r in recs)
    tuned = models.load_pretrained(sm.export_uri)
    sd = tuned.state_dict()
    assert not any("lora_" in n for n in sd)  # adapters merged into the export
    base = adapted.state_dict()
    changed = {n for n, p in sd.items() if n in base and not torch.equal(p, base[n])}
    assert any(n.endswith("q_proj.weight") for n in changed)  # DoRA deltas merged
    assert not any("mlp" in n for n in changed)  # untargeted linears stay frozen
    # k=1 head in the export; its readable ω values beside the weights (ω_s barely moves in 4 steps from 1e-6)
    head = json.loads(Path(sm.export_uri, "softmask_head.json").read_text())
    assert tuned.sm_head.k == 1 and set(head) == {"omega_s", "omega_a", "omega_b"}

    # 3. the Serve stage deploys the HF-backed export and answers over HTTP
    shutil.copy(ar_checkpoint / "tokenizer.json", Path(sm.export_uri) / "tokenizer.json")
    res = serve(ServeStageConfig(checkpoint=sm.export_uri, model_name="hf-tiny", app_name="hf-test", port=0,
                                 min_replicas=1, max_replicas=1, num_cpus=0.25, ingress_num_cpus=0.05,
                                 default_steps=8, default_max_tokens=12, torch_threads=1))
    try:
        body = json.dumps({"prompt": "def wrap(text, width):", "max_tokens": 12, "steps": 6, "seed": 1}).encode()
        req = urllib.request.Request(f"{res.url.rstrip('/')}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert r.status == 200 and reply["model"] == "hf-tiny"
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 12
    finally:
        shutdown(res)
