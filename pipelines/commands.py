"""Handlers of the `softmask` subcommands: ``handler(cfg, extras) -> exit code`` (cfg already typed and validated)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from infra.config import ConfigError, field, require


@dataclass
class StatusConfig:
    """What `softmask status` reads."""

    run_root: str = field("artifacts", "artifact root given to `softmask run` (local dir or s3://)")
    run_id: str | None = field(None, "a run id (default: the latest run)")


@dataclass
class UiConfig:
    """Where the Prefect UI listens."""

    port: int = field(4200, "port of the Prefect UI/API on 127.0.0.1")

    def __post_init__(self):
        require(0 < self.port < 65536, "port", f"must lie in (0, 65536), got {self.port}")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


class ShutdownGuard:
    """SIGINT/SIGTERM for commands that start servers and clusters: stop promptly, stop what was started.

    The first signal raises KeyboardInterrupt in the main thread (``install=False`` leaves the handlers alone, e.g.
    for asyncio's own). Signals are also read from a wakeup fd, so one that arrives while a library's handler is
    installed still counts: Ray Train's ``fit()`` installs a SIGINT handler that aborts the run with a blocking
    ``ray.get`` and then calls ``sys.exit(0)``, and leaves it installed for the rest of the process. From
    ``begin_shutdown()`` on, further signals do not interrupt the cleanup, and once a signal was seen a watchdog bounds
    the shutdown: after ``grace_s`` it kills every process group registered with ``kill_on_timeout`` and every
    descendant of this process, and exits 128 + signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace_s: float = 40.0, install: bool = True):
        self.grace_s = grace_s
        self.install = install
        self.signum: int | None = None
        self.stopping = False
        self._raised = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._groups: list[Callable[[], list[int]]] = []
        self.active = False

    def __enter__(self) -> "ShutdownGuard":
        self.active = threading.current_thread() is threading.main_thread()  # signals only reach the main thread
        if not self.active:
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {s: signal.getsignal(s) for s in self.SIGNALS}
        if self.install:
            self._install()
        threading.Thread(target=self._watch, name="softmask-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, h)
        os.close(self._w)  # the watcher sees EOF and ends
        if self.signum is None and self._timer:
            self._timer.cancel()
        # after a signal the watchdog stays armed through interpreter exit (atexit hooks of Ray/Prefect included)

    def kill_on_timeout(self, pgids: Callable[[], list[int]]) -> None:
        self._groups.append(pgids)

    def _install(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self._note(signum)
        if not self.stopping and not self._raised:
            self._raised = True
            raise KeyboardInterrupt
        os.write(2, f"softmask: stopping, please wait (at most {self.grace_s:.0f}s) ...\n".encode())

    def _note(self, signum: int) -> None:
        with self._lock:
            if self.signum is not None:
                return
            self.signum = signum
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                os.close(self._r)
                return
            for b in data:
                if b in self.SIGNALS:
                    self._note(b)

    def seen(self, wait_s: float = 1.0) -> int | None:
        """The signal that started the shutdown, if any (waits briefly for the watcher to read a pending one)."""
        deadline = time.monotonic() + wait_s
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.signum

    def begin_shutdown(self) -> None:
        """Cleanup starts: our handlers back (a library's may have replaced them), further signals only report."""
        self.stopping = True
        if self.active:
            self._install()

    def _expire(self) -> None:
        os.write(2, f"softmask: shutdown took longer than {self.grace_s:.0f}s; killing what it started\n".encode())
        for fn in self._groups:
            try:
                for pgid in fn():
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            except Exception:  # noqa: BLE001 - keep killing the rest
                pass
        try:
            import psutil

            for p in psutil.Process().children(recursive=True):
                try:
                    p.kill()
                except psutil.Error:
                    pass
        except Exception:  # noqa: BLE001
            pass
        os._exit(128 + (self.signum or signal.SIGINT))


def _stop_and_restore(cluster, server, env_before: dict) -> None:
    """Stop what a command started (local Ray cluster, Prefect server) and put back the environment it changed."""
    if cluster is not None:
        cluster.stop()
    if server is not None:
        server.stop()
    for k, v in env_before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

def cli_main(cfg, extras: dict) -> int:
    """`softmask run`: start (or join) a Ray cluster and a Prefect API server, run the workflow, print the reply, stop
    what we started. SIGINT/SIGTERM stop the flow (it is recorded as crashed), stop the cluster and the server, and
    exit 128+signal within ``ShutdownGuard.grace_s``; a rerun resumes (completed stages are skipped)."""
    import ray

    from infra.cluster import LocalRayCluster
    from infra.ray_runtime import RayConfig, apply_default_env, init_ray, session_log_dir
    from pipelines.orchestration import PrefectServer
    from pipelines.run_summary import print_summary
    from pipelines.serve import check_port
    from pipelines.workflow import forced_stages, preflight, run_workflow

    t0 = time.monotonic()
    apply_default_env()
    forced_stages(extras.get("force"))  # an unknown --force stage, a bad source or init_checkpoint fail here,
    preflight(cfg)                      # before a server or cluster starts
    starts_cluster = "deploy" in cfg.stages and not (cfg.deploy.address or os.environ.get("RAY_ADDRESS"))
    if starts_cluster:  # the deployment's HTTP port, on the cluster this command starts
        check_port(cfg.serve.host, cfg.serve.port, "serve.port")
    cluster = server = None
    completed = interrupted = False
    env_before = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "PREFECT_API_URL")}
    with ShutdownGuard() as guard:
        try:
            if cfg.use_prefect and not os.environ.get("PREFECT_API_URL"):
                # our own API server, in its own session: a terminal Ctrl-C must not kill it before the interrupted
                # flow run is recorded (Prefect's temporary server is a plain child and died first)
                server = PrefectServer(ui=False, services=False)
                guard.kill_on_timeout(lambda: [server.proc.pid] if server.proc else [])
                print("starting a Prefect API server (127.0.0.1) for the run history ...", flush=True)
                server.launch()  # it starts while the Ray cluster starts
            address = cfg.deploy.address or os.environ.get("RAY_ADDRESS")
            if starts_cluster:
                cluster = LocalRayCluster(num_cpus=cfg.deploy.cluster_cpus or os.cpu_count())
                guard.kill_on_timeout(lambda: [n["pgid"] for n in cluster.nodes])
                print("starting a local Ray cluster (loopback) for the workflow and the deployment ...", flush=True)
                address = cluster.start()
            if server is not None:
                os.environ["PREFECT_API_URL"] = server.wait_ready().api_url
            if address:
                os.environ["RAY_ADDRESS"] = address
            init_ray(RayConfig(address=address))
            logs = {"Ray": session_log_dir(), "cluster": cluster.nodes[0]["log"] if cluster and cluster.nodes else None}
            res = run_workflow(cfg, extras.get("force") or [], check_inputs=False)  # preflight ran above
            completed = True
            print_summary(res, keep_serving=extras.get("keep_serving", False), took_s=time.monotonic() - t0,
                          logs=logs, serve_port=cfg.serve.port)
            if extras.get("keep_serving") and "deploy" in res.records:
                _wait_for_signal()
        except BaseException as e:  # noqa: BLE001 - a signal may surface as any exception (see ShutdownGuard)
            if not isinstance(e, KeyboardInterrupt) and guard.seen() is None:
                raise
            interrupted = True
        finally:
            guard.begin_shutdown()
            # Serve is shut down only on a cluster that outlives this command (our own cluster stops with everything
            # on it, and a controller killed mid-shutdown prints raylet errors after the summary), and only through
            # the connection this command made: serve.shutdown() without one starts a Ray of its own
            if "deploy" in cfg.stages and ray.is_initialized() and cluster is None:
                try:
                    from ray import serve

                    serve.shutdown()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            if ray.is_initialized():
                ray.shutdown()
            _stop_and_restore(cluster, server, env_before)
        if interrupted and not completed:
            sig = guard.signum or signal.SIGINT
            stopped = [w for w, o in (("the local Ray cluster", cluster), ("the Prefect server", server)) if o]
            print(f"softmask run: interrupted by {signal.Signals(sig).name}"
                  + (f"; stopped {' and '.join(stopped)}" if stopped else "")
                  + "; rerun the same command to resume (completed stages are skipped)", file=sys.stderr, flush=True)
            return 128 + sig
    return 0


def cli_preprocess(cfg, extras: dict) -> int:
    from pipelines import preprocess

    m = preprocess.run(cfg)
    print(f"dataset written: {cfg.output} (fingerprint {m.fingerprint})")
    return 0


def cli_train(cfg, extras: dict) -> int:
    from pipelines import train

    res = train.run(cfg)
    print(f"export: {res.export_uri}\nmetrics: {res.metrics_uri}\nplot: {res.plot_uri}")
    return 0


def cli_eval(cfg, extras: dict) -> int:
    from pipelines import evaluate

    evaluate.run(cfg)
    return 0


def cli_experiment(cfg, extras: dict) -> int:
    import shlex

    from pipelines import experiment

    if not cfg.command:  # recorded in the report: the command that regenerates it
        cfg.command = "softmask " + shlex.join(sys.argv[1:])
    experiment.run(cfg)
    return 0


def cli_serve(cfg, extras: dict) -> int:
    from pipelines import serve

    return int(serve.serve_forever(cfg) or 0)


def cli_tokenizer(cfg, extras: dict) -> int:
    from pipelines import tokenizer_train

    tokenizer_train.run(cfg)
    return 0


def cli_status(cfg: StatusConfig, extras: dict) -> int:
    from infra import storage

    run_id = cfg.run_id
    if not run_id:
        latest = storage.read_json(storage.join(cfg.run_root, "runs", "latest.json"), missing_ok=True)
        if not latest:
            print(f"no runs under {cfg.run_root}", file=sys.stderr)
            return 1
        run_id = latest["run_id"]
    lin = storage.read_json(storage.join(cfg.run_root, "runs", run_id, "lineage.json"), missing_ok=True)
    if not lin:
        print(f"no lineage for run {run_id} under {cfg.run_root}", file=sys.stderr)
        return 1
    print(f"run {run_id} (workflow {lin.get('config', {}).get('name', '?')!r})\n"
          f"  lineage    {storage.join(cfg.run_root, 'runs', run_id, 'lineage.json')}")
    for st in lin["stages"]:
        where = st.get("dir") or st.get("url")
        extra = {k: st[k] for k in ("export", "report", "manifest") if k in st}
        when = st.get("finished_at", "")
        print(f"  {st['stage']:<10} key={st.get('key', '-'):<16} executed={st.get('executed')}  {when}  {where}  "
              f"{extra or ''}".rstrip())
    return 0


def cli_ui(cfg: UiConfig, extras: dict) -> int:
    """`softmask ui`: the Prefect server with its UI on 127.0.0.1 until Ctrl-C (then it is stopped; exit 0)."""
    from pipelines.orchestration import PrefectServer

    server = PrefectServer(cfg.port)
    with ShutdownGuard() as guard:
        guard.kill_on_timeout(lambda: [server.proc.pid] if server.proc else [])
        try:
            print(f"starting the Prefect server on 127.0.0.1:{cfg.port} ...", flush=True)
            server.start()
            print(f"Prefect UI: {server.url}  (API {server.api_url}; Ctrl-C to stop)", flush=True)
            _wait_for_signal()
        except KeyboardInterrupt:
            pass
        finally:
            guard.begin_shutdown()
            server.stop()
    print("Prefect server stopped", flush=True)
    return 0


def _local_abs(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(path)


def schedule_preflight(cfg) -> str | None:
    """What would make every scheduled run fail, found before anything starts (None when fine). The sources are
    not checked: a scheduled run's data may arrive later."""
    from pipelines.workflow import preflight

    try:
        preflight(cfg, sources=False)
    except ConfigError as e:
        return str(e)
    return None


def cli_schedule(cfg, extras: dict) -> int:
    """`softmask schedule`: register the workflow as a Prefect deployment with a cron schedule and serve it (blocks
    until Ctrl-C/SIGTERM; the schedule is then paused). Starts, unless given, a Prefect server with the UI (and a
    local Ray cluster when the workflow deploys, so the endpoint outlives each run); stops them on exit."""
    from pipelines.orchestration import (PrefectServer, cron_schedule, prefect_api, prefect_env, register_schedule,
                                         serve_deployment)

    cron, tz = extras["cron"], extras.get("timezone") or "UTC"
    problem = schedule_preflight(cfg)
    if problem:
        print(f"softmask schedule: config error: {problem}", file=sys.stderr)
        return 2
    try:
        cron_schedule(cron, tz)
    except ValueError as e:
        print(f"softmask schedule: invalid schedule: {e}", file=sys.stderr)
        return 2
    # scheduled runs execute in the runner's subprocesses: pin local paths to where this command was started
    cfg = replace(cfg, run_root=_local_abs(cfg.run_root),
                  train=replace(cfg.train, init_checkpoint=_local_abs(cfg.train.init_checkpoint)))
    name = extras.get("deployment_name") or f"{cfg.name}-scheduled"
    api = extras.get("api_url") or os.environ.get("PREFECT_API_URL")
    server = cluster = None
    runner_stopped = True
    env_before = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "PREFECT_API_URL")}
    # no handlers of ours while serving: serve_deployment stops the runner on SIGINT/SIGTERM (bounded)
    with ShutdownGuard(install=False) as guard:
        try:
            if not api:
                server = PrefectServer(int(extras.get("ui_port") or 0))
                guard.kill_on_timeout(lambda: [server.proc.pid] if server.proc else [])
                print("starting the Prefect server (127.0.0.1) ...", flush=True)
                server.launch()  # it starts while the Ray cluster starts
            address = cfg.deploy.address or os.environ.get("RAY_ADDRESS")
            if not address and "deploy" in cfg.stages:
                from infra.cluster import LocalRayCluster

                cluster = LocalRayCluster(num_cpus=cfg.deploy.cluster_cpus or os.cpu_count())
                guard.kill_on_timeout(lambda: [n["pgid"] for n in cluster.nodes])
                print("starting a local Ray cluster (loopback) for the scheduled runs and their deployment ...",
                      flush=True)
                address = cluster.start()
            if address:
                os.environ["RAY_ADDRESS"] = address  # the runs (subprocesses of the runner) join this cluster
            if server is not None:
                api = server.wait_ready().api_url
            with prefect_api(api):
                prefect_env()
                from pipelines.scheduled import softmask_scheduled  # imports prefect: after prefect_env()

                _, deployment = register_schedule(softmask_scheduled, cfg, cron, name, tz)
                deployment_id = deployment.apply()  # registered (and visible in the API/UI) before we say so
                ui = api.removesuffix("/api")
                print(f"schedule {cron!r} ({tz}) registered as 'softmask-scheduled/{name}' (id {deployment_id}) on "
                      f"{api}\n"
                      f"  UI: {ui}/deployments   run now: PREFECT_API_URL={api} prefect deployment run "
                      f"'softmask-scheduled/{name}'\n  serving scheduled runs (Ctrl-C stops and pauses the schedule)",
                      flush=True)
                runner_stopped = serve_deployment(deployment)
        except KeyboardInterrupt:
            pass
        finally:
            guard.begin_shutdown()
            _stop_and_restore(cluster, server, env_before)
    print("schedule stopped", flush=True)
    if not runner_stopped:  # a runner task would not finish: leave without waiting on it (the schedule is paused)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
