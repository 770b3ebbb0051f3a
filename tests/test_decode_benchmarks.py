"""The decoding benchmarks' settings and input checks (benchmarks/bench_decode.py, benchmarks/threshold_curve.py):
what each named setting decodes, and bad arguments refused in one line before any model or evaluator loads."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_decode  # noqa: E402
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
