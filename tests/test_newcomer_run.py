"""The newcomer's path: `softmask run` on a host that never ran Ray (HOME, and so ~/.ray, is an empty folder) works
the first time and reads cleanly: the stage lines, the training progress, then the summary (the model, the
evaluation in one line, the served model's soft-mask state, the reply) as the last thing printed; no traceback, no
Ray or Serve internals, no repeated line; nothing left running. A machine whose ~/.ray already holds a token (every
developer's and CI's after their first Ray) cannot hide a fresh-host failure from this test."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from cli_proc import ROOT, Cli, cli_env

pytestmark = pytest.mark.slow
PROGRESS = re.compile(r"^(train|val) +step |^preprocess: ")  # progress lines: each differs by its step / percentage
NOISE = re.compile(r"Traceback|\(raylet\)|\(pid=|WARNING|Found multiple active Ray instances|ServeController|"
                   r"INFO \d|deprecat", re.IGNORECASE)
# The one line still let through: faiss (under mauve-text's k-means) prints it from C whenever MAUVE clusters fewer
# than 39 points per centroid, as the small recipes do; quieting it is models.evaluation.mauve_features' to do.
KNOWN = re.compile(r"^WARNING clustering \d+ points to \d+ centroids: please provide at least \d+ training points$")


def test_first_run_on_a_fresh_host_reads_cleanly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    real_home = Path.home()
    # what a fresh host shares with this one: the downloaded corpus and evaluator (a cache, not Ray state) and the
    # DeepSpeed ops built by `make install`
    cache = os.environ.get("SOFTMASK_CACHE") or str(real_home / ".cache" / "softmask")
    ops = os.environ.get("TORCH_EXTENSIONS_DIR") or str(real_home / ".cache" / "torch_extensions")
    env = cli_env(tmp_path / "prefect-home", HOME=str(home), SOFTMASK_CACHE=cache, TORCH_EXTENSIONS_DIR=ops)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cli = Cli(["run", "--config", str(ROOT / "configs/debug_cpu.yaml"), f"--run_root={tmp_path}/run"], env,
              cwd=tmp_path)
    try:
        rc = cli.wait(900)
    finally:
        cli.kill()
    out = cli.output()
    assert rc == 0, cli.output(60)
    assert (home / ".ray" / "auth_token").is_file(), "the local cluster did not create the token it needs"
    lines = [line for line in cli.lines if line.strip() and not KNOWN.match(line)]
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, out
    repeated = {line: n for line, n in Counter(ln for ln in lines if not PROGRESS.match(ln)).items() if n > 1}
    assert not repeated, out
    summary = lines[next(i for i, ln in enumerate(lines) if ln.startswith("=== softmask run finished")):]
    assert summary[-1].startswith("endpoint: http://127.0.0.1:") and "stopping now" in summary[-1], out
    about = {ln.split(":")[0].strip() for ln in summary}
    assert {"model", "eval", "soft-mask", "request", "reply"} <= about, out
    assert any(ln.startswith("[train] started") for ln in lines) and any(ln.startswith("train step") for ln in lines)
    assert cli.survivors() == [], "processes left behind"
