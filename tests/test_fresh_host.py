"""A host that never ran Ray: HOME (and so ~/.ray) is an empty folder. The local cluster must create the token that
Ray 2.60's token authentication needs before `ray start` (which refuses to start without one), and a driver and a
Ray Job must then run real work on it with that token; a client without the token must be turned away."""
import os
import subprocess
import sys

from infra.cluster import LocalRayCluster, _group_processes, _ray_bin

TASK = """
import sys, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(":")[0], log_to_driver=False)
@ray.remote
def square(x):
    return x * x
print("result", sum(ray.get([square.remote(i) for i in range(10)])))
"""


def test_cluster_starts_on_a_host_without_ray_state(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(var, None)
    cluster = LocalRayCluster(num_cpus=1, env={"HOME": str(home)})
    cluster.start()  # used to fail: AuthenticationError, no token found
    try:
        token = home / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_size > 0
        r = subprocess.run([sys.executable, "-c", TASK, cluster.address], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "result 285" in r.stdout, r.stderr[-3000:]
        job = subprocess.run([_ray_bin(), "job", "submit", "--address", cluster.dashboard_url, "--",
                              sys.executable, "-c", "print('job ran', 6 * 7)"], env=env, capture_output=True,
                             text=True, timeout=180)
        assert job.returncode == 0 and "job ran 42" in job.stdout, (job.stdout[-2000:], job.stderr[-2000:])
        stranger = tmp_path / "stranger"  # another HOME: no token, so token auth must refuse this driver
        stranger.mkdir()
        r = subprocess.run([sys.executable, "-c", TASK, cluster.address], env={**env, "HOME": str(stranger)},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "result" not in r.stdout
        assert "token" in r.stderr.lower(), r.stderr[-2000:]
    finally:
        groups = [n["pgid"] for n in cluster.nodes]
        cluster.stop()
    assert [p.pid for g in groups for p in _group_processes(g)] == []
