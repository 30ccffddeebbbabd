"""Results-file bookkeeping of the bench tables (which rows an ``--append`` run keeps; the strict-FP32 timing flags;
the note of an engine writing NaN); no GPU."""

import json

import pytest

import torch

from bevdeploy.eval.bench_models import earlier_rows, nonfinite_note


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


def test_strict_fp32_timing_turns_tf32_off_and_restores_the_flags():
    """The PyTorch row's strict-FP32 figure must run with TF32 off for convs and matmuls, and leave
    torch's flags as they were (the default-flag row and the engines after it run unchanged)."""
    import torch

    from bevdeploy.eval.bench_det2d import _median_ms_without_tf32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    seen = []
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        ms = _median_ms_without_tf32(
            lambda: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)),
            torch.device("cpu"), iters=3)
        assert ms >= 0.0 and seen and set(seen) == {(False, False)}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)

        def boom():
            raise RuntimeError("forward failed")

        with pytest.raises(RuntimeError, match="forward failed"):
            _median_ms_without_tf32(boom, torch.device("cpu"), iters=1)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _CutHere(BaseException):
    """What a `timeout` kill looks like from inside: not an Exception, so no row's error handler takes it."""


def test_2d_table_keeps_the_pytorch_row_when_cut_in_the_first_build(tmp_path, monkeypatch, ops_on_references):
    import bevdeploy.engine as engine_pkg
    from bevdeploy.eval.bench_det2d import bench_det2d

    def cut(*args, **kwargs):
        raise _CutHere

    monkeypatch.setattr(engine_pkg, "build", cut)
    with pytest.raises(_CutHere):
        bench_det2d("yolox-x", ["fp16"], data="synthetic2d:2", batch=2, iters=1, out_dir=tmp_path, device="cpu",
                    work_dir=tmp_path / "engines",
                    model_overrides={"deepen_factor": 0.33, "widen_factor": 0.125, "image_size": (64, 96)})
    rows = json.loads((tmp_path / "cpu" / "yolox-x.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch"] and rows[0]["fps"] > 0 and rows[0]["batch"] == 2


def test_engine_rows_with_int8_dcn_and_fused_variants():
    from bevdeploy.eval.bench_models import engine_runs

    assert engine_runs(["fp16x2", "int8-fp16"]) == [("fp16x2", False, False, "fp16x2"),
                                                     ("int8-fp16", False, False, "int8-fp16")]
    assert [r[3] for r in engine_runs(["fp16x2", "int8-fp16"], int8_dcn=True, fused_epilogues=True)] == [
        "fp16x2", "fp16x2 (fused)", "int8-fp16", "int8-fp16 (fused)", "int8-fp16 (int8 DCN)"]
    assert engine_runs(["int8"], fused_epilogues=True)[1] == ("int8", False, True, "int8 (fused)")


def test_an_engine_writing_nan_or_inf_is_named_in_its_row_and_warned(capsys):
    good = {"boxes": torch.ones(2, 3), "scores": torch.zeros(4)}
    assert nonfinite_note("m", "fp16", good) is None and capsys.readouterr().err == ""
    bad = dict(good, scores=torch.tensor([0.0, float("nan")]), depth=torch.tensor([float("-inf")]))
    assert nonfinite_note("m", "fp16 (fused)", bad) == "NON-FINITE outputs ['scores', 'depth']"
    assert "WARNING: m fp16 (fused): the engine wrote non-finite values" in capsys.readouterr().err
