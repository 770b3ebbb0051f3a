"""The prepared one-GPU scripts run end to end on CPU at toy size ("leave the script ready and tested on CPU at toy
size"): the code benchmark (adaptation, SM and binary DoRA fine-tunes, HumanEval at 1/4 and 1/2 NFE, plain and with
the dual cache, JSON + loss plots) and the training sweep. Left out of `make test` (marked long); `make test-all` runs them."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes of CPU each: `make test-all`


def test_gpu_finetune_code_script_toy_run(tmp_path):
    env = {**os.environ, "TOY": "1", "OUT": str(tmp_path / "ft"), "PYTHON": sys.executable, "DECODE": "preset,dual"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_finetune_code.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ft-toy" / "result.json").read_text())
    assert report["adapt"]["steps_done"] >= 1
    for arm in ("sm", "binary"):
        he = report["ft"][arm]["humaneval"]
        assert set(he) == {"nfe_0.25", "nfe_0.5", "dual/nfe_0.25", "dual/nfe_0.5"}  # DECODE: preset and dual cache
        assert he["nfe_0.25"]["steps"] * 2 == he["nfe_0.5"]["steps"] == he["dual/nfe_0.5"]["steps"]
        assert he["nfe_0.5"]["total"] == he["nfe_0.5"]["passed"] + sum(
            n for s, n in he["nfe_0.5"]["statuses"].items() if s != "passed")
    assert all(Path(p).is_file() for p in report["plots"])


def test_gpu_train_sweep_script_toy_run_keeps_going_past_a_failed_run(tmp_path):
    """benchmarks/gpu_train_sweep.sh (the one-GPU training sweep) at toy size on CPU: one JSON line per run, a run
    that fails is recorded as failed and the next one still runs; each run reports MFU by both conventions."""
    result = tmp_path / "sweep.jsonl"
    env = {**os.environ, "TOY": "1", "RESULT": str(result), "PYTHON": sys.executable,
           "SWEEP": "bad:2:--objective,nonsense "
                    "bin:2:--objective,binary,--no-overflow-check,--compile-loss,--fused-adam,on"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train_sweep.sh")], env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    assert [d["name"] for d in lines] == ["bad", "bin"]
    assert lines[0]["failed"] is True
    ok = lines[1]
    assert ok["objective"] == "binary" and ok["check_grad_overflow"] is False and ok["compiled_loss"] is True
    assert ok["fused_adam"] is True  # the fused AdamW (auto on CUDA) steps under ZeRO-2 (here its CPU kernel)
    assert ok["steps_timed"] == 3
    assert ok["tokens_per_s"] > 0 and math.isfinite(ok["final_loss"])
    assert 0 < ok["masked_fraction"] < 1 and 0 < ok["mfu_palm"] < ok["mfu_6N"]
    assert "== bad" in (tmp_path / "sweep.err").read_text()


def test_recorded_runs_get_the_palm_mfu():
    """The PaLM-convention MFU of a recorded H200 run (small flavor: 162.3M parameters of which 77.3M are the input
    embedding and the output layer, 12 layers, d_model 768, seq 1024, padded vocabulary 50304): 6 x non-embedding
    parameters + 12 x layers x d_model x seq_len + the output layer on the masked half of the rows, per token."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import recompute_mfu

    rows = {r["name"]: r for r in recompute_mfu([str(REPO / "docs/gpu_runs/2026-11-28/train_sweep_2.jsonl")])}
    best = rows["bin-m64-closs"]
    by_hand = (6 * (162_286_083 - 2 * 50_304 * 768) + 12 * 12 * 768 * 1024 + 6 * 768 * 50_304 * 0.5)
    assert math.isclose(best["mfu_palm"], by_hand * 453_009.028 / 989e12, rel_tol=1e-6)
    assert round(best["mfu_palm"], 3) == 0.339 and round(best["mfu_6N"], 3) == 0.446  # the recorded 6N figure
    sm = rows["sm-m64-closs"]  # two-pass steps (80 %) also run a forward without gradients
    assert sm["mfu_palm"] < sm["mfu_palm_with_pass1"] < sm["mfu_with_pass1"]


def test_gpu_decode_script_toy_run(tmp_path):
    """benchmarks/gpu_decode.sh at toy size on CPU: the decoding benchmark on a random model, SM on and off, the dual
    cache computing fewer backbone positions than plain at the same NFE, and several positions per step (random order)
    taking fewer forwards, in the decoding benchmark and in the SM-vs-binary curve."""
    env = {**os.environ, "TOY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_decode.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    cost = json.loads(Path(summary["results"][0]).read_text())
    assert [(x["batch"], x["length"], x["block"]) for x in cost["rows"]] == [(1, 64, 16), (2, 64, 16)]
    assert all(x["full_ms"] > 0 and x["window_ms"] > 0 and x["bound"] > 0 for x in cost["rows"])
    curve = json.loads(Path(summary["results"][2]).read_text())
    assert set(curve["table"]) == {"plain", "plain-x4", "confidence", "thr0.9"}
    # 4 positions per step in random order: a quarter of the steps, so fewer forwards than one per position
    assert curve["table"]["plain-x4"]["sm"]["nfe"][0] <= 32 // 4 < curve["table"]["plain"]["sm"]["nfe"][0]
    assert all(set(v) == {"sm", "binary"} for v in curve["table"].values())
    assert {c["verdict"] for c in curve["comparisons"]} == {"not testable"}  # one export per arm: no seed spread
    assert (tmp_path / "threshold_curve.png").stat().st_size > 0
    report = json.loads(Path(summary["results"][1]).read_text())
    rows = {(x["setting"], x["soft_mask"]): x for x in report["results"]}
    assert set(rows) == {(s, sm) for s in ("plain", "dual", "dual-x2", "thr0.9") for sm in (True, False)}
    for sm in (True, False):
        assert rows[("dual", sm)]["nfe"] == rows[("plain", sm)]["nfe"]
        assert rows[("dual", sm)]["positions"] < rows[("plain", sm)]["positions"]
        assert rows[("dual-x2", sm)]["nfe"] <= 64 // 2 < rows[("dual", sm)]["nfe"]  # 2 positions per step
        assert rows[("dual-x2", sm)]["positions"] < rows[("dual", sm)]["positions"]
        assert all(math.isfinite(rows[(s, sm)]["gen_ppl"]) for s in ("plain", "dual", "dual-x2", "thr0.9"))
        assert all(0 <= rows[(s, sm)]["space_share"] <= 1 for s in ("plain", "dual", "dual-x2", "thr0.9"))
