"""Test support: the real `softmask` CLI in a subprocess (its own session, like a foreground terminal job), its
output read line by line, its process tree tracked, and real HTTP to the servers it starts."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra.net import free_port  # noqa: F401  (test_schedule_ui imports it from here)

ROOT = Path(__file__).resolve().parents[1]


def cli_env(prefect_home: Path, **extra: str) -> dict:
    """The environment of a user's shell: no Ray/Prefect endpoints or auth mode chosen by the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PREFECT_API_URL") and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PREFECT_HOME"] = str(prefect_home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Cli:
    """`python -m pipelines.cli ARGS` with its output collected; ``wait_for`` a line, ``interrupt`` like Ctrl-C."""

    def __init__(self, args: list[str], env: dict, cwd: Path):
        self.args = args
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._cv = threading.Condition()
        self.seen_pids: dict[int, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def output(self, last: int | None = None) -> str:
        return "\n".join(self.lines[-last:] if last else self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """First output line matching ``pattern``; fails with the tail of the output on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = 0
        with self._cv:
            while True:
                for line in self.lines[i:]:
                    m = rx.search(line)
                    if m:
                        return m
                i = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i == len(self.lines)):
                    self.track()
                    raise AssertionError(f"no line matching {pattern!r} after {time.monotonic() - self.t0:.0f}s "
                                         f"(rc={self.proc.poll()}):\n{self.output(60)}")
                self._cv.wait(min(left, 1.0))
                self.track()

    def track(self) -> None:
        """Remember every process below the CLI (to check later that none outlives it)."""
        import psutil

        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.seen_pids[p.pid] = " ".join(p.cmdline())[:160]  # the latest (after an exec)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def interrupt(self, whole_group: bool = True) -> float:
        """Ctrl-C: SIGINT to the foreground process group (the CLI and the children that share its group)."""
        self.track()
        t = time.monotonic()
        if whole_group:
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGINT)
        return t

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track()
            try:
                return self.proc.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        else:
            raise AssertionError(f"`softmask {' '.join(self.args[:1])}` still running after {timeout:.0f}s:\n"
                                 f"{self.output(40)}")

    def survivors(self, grace: float = 15.0) -> list[str]:
        """Processes started below the CLI that are still alive (zombies do not count) after ``grace`` seconds;
        they are killed so that a failing test leaves nothing behind."""
        import psutil

        procs = []
        for pid in self.seen_pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        left = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {self.seen_pids[p.pid]}")
                    p.kill()
            except psutil.Error:
                pass
        return left

    def kill(self) -> None:
        """Last resort in a test's finally: the CLI's group and everything it started."""
        self.track()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.survivors(grace=0)


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 30.0, retries: int = 5):
    """One JSON request; a 503 (the Prefect server answers that while its SQLite database is busy, as it is on a
    loaded machine) is retried a few times."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == retries:
                raise
            time.sleep(1.0 + attempt)


def http_text(url: str, timeout: float = 30.0) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0
