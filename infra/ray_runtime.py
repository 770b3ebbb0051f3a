"""Starting and joining Ray, with the environment every Ray process of this project needs.

NOTE: environment variables must be set *before* ``ray.init`` so that raylets and workers inherit them
(DeepSpeed's CPU accelerator, S3 endpoint/credentials, warning filters).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from infra.config import field

# Variables passed through to every Ray worker when set in the driver (S3 endpoint and credentials are read by
# pyarrow/s3fs inside workers; they are never logged).
PASSTHROUGH_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "SOFTMASK_CACHE", "PYTHONWARNINGS", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
)

# The node address of every Ray this project starts on one host. Ray rewrites 127.0.0.1/localhost to the host's
# routable interface before it uses them; any other loopback address is kept, so the node stays on loopback.
LOOPBACK_NODE_IP = "127.0.0.2"

DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading/saving bars (the console shows our progress)
    "RAY_worker_niceness": "0",  # Ray starts workers at nice 15: on a busy machine they would starve
}


@dataclass
class RayConfig:
    """How the driver reaches Ray."""

    address: str | None = field(None, "Ray cluster address (host:port or ray://...); None starts a local Ray in-process "
                                      "unless RAY_ADDRESS is set")
    num_cpus: int | None = field(None, "logical CPUs of a local Ray (None = the machine's core count)")
    include_dashboard: bool = field(False, "start the dashboard with a local Ray (127.0.0.1 only)")
    log_to_driver: bool = field(False, "also print the Ray workers' stdout/stderr on this console (they are always in "
                                       "the Ray session's logs: session_log_dir())")


def default_env(accelerator: str = "cpu") -> dict[str, str]:
    """Environment applied in the driver before Ray starts (explicit user settings win)."""
    env = dict(DEFAULT_ENV)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def apply_default_env(accelerator: str = "cpu") -> None:
    for k, v in default_env(accelerator).items():
        os.environ.setdefault(k, v)


def worker_env_vars() -> dict[str, str]:
    """The subset of the driver's environment that Ray workers must see."""
    return {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}


def driver_ip_kwargs(address: str) -> dict:
    """A driver joining a loopback cluster (infra.cluster.LocalRayCluster binds 127.0.0.2) must register on that same
    loopback address, or it looks for a raylet on the host's routable IP and hangs."""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return {"_node_ip_address": host} if host.startswith("127.") else {}


def init_ray(cfg: RayConfig | None = None, *, accelerator: str = "cpu", extra_env: dict | None = None):
    """Start a local Ray or join a cluster; returns True when this call started (and so owns) Ray.

    Already-initialised Ray is reused (returns False). With ``address`` or ``RAY_ADDRESS`` set the driver joins the
    cluster (no resource arguments are allowed then).
    """
    import ray

    apply_default_env(accelerator)
    if ray.is_initialized():
        return False
    cfg = cfg or RayConfig()
    env = worker_env_vars() | dict(extra_env or {})
    runtime_env = {"env_vars": env}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    quiet = {"log_to_driver": cfg.log_to_driver, "logging_level": logging.WARNING}
    if address:
        # Ray 2.60 clusters use token auth by default; a driver only sends ~/.ray/auth_token when RAY_AUTH_MODE=token
        # was set before ray was imported (the `softmask` CLI sets it first thing; see docs/cluster.md).
        # Workers get the address too: Ray's own helpers in them (Ray Train's placement-group cleaner asks the state
        # API) would otherwise guess it and warn "Found multiple active Ray instances" when other clusters run here.
        if "://" not in address:  # a Ray Client address (ray://) means nothing inside the cluster
            runtime_env["env_vars"].setdefault("RAY_ADDRESS", address)
        ray.init(address=address, runtime_env=runtime_env, **quiet, **driver_ip_kwargs(address))
    else:
        # address="local": never attach to whatever /tmp/ray/ray_current_cluster points at (a stale or foreign cluster)
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=cfg.include_dashboard,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env, _node_ip_address=LOOPBACK_NODE_IP, **quiet)
    return True


def session_log_dir() -> str | None:
    """The log directory of the Ray session this driver is connected to (workers, Serve, raylet); None when unknown
    (not connected, or a remote cluster's head keeps them)."""
    import ray

    try:
        node = ray._private.worker._global_node  # no public accessor in Ray 2.60
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - another Ray version: say nothing rather than fail the run
        return None


def state_api_available() -> bool:
    """Whether the Ray this driver is connected to runs a dashboard, the server behind ``ray.util.state``."""
    import ray

    try:
        return bool(ray._private.worker.get_dashboard_url())
    except Exception:  # not connected, or a Ray without this helper: assume the worst case (no state API)
        return False


def torch_trainer_class():
    """Ray Train's ``TorchTrainer``, fitted to the connected Ray.

    Ray Train 2.60 starts a detached PlacementGroupCleaner per ``fit()`` that polls the controller's state through the
    state API. Without a dashboard (``ray.init(include_dashboard=False)``, the default of :func:`init_ray`) each poll
    waits 40 s and fails, so the cleaner can never clean, and every ``fit()`` ends by waiting 12 s for it to stop
    ("Failed to stop PlacementGroupCleaner gracefully"). There the callback is left out; placement groups of a run
    are still removed by the controller on a normal or failed exit, and with the driver's job otherwise.
    """
    from ray.train.torch import TorchTrainer

    if state_api_available():
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray version: nothing to leave out
        return TorchTrainer
    return _without_callbacks(TorchTrainer, PlacementGroupCleanerCallback)


def _without_callbacks(trainer_cls, *dropped):
    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, dropped)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer
