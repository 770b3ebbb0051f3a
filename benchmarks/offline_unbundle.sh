#!/usr/bin/env bash
# GPU-host side of benchmarks/offline_bundle.py (offline installation): run once per copied folder, in the repository
# root on the GPU host.
#   bash benchmarks/offline_unbundle.sh .xfer1      # copies that folder's parts to $BUNDLE (default /tmp/bundle)
# When every part named in MANIFEST.json is present it joins them, checks each part's and the whole stream's sha256,
# unpacks to $BUNDLE/root and installs $BUNDLE/root/wheels/*.whl into $BUNDLE/site (no index, no dependencies).
# Then: export PYTHONPATH=$BUNDLE/site:$PWD SOFTMASK_CACHE=$BUNDLE/root/cache (the gpu_*.sh scripts do this).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: offline_unbundle.sh .xferN}
BUNDLE=${BUNDLE:-/tmp/bundle}
PY=${PYTHON:-python3}
mkdir -p "$BUNDLE/parts"
cp "$SRC"/*.part* "$BUNDLE/parts/"
exec "$PY" - "$BUNDLE" "$SRC/MANIFEST.json" <<'PYEOF'
import hashlib, json, subprocess, sys, tarfile
from pathlib import Path

bundle = Path(sys.argv[1])
parts_dir = bundle / "parts"
m = json.loads(Path(sys.argv[2]).read_text())  # this folder's bundle (several bundles may share $BUNDLE)
have = [p for p in m["parts"] if (parts_dir / p["name"]).is_file()]
print(f"bundle {m['name']}: {len(have)}/{len(m['parts'])} parts present", flush=True)
if len(have) < len(m["parts"]):
    sys.exit(0)
whole = hashlib.sha256()
tar_path = bundle / f"{m['name']}.tar"
with open(tar_path, "wb") as out:
    for p in m["parts"]:
        data = (parts_dir / p["name"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != p["sha256"]:
            sys.exit(f"part {p['name']} is corrupt (sha256 mismatch)")
        whole.update(data)
        out.write(data)
if whole.hexdigest() != m["tar_sha256"]:
    sys.exit("joined bundle sha256 mismatch")
root = bundle / "root"
with tarfile.open(tar_path) as tar:
    tar.extractall(root, filter="data")
tar_path.unlink()
wheels = sorted(str(w) for w in (root / "wheels").glob("*.whl"))
if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-cache-dir", "--target", str(bundle / "site"), *wheels], check=True)
print(f"bundle {m['name']}: unpacked to {root}; {len(wheels)} wheels installed in {bundle / 'site'}", flush=True)
PYEOF
