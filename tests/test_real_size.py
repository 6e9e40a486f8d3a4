"""The real-size profile's --tiny mode runs every row (the same code as on a GPU), so the script cannot rot."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size.py"


def _script():
    import sys

    spec = importlib.util.spec_from_file_location("real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_size"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_profile_measures_every_row(tmp_path, capsys):
    module = _script()
    assert module.main(["--tiny", "--out", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 10 and all(r["status"].startswith("ok") for r in rows), rows
    assert all(r["median_s"] > 0 and r["per_second"] > 0 and r["peak_gb"] > 0 for r in rows)
    assert {"Bi-BLIP4CIR stage I", "re-ranking stage II", "RTD", "SPN stage 2"} <= {r["name"].split(" (")[0] for r in rows}
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row (after the title line)


def test_a_spent_budget_skips_the_remaining_rows_with_a_note(tmp_path):
    module = _script()
    assert module.main(["--tiny", "--budget", "0", "--out", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert all(r["status"].startswith("skipped") for r in rows)


def test_an_out_of_memory_row_is_recorded_and_the_run_goes_on():
    import torch

    module = _script()
    p = module.Profiler(torch.device("cpu"), budget_s=60, row_budget_s=5)

    def build():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    p.run("too big", 512, build, module.TINY)
    p.run("fine", 1, lambda: (lambda: None), module.TINY)
    assert [r.status for r in p.rows] == ["OOM at batch 512", "ok"]
    assert "OOM at batch 512" in p.table()
