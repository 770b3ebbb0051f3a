"""A real 2-node Ray cluster on loopback (head 127.0.0.2 + worker 127.0.0.3, token auth on as Ray 2.60 ships it):
the workflow's preprocess + train stages run from the CLI against it and the training workers land on both nodes."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from infra.cluster import LocalRayCluster, _group_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ACTOR_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(":")[0], log_to_driver=False)
from ray._private.state import actors
print(json.dumps([[a["ActorClassName"], a["Address"]["IPAddress"]] for a in actors().values()]))
"""


def test_train_stage_spreads_over_two_nodes(tmp_path):
    cluster = LocalRayCluster(num_cpus=1, temp_dir=None)
    cluster.start()
    try:
        cluster.add_worker(num_cpus=1, resources={"second_node": 1})
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"}
        # 2 workers x 0.75 CPU cannot share a 1-CPU node: Ray must place one on each node
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--config", "configs/debug_cpu.yaml",
               f"--run-root={tmp_path}", "--stages=[preprocess, train]", "--use-prefect=false",
               "--train.scaling.cpus_per_worker=0.75"]
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
        assert "train" in r.stdout and "ran" in r.stdout
        q = subprocess.run([sys.executable, "-c", ACTOR_NODES, cluster.address], env=env, capture_output=True,
                           text=True, timeout=120)
        rows = json.loads(q.stdout.strip().splitlines()[-1])
        train_ips = {ip for cls, ip in rows if "TrainWorker" in cls}
        assert train_ips == {"127.0.0.2", "127.0.0.3"}, rows
        # this cluster runs a dashboard (the state API): Ray Train's placement-group cleaner is kept here
        assert any(cls == "PlacementGroupCleaner" for cls, _ in rows), rows
    finally:
        groups = [n["pgid"] for n in cluster.nodes]
        t0 = time.monotonic()
        cluster.stop()
        took = time.monotonic() - t0
    assert not subprocess.run(["pgrep", "-f", f"--port={cluster.port}"], capture_output=True).stdout
    assert [p.pid for g in groups for p in _group_processes(g)] == []  # both nodes, every process of theirs
    # raylets first while the GCS answers: a prompt stop (one SIGTERM to everything made each raylet wait ~10 s for
    # a GCS that was shutting down too, and `ray start --block` never exits on SIGTERM)
    assert took < 9, took  # the old stop always waited its whole 10 s grace
