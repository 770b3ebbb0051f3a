"""A long-lived local Ray cluster on 127.0.0.1 that we start and stop ourselves (never `ray stop`, which kills every
Ray on the host): a head node plus optional worker nodes, each in its own process group.

Token authentication (on by default in Ray 2.60): with ``auth="token"`` the nodes start with RAY_AUTH_MODE=token and
the token in ~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), which the CLI, the drivers and
`ray job submit` present too. `ray start` never creates that token (only a local ``ray.init()`` does), so on a fresh
host :func:`ensure_auth_token` creates it first, the way Ray documents: ``ray get-auth-token --generate``.
See docs/cluster.md.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import psutil

from infra.net import free_port
from infra.ray_runtime import LOOPBACK_NODE_IP


def _group_processes(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of one process group."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass  # gone meanwhile
    return out


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_raylet(p: psutil.Process) -> bool:
    return Path((_cmdline(p) or [""])[0]).name == "raylet"


def _is_ray_start(p: psutil.Process) -> bool:
    cmd = _cmdline(p)
    return len(cmd) > 2 and Path(cmd[1]).name == "ray" and cmd[2] == "start"


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def auth_token_source(env: dict) -> str | None:
    """Where Ray's clients and nodes started with ``env`` read the cluster token from; None when there is none."""
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".ray",
                                                          "auth_token")
    return path if os.path.isfile(path) and os.path.getsize(path) > 0 else None


def ensure_auth_token(env: dict) -> str:
    """Create the token a token-auth cluster needs when none exists yet (``ray get-auth-token --generate`` writes
    ~/.ray/auth_token of ``env``'s HOME); returns where the token lives. The token itself is never printed."""
    found = auth_token_source(env)
    if found:
        return found
    if env.get("RAY_AUTH_TOKEN_PATH"):
        raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']} names no token file; create it (or "
                           f"unset the variable and a token is generated in ~/.ray/auth_token)")
    r = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    found = auth_token_source(env)
    if r.returncode != 0 or not found:
        raise RuntimeError(f"`ray get-auth-token --generate` could not create a token (exit {r.returncode}): "
                           f"{r.stderr.strip()[-500:]}")
    return found


@dataclass
class LocalRayCluster:
    """``ray start --head`` (+ workers) bound to 127.0.0.1. ``address`` is valid after start()."""

    num_cpus: int = 2
    port: int = 0
    env: dict = dc_field(default_factory=dict)
    temp_dir: str | None = None
    auth: str = "token"  # Ray 2.60's default: every client must present ~/.ray/auth_token ("disabled" opts out)
    nodes: list = dc_field(default_factory=list)  # Popen-less records: {"pgid": int, "role": str}
    address: str | None = None
    dashboard_url: str | None = None  # http://host:port of the head's dashboard (Ray Jobs, state API); after start()
    # NOTE: 127.0.0.2, not 127.0.0.1: Ray rewrites "127.0.0.1"/"localhost" addresses to the host's routable IP before
    # connecting; another loopback address is left alone, so every byte stays on loopback. Worker nodes get
    # 127.0.0.3, 127.0.0.4, ... (distinct node IPs, as on a real cluster).
    host: str = LOOPBACK_NODE_IP

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update({"RAY_USAGE_STATS_ENABLED": "0"}, **self.env)
        env["RAY_AUTH_MODE"] = self.auth
        return env

    @staticmethod
    def _node_ports(ip: str) -> list[str]:
        """Loopback only, and free ports instead of Ray's fixed defaults so clusters on one host never collide."""
        return [f"--node-ip-address={ip}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def _launch(self, args: list[str], role: str) -> None:
        log = Path(self.temp_dir or tempfile.gettempdir()) / f"softmask-ray-{role}-{os.getpid()}-{len(self.nodes)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([_ray_bin(), "start", *args, "--block"], stdout=fh, stderr=subprocess.STDOUT,
                                    env=self._env(), start_new_session=True)
        self.nodes.append({"pgid": proc.pid, "role": role, "log": str(log), "proc": proc})

    def start(self, timeout: float = 90.0) -> str:
        self.port = self.port or free_port()
        if self.auth == "token":
            ensure_auth_token(self._env())  # before `ray start`, which refuses to start without one
        # the dashboard (loopback only) also serves the state API that Ray Train's monitors query, and Ray Jobs
        dashboard_port = free_port()
        args = ["--head", f"--port={self.port}", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
                f"--dashboard-host={self.host}", f"--ray-client-server-port={free_port()}",
                f"--dashboard-port={dashboard_port}",
                *self._node_ports(self.host)]
        if self.temp_dir:
            args.append(f"--temp-dir={self.temp_dir}")
        self._launch(args, "head")
        self.address = f"{self.host}:{self.port}"
        self.dashboard_url = f"http://{self.host}:{dashboard_port}"
        self._wait_ready(timeout)
        # NOTE: drivers must have RAY_AUTH_MODE=token set *before* importing ray (the `softmask` CLI does); setting it
        # here would only reach child processes (a local Ray started later would then reject this process).
        return self.address

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None, timeout: float = 90.0) -> None:
        if not self.address:
            raise RuntimeError("start the head first")
        worker_ip = f"127.0.0.{3 + sum(n['role'] == 'worker' for n in self.nodes)}"
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", *self._node_ports(worker_ip)]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        before = self.alive_nodes()
        self._launch(args, "worker")
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            started = self._started(self.nodes[-1])  # then ask the GCS (a driver process) until it lists the node
            if started and self.alive_nodes() > before:
                return
            time.sleep(1.0 if started else 0.2)
        raise TimeoutError(f"worker node did not join {self.address} within {timeout:.0f}s ({self.nodes[-1]['log']})")

    def _check_alive(self) -> None:
        for n in self.nodes:
            if n["proc"].poll() is not None:
                raise RuntimeError(f"ray {n['role']} exited with {n['proc'].returncode}; log: "
                                   f"{Path(n['log']).read_text()[-2000:]}")

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (`ray status`-free: a short-lived driver-less query)."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(':')[0], "
                "log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                             env=self._env(), timeout=60)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _started(self, node: dict) -> bool:
        """`ray start` has logged that its node is up (cheaper than a driver asking the GCS)."""
        try:
            return b"Ray runtime started." in Path(node["log"]).read_bytes()
        except OSError:
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            if self._started(self.nodes[-1]):
                with socket.socket() as s:
                    s.settimeout(1.0)
                    if s.connect_ex((self.host, self.port)) == 0:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"Ray head did not come up on {self.address} within {timeout:.0f}s")

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node we started, in the order that lets each part exit at once.

        Every raylet gets SIGTERM first, worker nodes before the head, while the head's GCS still answers: a raylet
        drains and exits in ~0.1 s then, but waits ~10 s for a GCS that is itself shutting down (what one SIGTERM to
        the whole group does). Then SIGTERM to each node's process group (GCS, dashboard, agents, leftover workers),
        a short wait, and SIGKILL for what is left: `ray start --block` itself never exits on SIGTERM.
        """
        deadline = time.time() + grace
        raylets = [p for n in reversed(self.nodes) for p in _group_processes(n["pgid"]) if _is_raylet(p)]
        for p in raylets:
            _signal(p, signal.SIGTERM)
        psutil.wait_procs(raylets, timeout=max(0.1, deadline - time.time()))
        for n in reversed(self.nodes):
            _killpg(n["pgid"], signal.SIGTERM)
        settle = time.time() + min(2.0, max(0.1, deadline - time.time()))
        for n in reversed(self.nodes):
            while time.time() < settle and any(not _is_ray_start(p) for p in _group_processes(n["pgid"])):
                time.sleep(0.05)
            _killpg(n["pgid"], signal.SIGKILL)
            try:
                n["proc"].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.nodes.clear()

    def __enter__(self) -> "LocalRayCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
