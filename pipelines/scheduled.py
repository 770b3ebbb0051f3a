"""The flow a cron schedule runs (module level so Prefect's runner can load it by entrypoint).

Import only after ``pipelines.orchestration.prefect_env()``; `softmask schedule` does that.
"""
from __future__ import annotations

from dataclasses import replace

from prefect import flow


@flow(name="softmask-scheduled")
def softmask_scheduled(config: dict, force: list[str] | None = None) -> dict:
    """Run the whole workflow from a resolved WorkflowConfig dict; stages run as plain calls inside this flow run."""
    from infra.config import from_dict
    from pipelines.workflow import WorkflowConfig, run_workflow

    cfg = replace(from_dict(WorkflowConfig, config), use_prefect=False)
    res = run_workflow(cfg, force or [])
    return {"run_id": res.run_id, "lineage": res.lineage_uri, "executed": res.executed}
