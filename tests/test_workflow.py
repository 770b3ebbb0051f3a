"""The debug workflow end to end in-process (Prefect + Ray): preprocess -> train -> evaluate -> deploy -> one HTTP
request; reruns skip completed stages (their bodies do not run); a failure resumes from the failed stage; --force."""
import dataclasses
import json
import pathlib

import pytest

from infra.config import load_config
from pipelines import lineage, workflow
from pipelines.workflow import WorkflowConfig, run_workflow

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debug_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    return load_config(WorkflowConfig, ROOT / "configs" / "debug_cpu.yaml", [f"run_root={root}"])


def test_workflow_end_to_end_skip_resume_force(ray_session, debug_cfg):
    from ray import serve

    runs = dict(workflow.STAGE_RUNS)
    try:
        res = run_workflow(debug_cfg)
    finally:
        serve.shutdown()
    assert res.executed == {"preprocess": True, "train": True, "evaluate": True, "deploy": True}
    reply = res.reply
    assert reply["choices"] and isinstance(reply["choices"][0]["text"], str) and reply["nfe"] >= 1
    lin = json.loads(pathlib.Path(res.lineage_uri).read_text())
    assert [s["stage"] for s in lin["stages"]] == ["preprocess", "train", "evaluate", "deploy"]
    train = res.records["train"]
    assert pathlib.Path(train["export"], "model.safetensors").is_file()
    assert res.records["train"]["inputs"] == [res.records["preprocess"]["key"]]
    for st in ("preprocess", "train", "evaluate", "deploy"):
        assert workflow.STAGE_RUNS[st] == runs[st] + 1

    # the same config again (without deploy): every stage is skipped, no stage body runs
    again = run_workflow(dataclasses.replace(debug_cfg, stages=["preprocess", "train", "evaluate"]))
    assert again.executed == {"preprocess": False, "train": False, "evaluate": False}
    assert again.run_id == res.run_id or again.records["train"]["key"] == train["key"]
    for st in ("preprocess", "train", "evaluate"):
        assert workflow.STAGE_RUNS[st] == runs[st] + 1

    # a failing evaluate stage, then the fixed config: only evaluate runs again
    broken = dataclasses.replace(debug_cfg, stages=["preprocess", "train", "evaluate"], use_prefect=False,
                                 evaluate=dataclasses.replace(debug_cfg.evaluate, evaluator="/nonexistent/evaluator"))
    with pytest.raises(Exception):
        run_workflow(broken)
    fixed = dataclasses.replace(broken, evaluate=dataclasses.replace(debug_cfg.evaluate, tag="retry"))
    res3 = run_workflow(fixed)
    assert res3.executed == {"preprocess": False, "train": False, "evaluate": True}

    # --force train reruns train and what depends on it, not preprocess
    res4 = run_workflow(dataclasses.replace(fixed, use_prefect=False), force=["train"])
    assert res4.executed == {"preprocess": False, "train": True, "evaluate": True}
    assert lineage.stage_record(res4.records["train"]["dir"])["key"] == train["key"]
