"""benchmarks/toy_learning.py's training time: the median logged iteration time x iterations."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import toy_learning  # noqa: E402


def test_training_time_is_the_median_iteration_times_the_iterations(tmp_path):
    # iteration 0 includes the base evaluation (slow); the last record is the final evaluation
    records = [
        {"step": 0, "time": 100.0, "time/iteration_s": 30.0, "eval/toyworld_verifiable/mean": 0.3},
        {"step": 1, "time": 104.0, "time/iteration_s": 4.0},
        {"step": 2, "time": 109.0, "time/iteration_s": 5.0},
        {"step": 3, "time": 112.0, "time/iteration_s": 3.0},
        {"step": 4, "time": 130.0, "eval/toyworld_verifiable/mean": 0.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    timing = toy_learning._iteration_timing(tmp_path)
    assert timing == {"iterations": 4, "median_iteration_seconds": 4.5, "training_seconds": 18.0}
    assert toy_learning._logged_seconds(tmp_path) == 30.0


def test_a_log_without_iteration_times_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no time/iteration_s"):
        toy_learning._iteration_timing(tmp_path)
