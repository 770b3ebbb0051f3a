"""The prepared one-GPU code benchmark runs end to end on CPU at toy size (issue 8: "leave the script ready and tested
on CPU at toy size"): adaptation, SM and binary DoRA fine-tunes, HumanEval at 1/4 and 1/2 NFE, JSON + loss plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_finetune_code_script_toy_run(tmp_path):
    env = {**os.environ, "TOY": "1", "OUT": str(tmp_path / "ft"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_finetune_code.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ft-toy" / "result.json").read_text())
    assert report["adapt"]["steps_done"] >= 1
    for arm in ("sm", "binary"):
        he = report["ft"][arm]["humaneval"]
        assert set(he) == {"nfe_0.25", "nfe_0.5"}
        assert he["nfe_0.25"]["steps"] * 2 == he["nfe_0.5"]["steps"]
        assert he["nfe_0.5"]["total"] == he["nfe_0.5"]["passed"] + sum(
            n for s, n in he["nfe_0.5"]["statuses"].items() if s != "passed")
    assert all(Path(p).is_file() for p in report["plots"])
