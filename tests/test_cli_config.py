"""CLI generation, config precedence, validation errors, and every shipped recipe validates."""
import pathlib

import pytest
import yaml

from infra.config import ConfigError, field_docs, from_dict, load_config
from pipelines import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

# recipe file -> the command whose config validates it (a new recipe must be added here)
RECIPES = {
    "demo_cpu.yaml": "run", "debug_cpu.yaml": "run", "finetune_deploy.yaml": "run",
    "preprocess_shakespeare.yaml": "preprocess", "train_debug.yaml": "train", "continue_sm.yaml": "train",
    "finetune_sft.yaml": "train", "finetune_dream7b_sm.yaml": "train", "pretrain_owt_small.yaml": "run",
    "adapt_smollm2_cpu.yaml": "train", "finetune_qwen_coder_sm.yaml": "train",
    "preprocess_code_qwen.yaml": "preprocess",
    "continue_mdlm_owt_sm.yaml": "run", "continue_mdlm_owt_binary.yaml": "run",
    "serve_debug.yaml": "serve",
    "experiment_micro.yaml": "experiment", "sm_vs_binary.yaml": "experiment",
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    assert path.name in RECIPES, f"{path.name}: add it to RECIPES so that it is validated"
    cmd = cli.COMMANDS[RECIPES[path.name]]
    cfg = cli.build_config(cmd, str(path), [], {})
    assert cfg is not None


def test_every_field_is_documented():
    for name in ("run", "preprocess", "train", "serve", "eval"):
        docs = field_docs(cli._resolve(cli.COMMANDS[name].config))
        missing = [k for k, v in docs.items() if not v.strip()]
        assert not missing, f"{name}: undocumented fields {missing}"


def test_precedence_defaults_yaml_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"preprocess": {"sources": ["corpus://shakespeare"]},
                                      "train": {"steps": 7, "micro_batch": 2, "global_batch": 8,
                                                "data": {"manifest": "/tmp/ds"}}}))
    cmd = cli.COMMANDS["run"]
    cfg = cli.build_config(cmd, str(recipe), ["--train.steps=9"], {"run_root": "/tmp/x"})
    assert cfg.train.steps == 9 and cfg.train.micro_batch == 2 and cfg.run_root == "/tmp/x"
    assert cfg.train.optim.lr == 3e-4  # dataclass default
    # a stage command reads its own section of a workflow recipe, and strips the section prefix of overrides
    tcfg = cli.build_config(cli.COMMANDS["train"], str(recipe), ["--train.micro_batch=4"], {})
    assert tcfg.steps == 7 and tcfg.micro_batch == 4


def test_unknown_keys_and_bad_values_name_the_field(tmp_path):
    recipe = str(ROOT / "configs" / "debug_cpu.yaml")
    with pytest.raises(ConfigError, match="train.stepz"):
        cli.build_config(cli.COMMANDS["run"], recipe, ["--train.stepz=3"], {})
    with pytest.raises(ConfigError, match="train.steps"):
        cli.build_config(cli.COMMANDS["run"], recipe, ["--train.steps=abc"], {})
    with pytest.raises(ConfigError, match="stages"):
        cli.build_config(cli.COMMANDS["run"], recipe, ["--stages=[train]"], {})
    with pytest.raises(ConfigError, match="global_batch"):
        cli.build_config(cli.COMMANDS["run"], recipe, ["--train.global_batch=7"], {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(dict, tmp_path / "missing.yaml")


def test_main_exit_codes_and_help(capsys):
    assert cli.main([]) == 0
    assert "preprocess" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert cli.main(["run", "--train.stepz=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--objective.p_sm=VALUE" in out and "--steps" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", "configs/debug_cpu.yaml", "--preprocess.sources=[{path: /nonexistent/*.txt}]"],
     "error: preprocess.sources[0] '/nonexistent/*.txt': no input files match"),
    (["run", "--config", "configs/demo_cpu.yaml", "--tokenizer.sources=[/nonexistent/*.txt]"],
     "error: tokenizer.sources[0]: '/nonexistent/*.txt' matches no file"),
    (["run", "--config", "configs/finetune_deploy.yaml", "--train.init_checkpoint=/nonexistent/export"],
     "error: train.init_checkpoint: no config.json in /nonexistent/export"),
    (["preprocess", "--config", "configs/preprocess_shakespeare.yaml", "--sources=[{path: /nonexistent/a.txt}]"],
     "error: sources[0] '/nonexistent/a.txt': no such file or directory"),
    (["train", "--config", "configs/train_debug.yaml", "--data.manifest=/nonexistent/manifest.json"],
     "error: data.manifest: not found: /nonexistent/manifest.json"),
    (["eval", "--checkpoint", "/nonexistent/export", "--manifest", "/nonexistent/data"],
     "error: checkpoint: not a softmask checkpoint (no config.json): /nonexistent/export"),
    (["serve", "--checkpoint", "/nonexistent/export"],
     "error: checkpoint: /nonexistent/export is not a checkpoint directory (no config.json)"),
    (["run", "--config", "configs/debug_cpu.yaml", "--force", "train", "--force", "trian"],
     "error: force: unknown stage(s) ['trian']; stages are ['preprocess', 'train', 'evaluate', 'deploy']"),
], ids=["run-source", "run-tokenizer-source", "run-init-checkpoint", "preprocess-source", "train-manifest", "eval-checkpoint",
        "serve-checkpoint", "run-force-unknown-stage"])
def test_stage_input_errors_are_one_line_before_anything_starts(monkeypatch, capsys, argv, message):
    """A bad input that only a stage can see (a file, a checkpoint) ends the real entry point with exit 2 and one
    line naming the field, without a traceback and before a Ray cluster, Ray or a Prefect server starts."""
    monkeypatch.chdir(ROOT)
    _fails_cleanly(monkeypatch, capsys, argv, message)


def _fails_cleanly(monkeypatch, capsys, argv: list[str], message: str, within_s: float = 30.0) -> None:
    """`softmask ARGV` (the real entry point, in this process) exits 2 within seconds with one stderr line holding
    ``message``, no traceback, and started nothing: no Ray, no child process (Prefect server, Ray cluster)."""
    import time

    import psutil
    import ray

    monkeypatch.delenv("SOFTMASK_TRACEBACK", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    was_initialized = ray.is_initialized()
    t0 = time.monotonic()
    assert cli.main(argv) == 2
    took = time.monotonic() - t0
    out = capsys.readouterr()
    assert out.err.startswith(f"softmask {argv[0]}: ") and message in out.err, out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    assert ray.is_initialized() == was_initialized
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert took < within_s, took  # the replica used to fail three times, then a 20-line traceback after a minute


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A debug checkpoint + its tokenizer, and broken variants of it (each one defect)."""
    import shutil

    import torch

    import models
    from models.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("ckpts")
    tok = train_bpe(["To be, or not to be, that is the question."] * 8, 300)

    def write(name: str, mask_id: int) -> pathlib.Path:
        torch.manual_seed(0)
        model = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=tok.vocab_size,
                                                                  mask_token_id=mask_id))
        models.save_pretrained(model, root / name)
        tok.save(root / name)
        return root / name

    good = write("good", tok.mask_id)
    write("other-mask", tok.pad_id)
    shutil.copytree(good, root / "no-tokenizer")
    (root / "no-tokenizer" / "tokenizer.json").unlink()
    shutil.copytree(good, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root


def _listening() -> "socket.socket":
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("case, message", [
    ("no-tokenizer", "error: tokenizer: {root}/no-tokenizer has no tokenizer.json; set the `tokenizer` field"),
    ("vocab", "error: tokenizer: gpt2 has 50258 tokens, more than the model's vocab_size"),
    ("mask", "error: tokenizer: the [MASK] id of {root}/other-mask/tokenizer.json is 1, the model's mask_token_id "
             "is 2"),
    ("weights", "error: checkpoint: {root}/truncated/model.safetensors is not a readable safetensors file"),
    ("port", "error: port: 127.0.0.1:{port} is not free"),
    ("run-port", "error: serve.port: 127.0.0.1:{port} is not free"),
])
def test_serve_preflight_one_line_before_anything_starts(monkeypatch, capsys, checkpoints, tmp_path, case, message):
    """`softmask serve` (and the deploy stage of `softmask run`) check the checkpoint, its tokenizer against the
    model (vocabulary size, [MASK] id) and the HTTP port before Ray or Serve starts."""
    busy = _listening()
    port = busy.getsockname()[1]
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    argv = {
        "no-tokenizer": ["serve", "--checkpoint", f"{checkpoints}/no-tokenizer"],
        "vocab": ["serve", "--checkpoint", f"{checkpoints}/good", "--tokenizer", "gpt2"],
        "mask": ["serve", "--checkpoint", f"{checkpoints}/other-mask"],
        "weights": ["serve", "--checkpoint", f"{checkpoints}/truncated"],
        "port": ["serve", "--checkpoint", f"{checkpoints}/good", "--port", str(port)],
        "run-port": ["run", "--config", str(ROOT / "configs/debug_cpu.yaml"), f"--run-root={tmp_path}/run",
                     f"--tokenizer.sources=[{text}]", f"--preprocess.sources=[{{path: {text}}}]",
                     f"--serve.port={port}"],
    }[case]
    try:
        _fails_cleanly(monkeypatch, capsys, argv, message.format(root=checkpoints, port=port))
    finally:
        busy.close()


def test_bare_on_off_reach_literal_fields_as_words(tmp_path):
    """YAML 1.1 reads a bare on/off as a boolean: a Literal["auto", "on", "off"] field takes it as the word, from a
    recipe and from --key=value alike; a boolean where no word fits is still an error naming the field."""
    from pipelines.evaluate import EvalConfig

    recipe = tmp_path / "eval.yaml"
    recipe.write_text("checkpoint: c\nmanifest: m\nuse_ray: off\nsoft_mask: on\n")
    cfg = cli.build_config(cli.COMMANDS["eval"], str(recipe), ["--two_pass=off"], {})
    assert (cfg.use_ray, cfg.soft_mask, cfg.two_pass) == ("off", "on", "off")
    assert cli.build_config(cli.COMMANDS["eval"], str(recipe), [], {"use_ray": "on"}).use_ray == "on"
    with pytest.raises(ConfigError, match="algorithm"):
        from_dict(EvalConfig, {"checkpoint": "c", "manifest": "m", "algorithm": True})
