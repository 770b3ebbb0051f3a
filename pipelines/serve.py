"""Serving stage driver: ``run(ServeStageConfig) -> ServeResult`` and the CLI's blocking ``serve_forever``.

    cfg = load_config(ServeStageConfig, "configs/serve_debug.yaml", ["checkpoint=/path/to/export"])
    result = run(cfg)            # Ray (local unless `address`) + Serve on host:port + the app; returns once ready
    shutdown(result)             # deletes the app; stops Serve / Ray only if this call started them

``serve_forever(cfg)`` is ``softmask serve``: it prints the URL and an example curl, blocks until SIGINT/SIGTERM, then
shuts down what it started and returns 0. With ``detach`` (needs a cluster ``address``) the app keeps running on the
cluster after the driver leaves.

Access: a loopback ``host`` serves anyone on this machine unless an API key is configured; any other ``host`` needs
one (``api_key_env``, default SOFTMASK_API_KEY, or ``api_key_file``; refused before anything starts otherwise).
With a key, every endpoint but /healthz answers 401 without ``Authorization: Bearer <key>``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from infra.config import ConfigError, field, require
from infra.net import free_port
from workers.serving import build_app
from workers.serving_config import ServeConfig, as_serve_config, check_model, read_api_key


@dataclass
class ServeStageConfig(ServeConfig):
    """The serving application (every ServeConfig field) plus where and how the driver runs it."""

    host: str = field("127.0.0.1", "HTTP bind address: loopback (127.0.0.1 / ::1 / localhost), or any other address "
                                   "(e.g. 0.0.0.0) only with an API key (api_key_env / api_key_file)")
    port: int = field(8000, "HTTP port; 0 = pick a free one")
    address: str | None = field(None, "Ray cluster to join (host:port or ray://...); None = start a local Ray "
                                      "(or join RAY_ADDRESS)")
    ray_num_cpus: int | None = field(None, "logical CPUs of a local Ray (None = the machine's cores)")
    detach: bool = field(False, "return and leave the app running on the cluster (needs `address` or RAY_ADDRESS)")
    ready_timeout_s: float = field(120.0, "how long run() waits for /healthz to answer after deploying")
    http_timeout_s: float | None = field(None, "Serve proxy request timeout (None = request_timeout_s + 10 s)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.host), "host", "must be an address to bind (e.g. 127.0.0.1)")
        require(0 <= self.port <= 65535, "port", f"must lie in [0, 65535], got {self.port}")
        require(self.ray_num_cpus is None or self.ray_num_cpus >= 1, "ray_num_cpus", "must be >= 1")
        cluster = self.address or os.environ.get("RAY_ADDRESS")
        require(not self.detach or cluster not in (None, "", "local"), "detach",
                "needs a cluster (`address` or RAY_ADDRESS): a Ray started by this process dies with it")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        require(self.http_timeout_s is None or self.http_timeout_s > 0, "http_timeout_s", "must be > 0")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeResult:
    """A running application and what the call that started it owns."""

    url: str                 # base URL, e.g. http://127.0.0.1:8000 (endpoints: <url>/v1/completions ...)
    app_name: str
    model: str               # the served model name (`model` field of requests)
    host: str
    port: int
    ray_started: bool        # this process started the local Ray (shutdown stops it)
    serve_started: bool      # this call started Serve on the cluster (shutdown stops Serve, not just the app)
    detached: bool = False
    key_source: str | None = None  # where a client finds the API key (a shell expression, never the key); None = none

    @property
    def completions_url(self) -> str:
        return f"{self.url}/v1/completions"

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    def example_curl(self) -> str:
        body = json.dumps({"model": self.model, "prompt": "To be, or not to be", "max_tokens": 32, "steps": 32})
        auth = f" -H \"Authorization: Bearer {self.key_source}\"" if self.key_source else ""
        return f"curl -s {self.completions_url}{auth} -H 'Content-Type: application/json' -d '{body}'"


def request_headers(cfg: ServeConfig) -> dict:
    """Headers of a JSON request from this driver to the app: with the Authorization the configured key needs."""
    key = read_api_key(as_serve_config(cfg))
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def key_source(cfg: ServeConfig) -> str:
    """The shell expression that yields the configured key (for the printed example; the key itself is never shown)."""
    return f"$(head -n1 {cfg.api_key_file})" if cfg.api_key_file else f"${cfg.api_key_env}"


def _existing_serve_port() -> int | None:
    """HTTP port of a Serve instance already running on the connected cluster, else None."""
    from ray.serve import context

    try:
        client = context._get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - private API: treat any failure as "no Serve yet"
        return None
    return None if client is None else int(client.http_config.port)


def _serve_controller_running() -> bool:
    """Whether the connected cluster runs a Serve controller (also when this driver holds no client for it)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s}s (last error: {last})")


def check_port(host: str, port: int, name: str = "port") -> None:
    """ConfigError naming ``name`` when ``host:port`` cannot be bound here (another process listens on it)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what the HTTP server does: TIME_WAIT is no clash
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"{name}: {host}:{port} is not free ({e.strerror}); choose another port (0 = any free "
                              f"one) or stop what listens there") from None


def _cluster(cfg: ServeStageConfig) -> str | None:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


def _on_this_host(address: str | None) -> bool:
    """Whether Serve's HTTP proxy (on the head node) listens on this host: a Ray started here or a loopback cluster."""
    host = (address or "127.0.0.1").split("://")[-1].rsplit(":", 1)[0]
    return host == "localhost" or _is_loopback(host)


def check_access(cfg: ServeStageConfig) -> bool:
    """Whether an API key is configured; ConfigError naming ``host`` for an address beyond loopback without one (or
    naming the key field that cannot be read)."""
    keyed = read_api_key(as_serve_config(cfg)) is not None
    require(keyed or cfg.host == "localhost" or _is_loopback(cfg.host), "host",
            f"{cfg.host} is not a loopback address: serving beyond this machine needs an API key (set the environment "
            f"variable {cfg.api_key_env} or api_key_file)")
    return keyed


def preflight(cfg: ServeStageConfig) -> bool:
    """Everything that can be checked before Ray or Serve starts: an address beyond loopback has an API key, the
    checkpoint is there and readable, its tokenizer fits the model, and the HTTP port is free when this command starts
    the Ray that will bind it. ConfigError names the field. Returns whether an API key is configured."""
    import ray

    keyed = check_access(cfg)
    check_model(as_serve_config(cfg))
    if _cluster(cfg) is None and not ray.is_initialized():  # a Ray of this process may already serve on that port
        check_port(cfg.host, cfg.port)
    return keyed


def run(cfg: ServeStageConfig) -> ServeResult:
    """Start (or join) Ray and Serve, deploy the app, wait until /healthz answers; returns where it runs.

    :func:`preflight` runs first, so a bad input starts nothing. A failure after Ray/Serve were started here shuts
    them down again before re-raising.
    """
    from ray import serve

    from infra.ray_runtime import RayConfig, init_ray

    keyed = preflight(cfg)
    # Serve's driver-side INFO lines (started, connecting, ready) belong in its logs; the caller reports the outcome
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app_cfg = as_serve_config(cfg)
    if keyed:  # an ingress replica that cannot find the key (another environment) refuses to start: fail closed
        app_cfg = dataclasses.replace(app_cfg, require_api_key=True)
    app = build_app(app_cfg)
    ray_started = init_ray(RayConfig(address=cfg.address, num_cpus=cfg.ray_num_cpus))
    serve_started = False
    try:
        port = _existing_serve_port()
        serve_started = port is None and not _serve_controller_running()
        if port is None and not serve_started:  # Serve runs, its port unknown to this driver: the configured one
            port = cfg.port or None
            require(port is not None, "port", "Serve already runs on this cluster: give the port it listens on")
        if serve_started:
            if _on_this_host(_cluster(cfg)):  # a joined cluster on this host: is the port still free?
                check_port(cfg.host, cfg.port)
            port = cfg.port or free_port(cfg.host)
            serve.start(http_options={"host": cfg.host, "port": port,
                                      "request_timeout_s": cfg.http_timeout_s or cfg.request_timeout_s + 10.0})
        # where this driver reaches the server: a wildcard bind answers on loopback too
        host = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.host, cfg.host)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{cfg.route_prefix.rstrip('/')}"
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
        _wait_healthy(url, cfg.ready_timeout_s)
        result = ServeResult(url=url, app_name=cfg.app_name, model=app_cfg.served_name, host=cfg.host, port=port,
                             ray_started=ray_started, serve_started=serve_started, detached=cfg.detach,
                             key_source=key_source(app_cfg) if keyed else None)
    except BaseException:
        _teardown(cfg.app_name, serve_started, ray_started)
        raise
    return result


def _teardown(app_name: str, serve_started: bool, ray_started: bool) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            if serve_started:
                serve.shutdown()
            else:
                serve.delete(app_name)
        except Exception as e:  # noqa: BLE001 - keep going: Ray must still be stopped
            print(f"softmask serve: stopping the app failed: {type(e).__name__}: {e}", file=sys.stderr)
        if ray_started:
            ray.shutdown()  # a Ray joined (or owned by the caller) stays connected: the caller decides


def shutdown(result: ServeResult) -> None:
    """Undo run(): delete the app (or stop Serve if run started it) and stop the Ray it started. Detached: no-op."""
    if not result.detached:
        _teardown(result.app_name, result.serve_started, result.ray_started)


def serve_forever(cfg: ServeStageConfig) -> int:
    """``softmask serve``: run, print the URL and an example curl, block until SIGINT/SIGTERM, shut down; exit code."""
    stop = threading.Event()
    previous = {}

    def on_signal(signum, _frame):
        stop.set()

    result = None
    try:
        result = run(cfg)
        if not cfg.detach:  # installed after run(): ray.init replaces the driver's SIGTERM handler
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        print(f"softmask serve: model {result.model!r} at {result.url}", flush=True)
        print(f"  try: {result.example_curl()}", flush=True)
        if cfg.detach:
            print(f"  detached: the app {cfg.app_name!r} keeps running on the cluster", flush=True)
            return 0
        print("  press Ctrl-C (SIGINT) or send SIGTERM to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("softmask serve: stopping", flush=True)
    except KeyboardInterrupt:  # Ctrl-C while starting: run() already cleaned up what it started
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if result is not None and not cfg.detach:
            shutdown(result)
    print("softmask serve: stopped", flush=True)
    return 0
