"""The decoding benchmarks' settings and input checks (benchmarks/bench_decode.py, benchmarks/threshold_curve.py,
benchmarks/plot_decode.py): what each named setting decodes, bad arguments refused in one line before any model or
evaluator loads, and the plot's points over sampling seeds."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_decode  # noqa: E402
import plot_decode  # noqa: E402
import threshold_curve  # noqa: E402


def test_parallel_settings_are_random_order_with_fewer_steps():
    assert bench_decode.SETTINGS["dual-x4"] == dict(algorithm="ancestral", cache="dual", tokens_per_step=4)
    names = threshold_curve.settings([0.9], [2, 8])
    assert list(names) == ["plain", "plain-x2", "plain-x8", "confidence", "thr0.9"]
    assert names["plain-x8"] == dict(algorithm="ancestral", tokens_per_step=8)
    assert threshold_curve.settings([0.9]).keys() == {"plain", "confidence", "thr0.9"}


@pytest.mark.parametrize("extra, message", [
    (["--parallel", "1"], "--parallel must be tokens per step in (1, --length]"),
    (["--parallel", "128"], "--parallel must be tokens per step in (1, --length]"),
    (["--thresholds", "1.5"], "--thresholds must be in (0, 1]"),
])
def test_threshold_curve_refuses_bad_arguments_naming_them(tmp_path, capsys, extra, message):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")  # only its presence is checked before the arguments
    with pytest.raises(SystemExit) as e:
        threshold_curve.main(["--arm", f"sm={export}", "--tokenizer", str(tmp_path), "--length", "64", *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_threshold_curve_refuses_a_missing_export(tmp_path, capsys):
    with pytest.raises(SystemExit):
        threshold_curve.main(["--arm", f"sm={tmp_path / 'nothing'}", "--tokenizer", str(tmp_path)])
    assert "no export (config.json)" in capsys.readouterr().err


def test_the_plot_averages_a_setting_over_seed_runs_and_keeps_a_single_run_as_is():
    def row(setting, tps, ppl):
        return {"length": 256, "soft_mask": True, "setting": setting, "tokens_per_s": tps, "gen_ppl": ppl}

    runs = {"runs": [{"results": [row("plain", 100.0, 2000.0), row("dual", 600.0, 2100.0)]},
                     {"results": [row("plain", 120.0, 2200.0), row("dual", 700.0, 1900.0)]}]}
    got = {p["setting"]: p for p in plot_decode.points(runs)}
    assert got["plain"]["tokens_per_s"] == 110.0 and got["plain"]["gen_ppl"] == 2100.0 and got["plain"]["n"] == 2
    assert abs(got["dual"]["gen_ppl_sd"] - 141.42) < 0.01  # sample sd of 2100 and 1900
    single = plot_decode.points({"results": [row("plain", 100.0, 2000.0)]})
    assert single == [{**row("plain", 100.0, 2000.0), "tokens_per_s_sd": 0.0, "gen_ppl_sd": 0.0, "n": 1}]


def test_the_plot_refuses_a_file_without_rows(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(SystemExit):
        plot_decode.main(["--results", str(empty), "--out", str(tmp_path / "x.png")])
    assert "holds no 'results' rows" in capsys.readouterr().err
