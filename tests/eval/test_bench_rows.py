"""Which rows of an earlier results file survive an ``--append`` run (pure bookkeeping, no GPU)."""

import json

import pytest

from bevdeploy.eval.bench_models import earlier_rows


def _row(precision, run, fps):
    return {"model": "m", "precision": precision, "fps": fps, "run": run, "command": f"cmd {run}"}


def test_append_keeps_unmeasured_precisions_with_their_own_pytorch_row(tmp_path):
    path = tmp_path / "m.json"
    rows = [_row("pytorch", "r1", 10), _row("fp16", "r1", 50), _row("int8", "r1", 40),
            _row("pytorch", "r2", 11), _row("fp32", "r2", 30)]
    path.write_text(json.dumps({"date": "r2", "command": "x", "rows": rows}))
    kept = earlier_rows(path, {"int8", "fp32"})
    # r1 keeps fp16 with its PyTorch row; r2 has no engine row left, so its PyTorch row goes too
    assert [(r["precision"], r["run"]) for r in kept] == [("pytorch", "r1"), ("fp16", "r1")]
    assert earlier_rows(path, {"fp16", "int8", "fp32"}) == []
    assert earlier_rows(tmp_path / "none.json", {"fp16"}) == []


def test_rows_without_run_stamps_count_as_the_files_run(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"date": "d0", "command": "old", "rows": [
        {"precision": "pytorch", "fps": 1}, {"precision": "fp16", "fps": 5}]}))
    kept = earlier_rows(path, {"int8"})
    assert [(r["precision"], r["run"], r["command"]) for r in kept] == [("pytorch", "d0", "old"), ("fp16", "d0", "old")]


def test_corrupt_results_file_is_named(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="m.json.*not JSON"):
        earlier_rows(path, {"fp16"})


def test_append_replaces_only_the_batches_measured_now(tmp_path):
    path = tmp_path / "m.json"
    rows = [dict(_row("pytorch", "r1", 10), batch=1), dict(_row("fp16", "r1", 50), batch=1),
            dict(_row("pytorch", "r1", 20), batch=4), dict(_row("fp16", "r1", 120), batch=4)]
    path.write_text(json.dumps({"date": "r1", "command": "x", "rows": rows}))
    kept = earlier_rows(path, {"fp16"}, batches={4})
    assert [(r["precision"], r["batch"]) for r in kept] == [("pytorch", 1), ("fp16", 1), ("pytorch", 4)]
    assert earlier_rows(path, {"fp16"}) == []  # no batches given: every batch is re-measured


def test_bench_batches_are_checked():
    from bevdeploy.eval.bench_models import bench_batches

    assert bench_batches(None) == [1] and bench_batches(4) == [4] and bench_batches([1, 4, 8]) == [1, 4, 8]
    for bad in (0, [1, 0], [], [2, 2], [1.5], True):
        with pytest.raises(ValueError, match="batch"):
            bench_batches(bad)
