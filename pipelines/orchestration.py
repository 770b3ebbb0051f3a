"""Prefect 3 around the workflow: the flow, cron schedules and the UI (Prefect orchestrates, Ray computes).

Prefect settings are applied before Prefect is imported: a longer ephemeral-server start-up timeout (the 20 s default
was seen to be missed on a loaded 2-core machine), no analytics, and PREFECT_HOME inside the project unless set.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def prefect_env() -> None:
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


def run_with_prefect(cfg, forced: set[str]):
    """Run the workflow as a Prefect flow in this process (embedded temporary API server unless PREFECT_API_URL)."""
    prefect_env()
    from prefect import flow

    from pipelines.workflow import _prefect_task, execute

    @flow(name=cfg.name, log_prints=True, validate_parameters=False)
    def softmask_workflow():
        return execute(cfg, forced, _prefect_task)

    return softmask_workflow()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` on 127.0.0.1 in its own process group (UI + scheduler), stopped by us."""

    def __init__(self, port: int = 0):
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 180.0) -> "PrefectServer":
        prefect_env()
        exe = Path(sys.executable).with_name("prefect")
        self.proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"prefect server did not answer on {self.api_url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def register_schedule(cfg, cron: str, name: str, api_url: str):
    """Register a deployment with a cron schedule on the Prefect server at ``api_url``; returns (flow, deployment)."""
    os.environ["PREFECT_API_URL"] = api_url
    from infra.config import to_dict

    prefect_env()
    from pipelines.scheduled import softmask_scheduled

    deployment = softmask_scheduled.to_deployment(name=name, cron=cron, parameters={"config": to_dict(cfg)})
    return softmask_scheduled, deployment
