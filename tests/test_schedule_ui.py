"""`softmask ui`, `softmask schedule` and `softmask status` through the real CLI: a real Prefect server on 127.0.0.1
(free port), real HTTP to its API, a real scheduled-flow run executed by the `schedule` process's runner."""
from __future__ import annotations

import datetime
import json
import signal
import time
import zoneinfo
from pathlib import Path

import pytest

from cli_proc import ROOT, Cli, cli_env, free_port, http_json, http_text, port_open

DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`softmask ui` on a free port, for the module (its last test stops it with SIGINT)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    # the scheduler service fills in upcoming runs of cron schedules; every 5 s instead of 60 s
    cli = Cli(["ui", "--port", str(port)], cli_env(home, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5"),
              cwd=home)
    try:
        cli.wait_for(rf"Prefect UI: http://127\.0\.0\.1:{port}\b", timeout=240)
        cli.track()
        yield {"cli": cli, "port": port, "api": f"http://127.0.0.1:{port}/api", "home": home}
    finally:
        cli.kill()


def test_ui_answers_health_and_serves_the_ui(ui):
    assert http_json("GET", f"{ui['api']}/health") is True
    version = http_json("GET", f"{ui['api']}/admin/version")
    assert isinstance(version, str) and version.startswith("3.")
    status, ctype, html = http_text(f"http://127.0.0.1:{ui['port']}/")
    assert status == 200 and "text/html" in ctype and "<title>Prefect" in html, html[:300]
    # the server listens on loopback only: the port is not reachable on another local address
    assert not port_open(ui["port"], host="127.0.0.2")


@pytest.mark.parametrize("args, message", [
    (["--cron", "61 3 * * *", "--config", DEBUG], "invalid schedule: cron: Invalid cron string"),
    (["--cron", "0 3 * *", "--config", DEBUG], "invalid schedule: cron: Invalid cron string"),
    (["--cron", "0 3 * * *", "--config", DEBUG, "--timezone", "Mars/Olympus_Mons"],
     "invalid schedule: timezone: Invalid timezone"),
    (["--cron", "0 3 * * *", "--config", "configs/no_such_recipe.yaml"], "config error: config file not found"),
    (["--cron", "0 3 * * *", "--config", DEBUG, "--train.no_such_key=1"],
     "config error: unknown config key(s) train.no_such_key"),
    (["--cron", "0 3 * * *", "--config", str(ROOT / "configs" / "finetune_deploy.yaml"),
      "--train.init_checkpoint=/nonexistent/export"], "config error: train.init_checkpoint: no config.json in /nonexistent/export"),
], ids=["bad-minute", "four-fields", "bad-timezone", "unknown-recipe", "unknown-key", "missing-init-checkpoint"])
def test_schedule_rejects_bad_input_before_starting_anything(tmp_path, monkeypatch, capsys, args, message):
    """The real entry point (`softmask` = pipelines.cli:main), in-process: exit 2 with one line, and no process
    started (no Prefect server, no Ray cluster)."""
    import psutil

    from pipelines import cli

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(ROOT)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t = time.monotonic()
    assert cli.main(["schedule", *args]) == 2
    assert time.monotonic() - t < 60
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("softmask schedule: ") and message in out.err, out
    assert out.err.count("\n") == 1, out.err  # one clear line, no traceback
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


@pytest.mark.slow
def test_schedule_registers_cron_deployment_and_runs_it(ui, tmp_path):
    """Registration (cron + timezone read back through the API, upcoming runs at 03:00 Europe/Berlin), a run of the
    deployment triggered through the API with an overridden config and executed by the `schedule` process's runner,
    a bad-config run that fails fast, `softmask status` on what the run wrote, and SIGINT: the schedule is paused and
    everything it started stops. The registered workflow is the debug recipe cut to its preprocess stage, so that a
    real run fits in the test's time (with the deploy stage `schedule` would also start a Ray cluster for the runs to
    deploy to: the same LocalRayCluster that `softmask run` starts, tested in test_cli_interrupt.py)."""
    api = ui["api"]
    run_root = tmp_path / "artifacts"
    name = f"sched-{free_port()}"
    cli = Cli(["schedule", "--cron", "0 3 * * *", "--timezone", "Europe/Berlin", "--config", DEBUG,
               f"--run_root={run_root}", "--stages=[preprocess]", "--api-url", api, "--deployment-name", name],
              cli_env(ui["home"], PREFECT_RUNNER_POLL_FREQUENCY="1"), cwd=tmp_path)
    try:
        cli.wait_for(r"serving scheduled runs", timeout=240)
        dep = http_json("GET", f"{api}/deployments/name/softmask-scheduled/{name}")
        assert dep["entrypoint"] == "pipelines.scheduled.softmask_scheduled" and dep["paused"] is False
        [sched] = dep["schedules"]
        assert sched["active"] is True
        assert sched["schedule"]["cron"] == "0 3 * * *" and sched["schedule"]["timezone"] == "Europe/Berlin"
        registered = dep["parameters"]["config"]
        assert registered["run_root"] == str(run_root) and registered["stages"] == ["preprocess"]
        assert registered["name"] == "debug" and registered["preprocess"]["seq_len"] == 32  # the resolved recipe

        # the server's scheduler turns the cron schedule into upcoming runs: 03:00 in Berlin, whatever the UTC offset
        deadline = time.monotonic() + 90
        upcoming = []
        while not upcoming and time.monotonic() < deadline:
            upcoming = http_json("POST", f"{api}/flow_runs/filter", {
                "deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 5})
            time.sleep(2)
        assert upcoming, "the server scheduled no runs for the deployment"
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
        for fr in upcoming:
            start = datetime.datetime.fromisoformat(fr["expected_start_time"].replace("Z", "+00:00")).astimezone(berlin)
            assert (start.hour, start.minute) == (3, 0), fr["expected_start_time"]

        # run it now with an overridden config (another run root), and once with a config that cannot validate
        run_root = tmp_path / "triggered"
        override = {**registered, "run_root": str(run_root)}
        good = http_json("POST", f"{api}/deployments/{dep['id']}/create_flow_run",
                         {"parameters": {"config": override}, "name": "now-preprocess"})
        bad = http_json("POST", f"{api}/deployments/{dep['id']}/create_flow_run",
                        {"parameters": {"config": {**registered, "stages": ["train"]}}, "name": "now-bad-config"})
        states = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(states) < 2:
            for fr in (good, bad):
                got = http_json("GET", f"{api}/flow_runs/{fr['id']}")
                if got["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    states[fr["name"]] = got
            time.sleep(2)
        assert len(states) == 2, f"runs not finished: {sorted(states)}\n{cli.output(40)}"
        assert states["now-preprocess"]["state_type"] == "COMPLETED", (states["now-preprocess"]["state"],
                                                                       cli.output(40))
        assert states["now-bad-config"]["state_type"] == "FAILED", states["now-bad-config"]["state"]
        assert "stages: must be a non-empty prefix" in (states["now-bad-config"]["state"]["message"] or ""), \
            states["now-bad-config"]["state"]
        assert not (tmp_path / "artifacts").exists()  # the override reached the run

        latest = json.loads((run_root / "runs" / "latest.json").read_text())
        lineage = json.loads(Path(latest["lineage"]).read_text())
        [stage] = lineage["stages"]
        assert stage["stage"] == "preprocess" and stage["executed"] is True
        assert Path(stage["manifest"], "manifest.json").is_file()

        status = Cli(["status", f"--run_root={run_root}"], cli_env(ui["home"]), cwd=tmp_path)
        assert status.wait(60) == 0, status.output()
        assert f"run {latest['run_id']} (workflow 'debug')" in status.output()
        assert f"lineage    {latest['lineage']}" in status.output()
        assert any(line.split()[:1] == ["preprocess"] and stage["manifest"] in line and "executed=True" in line
                   for line in status.lines), status.output()

        t = cli.interrupt()
        assert cli.wait(60) == 0, cli.output(30)
        assert time.monotonic() - t < 60
        assert "schedule stopped" in cli.output()
        assert http_json("GET", f"{api}/deployments/{dep['id']}")["paused"] is True  # no runner: schedule paused
        assert cli.survivors() == []  # runner subprocesses, the Ray cluster: all gone
    finally:
        cli.kill()


def test_ui_stops_on_sigint_without_orphans(ui):
    cli = ui["cli"]
    assert cli.seen_pids, "the Prefect server process was not seen"
    t = cli.interrupt()
    assert cli.wait(60) == 0, cli.output(20)
    assert time.monotonic() - t < 30
    assert "Prefect server stopped" in cli.output()
    assert cli.survivors() == []
    assert not port_open(ui["port"])


def test_status_reports_runs_and_missing_runs(tmp_path, capsys):
    """`softmask status` in-process on a lineage written by pipelines.lineage (no servers needed)."""
    from pipelines import cli, lineage

    root = str(tmp_path / "art")
    assert cli.main(["status", f"--run_root={root}"]) == 1
    assert "no runs under" in capsys.readouterr().err
    stages = [{"stage": "preprocess", "key": "k1", "dir": f"{root}/datasets/k1", "manifest": f"{root}/datasets/k1",
               "executed": False, "finished_at": "2026-01-01T00:00:00Z"},
              {"stage": "train", "key": "k2", "dir": f"{root}/train/k2", "export": f"{root}/train/k2/output/export",
               "executed": True, "finished_at": "2026-01-01T00:01:00Z"}]
    uri = lineage.write_lineage(root, "run1", {"run_id": "run1", "config": {"name": "demo"}, "stages": stages})
    lineage.write_lineage(root, "run2", {"run_id": "run2", "config": {"name": "other"}, "stages": stages[:1]})
    assert cli.main(["status", f"--run_root={root}", "--run_id=run1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run run1 (workflow 'demo')" and out[1].split() == ["lineage", uri]
    assert out[2].split()[:3] == ["preprocess", "key=k1", "executed=False"] and f"{root}/datasets/k1" in out[2]
    assert out[3].split()[:3] == ["train", "key=k2", "executed=True"] and f"{root}/train/k2/output/export" in out[3]
    assert cli.main(["status", f"--run_root={root}"]) == 0  # default: the latest run
    assert capsys.readouterr().out.startswith("run run2 (workflow 'other')")
    assert cli.main(["status", f"--run_root={root}", "--run_id=nope"]) == 1
    assert "no lineage for run nope" in capsys.readouterr().err
