"""Offline installation (benchmarks/offline_bundle.py + offline_unbundle.sh): a payload cut into size-bounded folders
comes back byte for byte, and a corrupt part is refused."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bundle_module():
    spec = importlib.util.spec_from_file_location("offline_bundle", REPO / "benchmarks" / "offline_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _unbundle(folder: Path, bundle: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUNDLE": str(bundle), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "offline_unbundle.sh"), str(folder)], env=env,
                          capture_output=True, text=True, timeout=120)


def _payload(root: Path) -> dict[str, bytes]:
    files = {"models/weights.bin": os.urandom(2_500_000), "cache/corpora/a/text.txt": b"to be or not to be\n" * 999}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_parts_fit_the_size_limit_and_rejoin_exactly(tmp_path):
    mod = _bundle_module()
    stage, out, bundle = tmp_path / "stage", tmp_path / "repo", tmp_path / "gpu-host"
    stage.mkdir()
    out.mkdir()
    files = _payload(stage)
    manifest = mod.bundle(stage, out, "demo", part_bytes=1 << 20, reserve_bytes=100_000)
    folders = sorted(out.glob(".xfer*"), key=lambda p: int(p.name[5:]))
    assert len(folders) == len(manifest["parts"]) >= 3
    for folder in folders:  # one folder: its part(s) and the manifest, under the limit minus the repository's reserve
        assert sum(f.stat().st_size for f in folder.iterdir() if f.name != "MANIFEST.json") <= (1 << 20) - 100_000
    for i, folder in enumerate(folders):
        r = _unbundle(folder, bundle)
        assert r.returncode == 0, r.stderr
        assert f"{i + 1}/{len(folders)} parts present" in r.stdout
    assert "unpacked" in r.stdout
    for rel, data in files.items():
        assert (bundle / "root" / rel).read_bytes() == data


def test_corrupt_part_is_refused(tmp_path):
    mod = _bundle_module()
    stage, out, bundle = tmp_path / "stage", tmp_path / "repo", tmp_path / "gpu-host"
    stage.mkdir()
    out.mkdir()
    _payload(stage)
    mod.bundle(stage, out, "demo", part_bytes=2 << 20, reserve_bytes=0)
    folders = sorted(out.glob(".xfer*"), key=lambda p: int(p.name[5:]))
    part = next(folders[0].glob("*.part*"))
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    results = [_unbundle(f, bundle) for f in folders]
    assert results[-1].returncode != 0 and "corrupt" in results[-1].stderr
    assert not (bundle / "root").exists()


def test_part_size_must_leave_room_for_the_tree(tmp_path):
    mod = _bundle_module()
    (tmp_path / "stage").mkdir()
    with pytest.raises(ValueError, match="part-mib"):
        mod.bundle(tmp_path / "stage", tmp_path, "demo", part_bytes=1000, reserve_bytes=2000)


def test_two_bundles_share_the_host_folder(tmp_path):
    """A second bundle built with start past the first keeps the first's folders; interleaved calls unpack both."""
    mod = _bundle_module()
    out, host = tmp_path / "repo", tmp_path / "gpu-host"
    out.mkdir()
    stages = {}
    for name in ("one", "two"):
        stages[name] = tmp_path / name
        stages[name].mkdir()
        (stages[name] / f"{name}.bin").write_bytes(os.urandom(1_500_000))
    first = mod.bundle(stages["one"], out, "one", part_bytes=1 << 20, reserve_bytes=0)
    n_first = len(first["parts"])
    mod.bundle(stages["two"], out, "two", part_bytes=1 << 20, reserve_bytes=0, start=n_first + 1)
    folders = sorted(out.glob(".xfer*"), key=lambda p: int(p.name[5:]))
    assert len(folders) == n_first + 2
    order = [folders[0], folders[n_first], folders[n_first + 1]] + folders[1:n_first]  # interleaved
    for folder in order:
        r = _unbundle(folder, host)
        assert r.returncode == 0, r.stderr
    for name in ("one", "two"):
        assert (host / "root" / f"{name}.bin").read_bytes() == (stages[name] / f"{name}.bin").read_bytes()
