"""A `softmask run` that fails after it started its servers: one line naming the cause and the command to rerun,
exit 1, everything it started stopped, and no Ray instance of its own on the way out (the cleanup used to call
serve.shutdown() without a connection, which starts a throwaway local Ray)."""
from __future__ import annotations

from cli_proc import ROOT, Cli, cli_env


def test_failed_run_prints_one_line_and_leaves_nothing(tmp_path):
    home = tmp_path / "home"  # a host that never ran Ray: a Ray started anywhere below would create ~/.ray
    home.mkdir()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    # the cluster cannot start (no token where RAY_AUTH_TOKEN_PATH points): a crash after the Prefect server started
    env = cli_env(tmp_path / "prefect-home", HOME=str(home), RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-token"))
    cli = Cli(["run", "--config", str(ROOT / "configs/debug_cpu.yaml"), f"--run-root={tmp_path}/run",
               f"--tokenizer.sources=[{text}]", f"--preprocess.sources=[{{path: {text}}}]", "--serve.port=0"],
              env, tmp_path)
    try:
        rc = cli.wait(120)
    finally:
        cli.kill()
    out = cli.output()
    assert rc == 1, out
    last = cli.lines[-1]
    assert last.startswith("softmask run: failed: RuntimeError: RAY_AUTH_TOKEN_PATH="), out
    assert "traceback in " in last and f"rerun: softmask run --config {ROOT}/configs/debug_cpu.yaml" in last, last
    assert "Traceback" not in out, out
    assert not (home / ".ray").exists(), "a Ray instance was started on the way out"
    assert not any("raylet" in cmd or "gcs_server" in cmd for cmd in cli.seen_pids.values()), cli.seen_pids
    assert any("prefect" in cmd for cmd in cli.seen_pids.values()), cli.seen_pids  # it did start, and was stopped
    assert cli.survivors() == []


def test_cleanup_of_a_failed_run_opens_no_ray_connection(monkeypatch, capsys, tmp_path):
    """The cleanup after a failure before Ray was joined: nothing calls ray.init (serve.shutdown() would, and then
    start a local Ray of its own or attach to whichever cluster on the host started last)."""
    import ray

    from pipelines import cli

    calls = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k) or real_init(*a, **k))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))  # the cluster cannot start
    for var in ("RAY_ADDRESS", "PREFECT_API_URL", "SOFTMASK_TRACEBACK", "MAKELEVEL"):
        monkeypatch.delenv(var, raising=False)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    was_initialized = ray.is_initialized()
    rc = cli.main(["run", "--config", str(ROOT / "configs/debug_cpu.yaml"), f"--run-root={tmp_path}/run",
                   f"--tokenizer.sources=[{text}]", f"--preprocess.sources=[{{path: {text}}}]", "--serve.port=0",
                   "--use-prefect=false"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "failed: RuntimeError: RAY_AUTH_TOKEN_PATH=" in err, err
    assert calls == [] and ray.is_initialized() == was_initialized
