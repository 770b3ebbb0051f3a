"""The debug workflow end to end in-process (Prefect + Ray): preprocess -> train -> evaluate -> deploy -> one HTTP
request; reruns skip completed stages (their bodies do not run); a stage whose output marker is gone runs again even
though Prefect has it cached; a failed stage resumes under the same key; a train-config change reruns train, not
preprocess; --force."""
import dataclasses
import json
import os
import pathlib

import pytest

from infra.config import ConfigError, load_config
from pipelines import lineage, workflow
from pipelines.workflow import WorkflowConfig, run_workflow

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UP_TO_EVAL = ["preprocess", "train", "evaluate"]


@pytest.fixture(scope="module")
def debug_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    return load_config(WorkflowConfig, ROOT / "configs" / "debug_cpu.yaml", [f"run_root={root}"])


@pytest.fixture(scope="module")
def first(ray_session, debug_cfg):
    """The whole workflow once, with Prefect."""
    from ray import serve

    try:
        res = run_workflow(debug_cfg)
    finally:
        serve.shutdown()
    return res


def runs(res: workflow.WorkflowResult) -> dict:
    """How many times each stage's body ran in the call that returned ``res``."""
    return {s: int(res.executed.get(s, False)) for s in workflow.STAGES}


def said(out: str) -> dict:
    """What the progress lines of a call said about each stage: started / skipped (its body did not run)."""
    return {line.split()[0][1:-1]: line.split()[1].rstrip(":") for line in out.splitlines()
            if line.startswith("[") and line.split()[1] in ("started", "skipped:")}


def test_end_to_end_then_every_stage_is_skipped(first, debug_cfg):
    res = first
    assert res.executed == {"preprocess": True, "train": True, "evaluate": True, "deploy": True}
    reply = res.reply
    assert reply["choices"] and isinstance(reply["choices"][0]["text"], str) and reply["nfe"] >= 1
    lin = json.loads(pathlib.Path(res.lineage_uri).read_text())
    assert [s["stage"] for s in lin["stages"]] == ["preprocess", "train", "evaluate", "deploy"]
    train = res.records["train"]
    assert pathlib.Path(train["export"], "model.safetensors").is_file()
    assert res.records["train"]["inputs"] == [res.records["preprocess"]["key"]]
    assert runs(res) == {"preprocess": 1, "train": 1, "evaluate": 1, "deploy": 1}
    assert res.serve is not None and res.serve.url == res.records["deploy"]["url"]  # the running application
    assert "call_id" not in json.dumps(lin) and all("executed" in s for s in lin["stages"])

    # the same config again (without deploy): every stage is skipped, no stage body runs
    again = run_workflow(dataclasses.replace(debug_cfg, stages=UP_TO_EVAL))
    assert again.executed == {"preprocess": False, "train": False, "evaluate": False}
    assert {s: again.records[s]["key"] for s in UP_TO_EVAL} == {s: res.records[s]["key"] for s in UP_TO_EVAL}
    assert runs(again) == {"preprocess": 0, "train": 0, "evaluate": 0, "deploy": 0} and again.serve is None


def test_a_stage_whose_output_marker_is_gone_runs_again_although_prefect_cached_it(first, debug_cfg):
    """Prefect's cache key is the stage key; the cache is trusted only while the output's _stage.json is there."""
    res = first
    marker = pathlib.Path(res.records["preprocess"]["dir"], lineage.MARKER)
    marker.unlink()
    again = run_workflow(dataclasses.replace(debug_cfg, stages=UP_TO_EVAL))
    assert again.executed == {"preprocess": True, "train": False, "evaluate": False}
    assert runs(again)["preprocess"] == 1 and marker.is_file()
    # deterministic output: the same fingerprint, so the downstream keys (and their outputs) still hold
    assert again.records["preprocess"]["fingerprint"] == res.records["preprocess"]["fingerprint"]
    assert again.records["train"]["key"] == res.records["train"]["key"]


def test_a_failed_stage_resumes_under_the_same_key(first, debug_cfg, tmp_path, capsys):
    """evaluate fails (its evaluator directory is not there yet) with its own error and records nothing; once the
    directory exists, the SAME config resumes: preprocess and train are skipped, evaluate runs under the key it
    failed with."""
    from models.evaluation import EvaluatorUnavailable
    from models.evaluation.evaluator_lm import converted_dir

    evaluator = tmp_path / "evaluator"
    cfg = dataclasses.replace(debug_cfg, stages=UP_TO_EVAL,
                              evaluate=dataclasses.replace(debug_cfg.evaluate, evaluator=str(evaluator)))
    eval_root = pathlib.Path(cfg.run_root, "eval")
    done_before = {p.parent.name for p in eval_root.glob(f"*/{lineage.MARKER}")}
    capsys.readouterr()
    with pytest.raises(EvaluatorUnavailable, match="neither a packaged evaluator"):  # raised by evaluate's body
        run_workflow(cfg)
    assert said(capsys.readouterr().out) == {"preprocess": "skipped", "train": "skipped", "evaluate": "started"}
    assert {p.parent.name for p in eval_root.glob(f"*/{lineage.MARKER}")} == done_before  # nothing recorded

    os.symlink(converted_dir("smollm2-135m"), evaluator)  # the same path, now a local HF evaluator directory
    resumed = run_workflow(cfg)
    assert resumed.executed == {"preprocess": False, "train": False, "evaluate": True}
    key = resumed.records["evaluate"]["key"]
    assert key not in done_before and key != first.records["evaluate"]["key"]
    assert {p.parent.name for p in eval_root.glob(f"*/{lineage.MARKER}")} == done_before | {key}
    assert run_workflow(cfg).executed["evaluate"] is False  # and that key is now complete


def test_a_train_config_change_reruns_train_and_evaluate_but_not_preprocess(first, debug_cfg):
    res = first
    cfg = dataclasses.replace(debug_cfg, stages=UP_TO_EVAL, use_prefect=False,
                              train=dataclasses.replace(debug_cfg.train, steps=debug_cfg.train.steps - 1))
    changed = run_workflow(cfg)
    assert changed.executed == {"preprocess": False, "train": True, "evaluate": True}
    assert runs(changed) == {"preprocess": 0, "train": 1, "evaluate": 1, "deploy": 0}
    assert changed.records["preprocess"]["key"] == res.records["preprocess"]["key"]
    assert changed.records["train"]["key"] != res.records["train"]["key"]
    assert changed.records["train"]["metrics"]["step"] == debug_cfg.train.steps - 1
    assert lineage.stage_record(res.records["train"]["dir"])["key"] == res.records["train"]["key"]  # kept


def test_force_reruns_the_forced_stage_and_the_later_ones(first, debug_cfg):
    assert workflow.forced_stages(["train"]) == {"train", "evaluate", "deploy"}
    assert workflow.forced_stages(["deploy", "evaluate"]) == {"evaluate", "deploy"}
    assert workflow.forced_stages([]) == set()
    with pytest.raises(ConfigError, match=r"force: unknown stage\(s\) \['trian'\]"):
        run_workflow(debug_cfg, force=["trian"])
    res = first
    report = pathlib.Path(res.records["evaluate"]["report"])
    written = report.stat().st_mtime_ns
    forced = run_workflow(dataclasses.replace(debug_cfg, stages=UP_TO_EVAL), force=["evaluate"])
    assert forced.executed == {"preprocess": False, "train": False, "evaluate": True}
    assert runs(forced) == {"preprocess": 0, "train": 0, "evaluate": 1, "deploy": 0}
    assert forced.records["evaluate"]["key"] == res.records["evaluate"]["key"] and report.stat().st_mtime_ns > written
