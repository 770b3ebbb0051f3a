"""CLI contract of the serving stage: serve_forever in a subprocess starts its own Ray (on a loopback node address),
serves, and on SIGINT shuts everything it started down and exits 0 with no orphaned processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra.net import free_port
from test_serve_app import post, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_cli_contract_sigint_exits_zero_without_orphans(tmp_path):
    import psutil

    checkpoint = write_checkpoint(tmp_path / "debug-ckpt")
    port = free_port()
    code = ("import sys; from infra.config import load_config; from pipelines.serve import ServeStageConfig, "
            "serve_forever; sys.exit(serve_forever(load_config(ServeStageConfig, sys.argv[1], sys.argv[2:])))")
    overrides = [f"checkpoint={checkpoint}", f"port={port}", "ray_num_cpus=2", "num_cpus=0.5", "max_replicas=1",
                 "torch_threads=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the contract: a Ray of its own
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "configs" / "serve_debug.yaml"), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "curl" in line:  # printed after the URL line, once the app answers /healthz
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    children = []
    try:
        assert ready.wait(150), "".join(lines[-40:])
        url = f"http://127.0.0.1:{port}"
        assert any(f"{url}/v1/completions" in line and "curl" in line for line in lines)
        status, out, _ = post(f"{url}/v1/completions", {"prompt": "To be", "max_tokens": 8, "steps": 4})
        assert status == 200 and out["model"] == "softmask-debug"
        children = _descendants(proc.pid)
        raylets = [" ".join(c.cmdline()) for c in children if c.is_running() and "raylet" in " ".join(c.cmdline())]
        assert raylets
        # the Ray it started binds loopback, not the host's routable interface
        assert all("--node_ip_address=127.0.0.2" in cmd for cmd in raylets), raylets
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=20)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [(p.pid, p.name()) for p in alive]
    for p in alive:  # never leave strays behind, even when the assertion below fails
        p.kill()
    assert not names, f"orphaned processes after SIGINT: {names}"
