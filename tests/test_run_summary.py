"""The summary `softmask run` prints: stage states, the model in one line, the evaluation in one line, the reply,
the artifacts and the log locations."""
from pipelines.run_summary import eval_line, sm_state_line, summary_lines

EVAL = {"validation": {"one_pass": {"ppl_bound": 601.7, "tokens": 8192}},
        "evaluator": {"name": "smollm2-135m"}, "reference": {"gen_ppl": 79.2, "entropy": 4.12},
        "sampling": [{"nfe": 32, "gen_ppl": 6821.9, "entropy": 4.55, "mauve": 0.0253, "samples": 8},
                     {"nfe": 64, "gen_ppl": 6253.0, "entropy": 4.52, "mauve": 0.031, "samples": 8}]}
RECORDS = {
    "preprocess": {"executed": False, "dir": "/a/datasets/k1", "manifest": "/a/datasets/k1"},
    "train": {"executed": True, "dir": "/a/train/k2", "export": "/a/train/k2/output/export", "plot": "/p.png",
              "output": "/a/train/k2/output", "started_at": "2026-12-07T06:31:34Z",
              "finished_at": "2026-12-07T06:34:10Z",
              "config": {"steps": 150, "model": {"flavor": "tiny", "overrides": {"n_layers": 4, "d_model": 256}},
                         "objective": {"kind": "sm"}, "scaling": {"num_workers": 2}}},
    "evaluate": {"executed": True, "dir": "/a/eval/k3", "report": "/a/eval/k3/eval.json", "summary": EVAL},
    "deploy": {"executed": True, "url": "http://127.0.0.1:8123", "request": {"prompt": "ROMEO:"},
               "model_card": {"soft_mask": {"omega_s": 0.2134, "omega_a": 6.9, "omega_b": -2.315, "k": 3}},
               "reply": {"choices": [{"text": " But soft"}], "nfe": 47, "usage": {}, "soft_mask": True,
                         "sm_feedback": {"lambda_mean": 0.0812, "gate_open": 0.37}}},
}


def test_eval_figures_in_one_line():
    line = eval_line(EVAL)
    assert "\n" not in line
    assert "val PPL <= 601.7" in line and "6822 @ 32 steps, 6253 @ 64 steps (real text 79)" in line
    assert "entropy 4.52 (real 4.12)" in line and "MAUVE 0.031 (8 samples)" in line
    assert eval_line({}) is None


def test_summary_says_what_ran_what_the_model_is_and_where_the_logs_are():
    text = "\n".join(summary_lines(RECORDS, "/a/runs/r/lineage.json", keep_serving=False, took_s=330,
                                  logs={"Ray": "/tmp/ray/session_1/logs", "cluster": None}, serve_port=0))
    assert "finished in 5.5 min" in text
    assert "preprocess skipped (complete)" in text and "train      ran" in text
    assert "model   : tiny flavor (n_layers 4, d_model 256), sm objective, 150 training steps on 2 Ray Train " \
           "worker(s) in 2.6 min" in text
    assert "eval    : val PPL" in text and "reply   : ' But soft'" in text
    assert "soft-mask: ω_s 0.213 (largest λ), gate opens below 2.31 nats of entropy, top-3 | this reply: mean λ " \
           "0.0812, gate open at 37 % of the masked positions it fed" in text
    assert "Ray logs     /tmp/ray/session_1/logs" in text and "cluster logs" not in text
    assert "--port 8000" in text and "http://127.0.0.1:8123/v1/completions" in text


def test_sm_state_says_when_soft_masking_has_not_engaged():
    dep = RECORDS["deploy"]
    fresh = {"deploy": {**dep, "model_card": {"soft_mask": {"omega_s": 1e-6, "omega_a": 6.66, "omega_b": -0.75,
                                                             "k": 3}},
                        "reply": {**dep["reply"], "soft_mask": False, "sm_feedback": None}}}
    line = sm_state_line(fresh)
    assert "ω_s 1e-06" in line and "at its initial value" in line and "binary masking" in line
    assert sm_state_line({"deploy": {**dep, "model_card": {"soft_mask": None}}}).endswith("self-conditioning model)")
    assert sm_state_line({k: v for k, v in RECORDS.items() if k != "deploy"}) is None
