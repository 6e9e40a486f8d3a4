"""Metrics as text: no float noise, ints as ints, table columns aligned whatever the widths."""

from __future__ import annotations

import numpy as np

from cirlab.utils.report import format_metrics, format_table, format_value, main_metric_names


def test_values_lose_float_noise_and_ints_stay_ints():
    assert format_value(15.000000596046448) == "15.00"
    assert format_value(np.float32(15.000000596046448)) == "15.00"
    assert [format_value(v) for v in (3, np.int64(18), 0.0, 100.0, -0.5)] == ["3", "18", "0.00", "100.00", "-0.50"]
    assert [format_value(v) for v in (5e-05, 0.00123, float("nan"))] == ["5e-05", "0.00123", "nan"]
    summary = {"epoch": 3, "step": 18, "train_loss": 0.123456, "R@1": 15.000000596046448}
    assert format_metrics(summary) == "epoch 3  step 18  train_loss 0.12  R@1 15.00"
    assert format_metrics({"a": 1, "b": 2.0}, sep="\n") == "a 1\nb 2.00"


def _cell_ends(line: str, start: int) -> list[int]:
    """Offsets where a right-aligned cell ends, past the row-name column."""
    return [i for i in range(start, len(line)) if line[i] != " " and (i + 1 == len(line) or line[i + 1] == " ")]


def test_table_columns_stay_aligned_whatever_the_widths():
    rows = {
        "forward": {"dress/R@10": 12.5, "dress/R@50": 40.0, "avg": 26.25},
        "a much longer row name": {"dress/R@10": 100.0, "avg": 12345.678},  # no dress/R@50: "-"
        "x": {"R@1": 1, "dress/R@50": 0.5},
    }
    table = format_table(rows)
    lines = table.splitlines()
    first = len("a much longer row name")
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    header_ends = _cell_ends(lines[0], first)
    assert len(header_ends) == 4  # R@1, dress/R@10, dress/R@50, avg
    for line in lines[1:]:
        assert _cell_ends(line, first) == header_ends, table
        assert line[first:first + 2] == "  "  # the row names never run into the first column
    assert lines[0].split() == ["R@1", "dress/R@10", "dress/R@50", "avg"]  # metric_order, not first-seen
    assert lines[2].split()[-4:] == ["-", "100.00", "-", "12345.68"]
    assert lines[3].split() == ["x", "1", "-", "0.50", "-"]
    assert format_table({}) == ""


def test_main_metrics_put_the_select_metric_first_and_leave_breakdowns_out():
    names = ["dress/R@10", "avg/R@10", "R@1", "avg", "backward/R@1", "Rs@1"]
    assert main_metric_names(names, "avg") == ["avg", "avg/R@10", "R@1", "Rs@1"]
    assert main_metric_names(names) == ["avg/R@10", "R@1", "avg", "Rs@1"]
    assert main_metric_names(names, "dress/R@10")[0] == "dress/R@10"  # a select metric is shown even if nested
    assert main_metric_names(["R@1"], "missing") == ["R@1"]
