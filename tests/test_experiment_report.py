"""The experiment report on a hand-made summary: one results.json record per run with the fields the docs promise,
seed statistics, and a verdict that calls a difference 'beyond seed spread' only past twice the pooled std."""
from __future__ import annotations

import json

import pytest

from pipelines.experiment_report import verdict, groups, record, write_results


def _report(ppl: float, gen: float, omega_s: float = 1e-6) -> dict:
    return {"validation": {"one_pass": {"ppl_bound": ppl}, "two_pass": {"ppl_bound": ppl - 0.1}},
            "sm_head": {"omega_s": omega_s, "omega_a": 6.66, "omega_b": -0.75, "gate_open": 0.02,
                        "share_h_below_0.75": 0.02},
            "sampling": [{"steps": 16, "gen_ppl": gen, "mauve": 0.5, "entropy": 4.0, "lambda_mean": 1e-7, "nfe": 17}],
            "reference": {"gen_ppl": 50.0, "entropy": 4.2}, "evaluator": {"description": "SmolLM2"},
            "config": {"val_rows": 8}}


def _rec(obj: str, budget: str, seed: int, ppl: float, gen: float, omega_s: float = 1e-6, warm: float = 0.0):
    name = f"{obj}-{budget}{warm if budget == 'warm' else ''}-s{seed}"
    return {"cell": {"objective": obj, "budget": budget, "seed": seed, "steps": 30, "init": "b", "init_omega_s": warm},
            "name": name, "export": f"/x/{name}", "train_s": 1.0, "run_dir": f"/nonexistent/{name}",
            "report": _report(ppl, gen, omega_s),
            "omega_grad": {"mean": 1e-8, "std": 1e-6, "batches": 4, "snr": 0.02, "omega_s": omega_s}
            if obj == "sm" else None}


def _summary(cells):
    return {"name": "t", "backend": "inprocess", "p_sm": 0.8, "wall_s": 1.0, "data_s": 0.0,
            "config": {"command": "softmask experiment --config c.yaml", "continue_train": {}, "train": {},
                       "grid": {"base_steps": 40, "base_seed": 0, "continued_steps": 30, "seeds": [0, 1, 2],
                                "objectives": ["binary", "sm"], "sm_warm_starts": [0.1]}},
            "model_config": {"flavor": "debug"}, "dataset": {"train_rows": 1, "validation_rows": 1, "seq_len": 8,
                                                             "train_tokens": 8, "tokenizer": "b", "vocab_size": 9},
            "extra_flop_fraction": {"binary": 0.0, "sm": 0.4}, "hardware": {"cpus": 2}, "cells": cells}


def test_records_and_verdicts(tmp_path):
    cells = [_rec("binary", "base", 0, 20.0, 900.0)]
    cells += [_rec("binary", "continued", s, 15.0 + 0.1 * s, 800.0 + s) for s in range(3)]
    cells += [_rec("sm", "continued", s, 14.0 + 0.1 * s, 801.0 + s, omega_s=2e-5 * (s + 1)) for s in range(3)]
    cells += [_rec("sm", "warm", s, 15.0 + 0.1 * s, 800.5 + s, omega_s=0.07, warm=0.1) for s in range(3)]
    recs = [record(c) for c in cells]
    sm0 = recs[4]
    assert (sm0["objective"], sm0["seed"], sm0["steps"], sm0["omega_s"]) == ("sm", 0, 30, 2e-5)
    assert sm0["metrics"]["val_ppl_two_pass"] == pytest.approx(13.9) and sm0["metrics"]["gen_ppl@nfe16"] == 801.0
    assert "omega_s" not in recs[1] and recs[1]["gate_open"] == 0.02
    g = groups([r for r in recs if r["budget"] != "base"])
    assert set(g) == {"binary", "sm", "sm-warm0.1"}
    ppl = verdict(g, "sm", "val_ppl")  # 1.0 apart, std 0.1: far beyond the spread
    assert "better by 1" in ppl and "**beyond seed spread**" in ppl
    gen = verdict(g, "sm", "gen_ppl@nfe16")  # 1.0 apart, std 1.0: within
    assert "worse by 1" in gen and "within seed spread" in gen
    assert "same by 0" in verdict(g, "sm-warm0.1", "mauve@nfe16")
    write_results(_summary(cells), str(tmp_path / "results.md"))
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in doc["runs"]] == [c["name"] for c in cells]
    md = (tmp_path / "results.md").read_text()
    assert "0 of 3 SM continuations from the paper's init ended with ω_s ≥ 0.1" in md
    assert "Warm start at ω_s = 0.1:** final ω_s 0.07, 0.07, 0.07" in md and "close part of the way" in md
    assert "Beyond seed spread: 2 of" in md  # val_ppl and its two-pass twin
    assert (tmp_path / "results_omega.png").is_file()
