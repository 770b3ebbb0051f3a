"""Handlers of the `softmask` subcommands: ``handler(cfg, extras) -> exit code`` (cfg already typed and validated)."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass

from infra.config import field, require


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


def _print_run_summary(res, cfg, keep_serving: bool) -> None:
    recs = res.records
    print("\n=== softmask run finished ===")
    for stage, rec in recs.items():
        state = "ran" if rec.get("executed") else "skipped (complete)"
        print(f"  {stage:<10} {state:<19} {rec.get('dir') or rec.get('url', '')}")
    dep = recs.get("deploy")
    if dep:
        choice = (dep["reply"].get("choices") or [{}])[0]
        print(f"\nrequest : {json.dumps(dep['request'])}")
        print(f"reply   : {choice.get('text')!r}")
        print(f"          (nfe={dep['reply'].get('nfe')}, usage={dep['reply'].get('usage')})")
    train = recs.get("train", {})
    print("\nartifacts:")
    print(f"  dataset      {recs['preprocess'].get('manifest')}")
    if train:
        print(f"  checkpoint   {train.get('export')}")
        print(f"  loss plot    {train.get('plot')}")
        print(f"  metrics      {train.get('output')}/metrics.jsonl")
    if "evaluate" in recs:
        print(f"  eval report  {recs['evaluate'].get('report')}")
    print(f"  lineage      {res.lineage_uri}")
    if train:
        print(f"\nserve the model again:\n  softmask serve --checkpoint {train.get('export')} --port 8000")
    if dep:
        print(f"\nendpoint: {dep['url']}/v1/completions" + ("  (kept up: Ctrl-C to stop)" if keep_serving else
                                                           "  (stopping now; --keep-serving keeps it up)"))


def cli_main(cfg, extras: dict) -> int:
    """`softmask run`: start (or join) a Ray cluster, run the workflow, print the reply, stop what we started."""
    import ray

    from infra.cluster import LocalRayCluster
    from infra.ray_runtime import RayConfig, apply_default_env, init_ray
    from pipelines.workflow import run_workflow

    apply_default_env()
    cluster = None
    address = cfg.deploy.address or os.environ.get("RAY_ADDRESS")
    if not address and "deploy" in cfg.stages:
        cluster = LocalRayCluster(num_cpus=cfg.deploy.cluster_cpus or os.cpu_count())
        print(f"starting a local Ray cluster (loopback) for the workflow and the deployment ...", flush=True)
        address = cluster.start()
    try:
        if address:
            os.environ["RAY_ADDRESS"] = address
        init_ray(RayConfig(address=address))
        res = run_workflow(cfg, extras.get("force") or [])
        _print_run_summary(res, cfg, extras.get("keep_serving", False))
        if extras.get("keep_serving") and "deploy" in res.records:
            _wait_for_signal()
        return 0
    finally:
        if "deploy" in cfg.stages:
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()


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
    from pipelines import experiment

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
    from pipelines import lineage

    run_id = cfg.run_id
    if not run_id:
        latest = lineage.read_json(lineage.join(cfg.run_root, "runs", "latest.json"))
        if not latest:
            print(f"no runs under {cfg.run_root}", file=sys.stderr)
            return 1
        run_id = latest["run_id"]
    lin = lineage.read_json(lineage.join(cfg.run_root, "runs", run_id, "lineage.json"))
    if not lin:
        print(f"no lineage for run {run_id} under {cfg.run_root}", file=sys.stderr)
        return 1
    print(f"run {run_id}")
    for st in lin["stages"]:
        where = st.get("dir") or st.get("url")
        extra = {k: st[k] for k in ("export", "report", "manifest") if k in st}
        print(f"  {st['stage']:<10} key={st.get('key', '-'):<16} executed={st.get('executed')}  {where}  {extra or ''}")
    return 0


def cli_ui(cfg: UiConfig, extras: dict) -> int:
    from pipelines.orchestration import PrefectServer

    server = PrefectServer(cfg.port).start()
    print(f"Prefect UI: http://127.0.0.1:{server.port}  (Ctrl-C to stop)", flush=True)
    try:
        _wait_for_signal()
    finally:
        server.stop()
    return 0


def cli_schedule(cfg, extras: dict) -> int:
    """Register a cron-scheduled workflow and serve it (blocks); starts a local Prefect server unless --api-url."""
    from pipelines.orchestration import PrefectServer, register_schedule

    server = None
    api = extras.get("api_url") or os.environ.get("PREFECT_API_URL")
    if not api:
        server = PrefectServer().start()
        api = server.api_url
    name = extras.get("deployment_name") or f"{cfg.name}-scheduled"
    try:
        _, deployment = register_schedule(cfg, extras["cron"], name, api)
        from prefect import serve

        print(f"schedule {extras['cron']!r} registered as 'softmask-scheduled/{name}' on {api}; serving (Ctrl-C stops)",
              flush=True)
        serve(deployment)
    finally:
        if server is not None:
            server.stop()
    return 0
