"""Ctrl-C during `softmask run`: SIGINT to the CLI's foreground process group while the train stage is running
stops the flow, stops what the CLI started (the local Ray cluster, the Prefect API server), exits 130 promptly with
one line, leaves no process behind, and a rerun resumes: the completed preprocess stage is skipped and training
continues from the interrupted run's latest checkpoint."""
from __future__ import annotations

import json
import time

import pytest

from cli_proc import ROOT, Cli, cli_env

pytestmark = pytest.mark.slow
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
STEPS = 16


def _wait_for_registered_checkpoint(run_root, timeout: float):
    """Ray Train's own record of a checkpoint (what a same-name run restores from), not just a directory on disk."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in run_root.glob("train/*/run/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                    return snap
            except (OSError, ValueError):
                pass  # being written
        time.sleep(0.2)
    raise AssertionError("no checkpoint registered by Ray Train")


def test_ctrl_c_during_train_stops_everything_and_rerun_resumes(tmp_path):
    from pipelines import lineage
    from workers import checkpointing

    run_root = tmp_path / "artifacts"
    env = cli_env(tmp_path / "prefect-home")
    # enough steps that the run is still training when Ray Train has registered its first checkpoint (step 2)
    train = [f"--train.steps={STEPS}", "--train.checkpoint.every=2"]
    cli = Cli(["run", "--config", DEBUG, f"--run_root={run_root}", *train], env, cwd=tmp_path)
    try:
        cli.wait_for(r"starting a Prefect API server", timeout=60)
        cli.wait_for(r"starting a local Ray cluster", timeout=60)
        cli.wait_for(r"\[train\] started", timeout=400)  # the train stage is running
        snapshot = _wait_for_registered_checkpoint(run_root, timeout=400)  # Ray Train starts, then step 2
        t_train = time.monotonic() - cli.t0
        cli.track()
        assert any("raylet" in cmd for cmd in cli.seen_pids.values()), cli.seen_pids
        assert any("prefect" in cmd and "server" in cmd for cmd in cli.seen_pids.values()), cli.seen_pids
        t = cli.interrupt()
        rc = cli.wait(60)
        took = time.monotonic() - t
    finally:
        cli.kill()
    print(f"train stage reached after {t_train:.0f}s, exit {took:.1f}s after SIGINT")
    assert rc == 130, cli.output(40)
    assert took < 60, took
    last = [line for line in cli.lines if line.strip()][-1]
    assert last == ("softmask run: interrupted by SIGINT; stopped the local Ray cluster and the Prefect server; "
                    "rerun the same command to resume (completed stages are skipped)"), cli.output(30)
    assert "Traceback" not in cli.output(), cli.output(60)
    assert cli.survivors() == [], "orphaned processes after Ctrl-C"

    # what the interrupted run left: a complete preprocess stage, an incomplete train stage with a checkpoint
    [pre_dir] = [p for p in (run_root / "datasets").iterdir() if (p / lineage.MARKER).is_file()]
    [train_dir] = list((run_root / "train").iterdir())
    assert train_dir == snapshot.parents[1]
    assert not (train_dir / lineage.MARKER).exists()
    resume_step = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
    assert 2 <= resume_step < STEPS
    assert checkpointing.latest_train_state(str(train_dir / "run"))["step"] >= resume_step

    # the rerun (train only, without Prefect: the resume logic is the workflow's) skips preprocess and resumes
    rerun = Cli(["run", "--config", DEBUG, f"--run_root={run_root}", *train, "--stages=[preprocess,train]",
                 "--use_prefect=false"], env, cwd=tmp_path)
    try:
        assert rerun.wait(240) == 0, rerun.output(40)
        print(f"rerun took {time.monotonic() - rerun.t0:.0f}s")
    finally:
        rerun.kill()
    rows = {line.split()[0]: line.split(None, 1)[1] for line in rerun.lines if line.startswith("  ")
            and line.split()[:1] in (["preprocess"], ["train"])}
    assert rows["preprocess"].split() == ["skipped", "(complete)", str(pre_dir)], rerun.output(30)
    assert rows["train"].split() == ["ran", str(train_dir)], rerun.output(30)
    setups = [r for r in map(json.loads, (train_dir / "output" / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "setup"]
    assert setups[-1]["step"] == resume_step, setups  # started from the interrupted run's checkpoint, not step 0
    assert json.loads((train_dir / lineage.MARKER).read_text())["metrics"]["step"] == STEPS
