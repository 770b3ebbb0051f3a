"""Checkpoint round trip and the models/ import boundary."""
import ast
import json
import pathlib

import pytest
import torch

import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_round_trip_identical_logits(tmp_path):
    torch.manual_seed(1)
    model = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=300, softmask_k=2)).eval()
    with torch.no_grad():
        model.sm_head.raw_scale.fill_(1.5)
    out = models.save_pretrained(model, tmp_path / "ckpt", metadata={"note": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "softmask_head.json"]
    loaded = models.load_pretrained(out)
    x = torch.randint(0, 299, (2, 20))
    x[:, ::2] = model.mask_id
    torch.testing.assert_close(loaded(x, two_pass=True), model(x, two_pass=True), atol=0, rtol=0)
    assert loaded.config == model.config and loaded.checkpoint_metadata == {"note": "x"}
    assert abs(json.loads((out / "softmask_head.json").read_text())["omega_s"] - model.sm_head.omega_s.item()) < 1e-6
    # overwrite is atomic and leaves no temp dirs behind
    models.save_pretrained(model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_checkpoint_files_are_readable_by_others(tmp_path):
    out = models.save_pretrained(models.build_model(models.ModelConfig.from_flavor("debug")), tmp_path / "ck")
    for f in out.iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f"{f.name} is not group/other-readable"


def test_load_rejects_mismatch_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(tmp_path)
    model = models.build_model(models.ModelConfig.from_flavor("debug"))
    out = models.save_pretrained(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["n_layers"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        models.load_pretrained(out)


def _imports(folder):
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                yield path, [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield path, [node.module]


@pytest.mark.parametrize("folder,forbidden", [
    ("models", ("ray", "deepspeed", "prefect", "torch.distributed", "workers", "pipelines", "infra")),
    ("infra", ("models", "workers", "pipelines")),
    ("workers", ("pipelines",)),
])
def test_import_boundaries(folder, forbidden):
    bad = [(str(p.relative_to(ROOT)), n) for p, names in _imports(folder) for n in names
           if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{folder}/ must not import {forbidden}: {bad}"
    if folder == "models":
        text = "\n".join(p.read_text() for p in (ROOT / "models").rglob("*.py"))
        assert "torch.distributed" not in text
