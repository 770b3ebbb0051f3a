"""Prefect 3 around the workflow: the flow, cron schedules and the UI (Prefect orchestrates, Ray computes).

Prefect settings are applied before Prefect is imported: a longer ephemeral-server start-up timeout (the 20 s default
was seen to be missed on a loaded 2-core machine), no analytics, and PREFECT_HOME inside the project unless set.

Servers that the CLI starts (`PrefectServer`) run in their own session, so a terminal Ctrl-C (SIGINT to the whole
foreground process group) reaches only the CLI, which then records the interrupted run on a server that is still up
and stops the server itself. Prefect's own temporary server is a plain child process: a Ctrl-C killed it first and
the flow engine then retried reporting the crash against a dead API for a minute and more.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from infra.net import free_port

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def prefect_env() -> None:
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


@contextlib.contextmanager
def prefect_api(api_url: str | None):
    """Point this process (and the processes it starts) at ``api_url``. Prefect reads its settings when it is
    imported, so a later environment change alone would not reach an already-imported Prefect."""
    if not api_url:
        yield
        return
    os.environ["PREFECT_API_URL"] = api_url
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def drain_prefect(timeout: float = 10.0) -> None:
    """Flush Prefect's background log/event senders while the API is still up (else they retry at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort: losing a log line must not fail the command
        pass


class _RunLogsOffConsole(logging.Filter):
    """Flow- and task-run records (a failed stage's traceback among them) stay off the console: Prefect's API handler
    still records them for the run history (`softmask ui`), and the CLI prints one line per failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


def quiet_run_logs() -> None:
    """Put _RunLogsOffConsole on Prefect's console handler(s) (once Prefect has configured logging)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _RunLogsOffConsole) for f in handler.filters):
            handler.addFilter(_RunLogsOffConsole())


def prefect_task(stage: str, fn, key_fn, refresh: bool):
    """A stage function as a Prefect task whose cache key is the stage's input key (``key_fn()``): a completed stage
    replays its stored JSON record; ``refresh`` recomputes it."""
    from prefect import task

    return task(fn, name=stage, cache_key_fn=lambda ctx, params: f"softmask-{stage}-{key_fn()}",
                persist_result=True, result_serializer="json", refresh_cache=refresh, retries=0)


def run_with_prefect(name: str, body):
    """``body(prefect_task)`` inside a Prefect flow called ``name``, in this process: on the server at
    PREFECT_API_URL when set (`softmask run` starts one of its own), else on Prefect's temporary local server. The
    caller's ``body`` wraps each stage with the task factory it is given; this module knows no stages."""
    prefect_env()
    with prefect_api(os.environ.get("PREFECT_API_URL")):
        from prefect import flow

        quiet_run_logs()

        @flow(name=name, log_prints=True, validate_parameters=False)
        def softmask_workflow():
            return body(prefect_task)

        try:
            return softmask_workflow()
        finally:
            drain_prefect()


# Exec a command with PR_SET_PDEATHSIG=SIGTERM (Linux): it is stopped even if the process that started it dies without
# stopping it (SIGKILL, a crash). A launcher instead of preexec_fn, which is unsafe in a process with threads.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
                    "except Exception:\n    pass\n"
                    "os.execv(sys.argv[1], sys.argv[1:])\n")


class PrefectServer:
    """`prefect server start` on 127.0.0.1 in its own session (API, UI unless ``ui=False``, and the scheduler
    services unless ``services=False``), stopped by us; it also dies with the process that started it."""

    def __init__(self, port: int = 0, ui: bool = True, services: bool = True):
        self.port = port or free_port()
        self.ui = ui
        self.services = services
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except (OSError, TypeError):
            return ""

    def start(self, timeout: float = 180.0) -> "PrefectServer":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "PrefectServer":
        """Start the process and return at once (``wait_ready`` waits for its API): other start-up work can overlap."""
        prefect_env()
        exe = Path(sys.executable).with_name("prefect")
        args = [sys.executable, "-c", _DIE_WITH_PARENT, str(exe), "server", "start", "--host", "127.0.0.1",
                "--port", str(self.port)]
        args += [] if self.ui else ["--no-ui"]
        args += [] if self.services else ["--no-services"]
        fd, self.log_path = tempfile.mkstemp(prefix=f"softmask-prefect-{self.port}-", suffix=".log")
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            os.close(fd)
        return self

    def wait_ready(self, timeout: float = 180.0) -> "PrefectServer":
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prefect server exited with {self.proc.returncode}; port {self.port} taken? "
                                       f"log {self.log_path}:\n{self._log_tail()}")
                try:
                    with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    time.sleep(0.5)
            raise TimeoutError(f"prefect server did not answer on {self.api_url} within {timeout:.0f}s "
                               f"(log {self.log_path})")
        except BaseException:  # a timeout, a failure, or Ctrl-C while it starts: never leave it behind
            self.stop(keep_log=True)
            raise

    def stop(self, grace: float = 10.0, keep_log: bool = False) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.proc.returncode is not None and self.log_path and not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cron_schedule(cron: str, timezone: str):
    """Validate a cron string and an IANA timezone the way Prefect will; returns the schedule or raises ValueError
    with a one-line reason (before any server or cluster is started)."""
    prefect_env()
    import pydantic
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{err['loc'][0] if err.get('loc') else 'schedule'}: "
                         f"{str(err['msg']).removeprefix('Value error, ')}") from None


def register_schedule(flow, cfg, cron: str, name: str, timezone: str = "UTC"):
    """The deployment of the scheduled workflow ``flow`` (pipelines.scheduled.softmask_scheduled) on a cron schedule
    in ``timezone``; `prefect.serve` registers it on the current Prefect API and runs its flow runs. Returns
    (flow, deployment)."""
    from infra.config import to_dict

    prefect_env()
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    cron_schedule(cron, timezone)
    deployment = flow.to_deployment(
        name=name, schedules=[Cron(cron, timezone=timezone)], parameters={"config": to_dict(cfg)},
        entrypoint_type=EntrypointType.MODULE_PATH,  # pipelines.scheduled.softmask_scheduled: any working directory
        description=f"softmask workflow {cfg.name!r} on cron {cron!r} ({timezone}); run root {cfg.run_root}",
        tags=["softmask"])
    return flow, deployment



def serve_deployment(deployment, grace_s: float = 20.0) -> bool:
    """Run a Prefect runner for ``deployment`` (what ``prefect.serve`` does) until SIGINT/SIGTERM, then stop it the
    way ``prefect.serve`` does (cancel the runner: it pauses the schedule on its way out), waiting at most ``grace_s``
    for that. Returns True when the runner stopped within it. False means a runner task would not finish (e.g. a
    thread still reading a finished run's output): the schedule was then paused here through the API and the event
    loop is left as it is, so the caller should end the process once it has stopped what it started."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True)
    deployment_id = runner.add_deployment(deployment)  # registers it and returns its id
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the runner's start() takes SIGTERM over: TerminationSignal below
        loop.add_signal_handler(sig, stop.set)
    served = loop.create_task(runner.start())
    stopping = loop.create_task(stop.wait())
    try:
        loop.run_until_complete(asyncio.wait({served, stopping}, return_when=asyncio.FIRST_COMPLETED))
    except (KeyboardInterrupt, TerminationSignal):
        pass
    stopping.cancel()
    if not served.done():
        served.cancel()
        loop.run_until_complete(asyncio.wait({served}, timeout=grace_s))
    if not served.done():
        with get_client(sync_client=True) as client:
            client.pause_deployment(deployment_id)
        return False
    loop.run_until_complete(asyncio.sleep(0))  # let `stopping`'s cancellation land
    loop.close()
    if not served.cancelled() and served.exception() is not None:
        raise served.exception()
    return True
