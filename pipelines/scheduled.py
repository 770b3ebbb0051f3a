"""The flow a cron schedule runs (module level, so Prefect's runner loads it by its module path).

`softmask schedule` registers it (pipelines.orchestration.register_schedule) with the resolved WorkflowConfig as its
``config`` parameter and serves it; each flow run is a subprocess of that runner. Runs join the Ray cluster in
RAY_ADDRESS (`softmask schedule` starts a local one when the workflow deploys, so the endpoint outlives each run).

Import only after ``pipelines.orchestration.prefect_env()``; `softmask schedule` does that.
"""
from __future__ import annotations

from dataclasses import replace

from prefect import flow


@flow(name="softmask-scheduled", log_prints=True)
def softmask_scheduled(config: dict, force: list[str] | None = None) -> dict:
    """Run the whole workflow from a resolved WorkflowConfig dict; stages run as plain calls inside this flow run
    (completed stages are skipped, as with `softmask run`). A bad config fails the run before any stage starts."""
    from infra.config import from_dict
    from pipelines.workflow import WorkflowConfig, run_workflow

    cfg = replace(from_dict(WorkflowConfig, config), use_prefect=False)
    res = run_workflow(cfg, force or [])
    print(f"softmask run {res.run_id}: executed {res.executed}; lineage {res.lineage_uri}")
    return {"run_id": res.run_id, "lineage": res.lineage_uri, "executed": res.executed}
