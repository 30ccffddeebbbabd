"""The accuracy flow (render -> train -> build -> score -> table) on a reduced BEVDet, on the CPU."""

from __future__ import annotations

import json

import pytest

from bevdeploy.eval.accuracy import main

from ..train.test_bevdet_train import SMALL


@pytest.mark.slow
def test_accuracy_stages_on_a_reduced_model(tmp_path, ops_on_references, capsys):
    common = ["--model", "bevdet-r50-cbgs", "--work-dir", str(tmp_path / "work"), "--train-data", "synthetic:2@1",
              "--eval-data", "synthetic:2@2", "--render-size", "90", "160", "--workers", "1",
              "--out", str(tmp_path / "results")]
    assert main(["--stage", "eval", *common]) == 2  # no checkpoint yet: a clear error
    assert "--stage train" in capsys.readouterr().err
    assert main(["--stage", "train", "--steps", "1", "--batch", "1", "--model-overrides", json.dumps(SMALL),
                 "--depth-weight", "0", *common]) == 0
    assert main(["--stage", "eval", "--precisions", "fp32", "--calib-frames", "2", *common]) == 0
    doc = json.loads((tmp_path / "results" / "cpu" / "accuracy-bevdet-r50-cbgs.json").read_text())
    assert [r["precision"] for r in doc["rows"]] == ["pytorch", "fp32"]
    fp32 = doc["rows"][1]
    assert {"nds", "map", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "dnds", "dmap", "fidelity_nds",
            "output_sqnr_db"} <= set(fp32)
    # the fp32 engine runs the same math as PyTorch: same boxes
    assert abs(fp32["dnds"]) < 1e-3 and fp32["output_sqnr_db"] > 60
    assert doc["rows"][0]["fps"] > 0 and doc["rows"][0]["fps_ratio"] == 1.0 and fp32["fps_ratio"] > 0
    assert doc["training"]["steps"] == 1 and doc["training"]["frames_in_world"] == 2
    assert "accuracy-bevdet-r50-cbgs" in str(list((tmp_path / "results" / "cpu").iterdir()))
    assert (tmp_path / "results" / "cpu" / "accuracy-bevdet-r50-cbgs.md").read_text().count("| fp32 |") == 1
    # --asymmetric: the zero-point row right after the symmetric int8-fp16 row (the fp32 row kept)
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--asymmetric", "--calib-frames", "2", "--keep-rows",
                 *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-bevdet-r50-cbgs.json").read_text())["rows"]
    by = {r["precision"]: r for r in rows}
    assert {"fp32", "int8-fp16", "int8-fp16 (asymmetric)"} <= set(by)
    assert by["int8-fp16 (asymmetric)"]["asymmetric"] is True and by["int8-fp16"]["asymmetric"] is False
    assert "error" not in by["int8-fp16 (asymmetric)"] and by["int8-fp16 (asymmetric)"]["int8_layers"] > 0
    # --qat-steps: the QAT row and, right after the PyTorch row, its float control (the same fine-tuning, no
    # fake quantization), scored like the PyTorch row
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--qat-steps", "1", "--qat-batch", "1",
                 "--qat-frames", "2", "--calib-frames", "2", *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-bevdet-r50-cbgs.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch", "pytorch (float control)", "int8-fp16", "int8-fp16 (QAT)"]
    control = rows[1]
    assert "error" not in control and control["qat_steps"] == 1 and control["qat_loss_first"] > 0
    assert control["dnds"] is not None and control.get("fps") is None and 0.0 <= control["fidelity_nds"] <= 1.0
    assert "pytorch (float control) row" in (tmp_path / "results" / "cpu" / "accuracy-bevdet-r50-cbgs.md").read_text()


def test_split_eval_keeps_rows_of_the_same_checkpoint_only(tmp_path):
    import argparse

    from bevdeploy.eval.accuracy import _earlier_rows

    args = argparse.Namespace(out=str(tmp_path), model="m")
    folder = tmp_path / "cpu"
    folder.mkdir()
    rows = [{"precision": "pytorch"}, {"precision": "fp16"}, {"precision": "int8"}]
    (folder / "accuracy-m.json").write_text(json.dumps({"checkpoint_sha256": "abc", "rows": rows}))
    assert _earlier_rows(args, "abc", {"int8"}) == [{"precision": "fp16"}]
    assert _earlier_rows(args, "other", {"int8"}) == []


def test_keep_rows_reads_the_tagged_file_of_the_same_checkpoint(tmp_path, capsys):
    """A 2D --keep-rows run appends to its own results file (the tag's) only if that file holds the same
    checkpoint's rows: another checkpoint's rows mixed into the table would sit under this run's training notes."""
    import argparse

    from bevdeploy.eval.accuracy import _same_weights_results

    args = argparse.Namespace(out=str(tmp_path), model="yolox-x", results_tag="percentile")
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "accuracy-yolox-x.json").write_text(json.dumps({"checkpoint_sha256": "abc", "rows": []}))
    assert _same_weights_results(args, "abc") is None  # the untagged file is another table
    (folder / "accuracy-yolox-x-percentile.json").write_text(json.dumps({"checkpoint_sha256": "old", "rows": []}))
    assert _same_weights_results(args, "abc") is None
    assert "another checkpoint" in capsys.readouterr().err
    assert _same_weights_results(args, "old")["checkpoint_sha256"] == "old"


@pytest.mark.slow
def test_accuracy_stages_of_a_2d_model(tmp_path, ops_on_references, capsys, monkeypatch):
    """2D: train on synthetic2d:N@1, the 2D bench rows on the held-out synthetic2d:M@2 (CPU: fp32 engine only)."""
    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    common = ["--model", "yolox-x", "--work-dir", str(tmp_path / "work"), "--train-data", "synthetic2d:6@1",
              "--eval-data", "synthetic2d:4@2", "--render-size", "90", "160", "--workers", "1",
              "--model-overrides", json.dumps({"deepen_factor": 0.33, "widen_factor": 0.125}),
              "--out", str(tmp_path / "results"), "--device", "cpu"]
    assert main(["--stage", "eval", *common]) == 2 and "--stage train" in capsys.readouterr().err
    assert main(["--stage", "train", "--steps", "2", "--batch", "2", "--image-size", "64", "96", *common]) == 0
    # scored at the size it was trained at; another size is refused
    assert main(["--stage", "eval", "--image-size", "96", "96", *common]) == 2
    assert "trained at (64, 96)" in capsys.readouterr().err
    assert main(["--stage", "eval", "--precisions", "fp32", "--calib-frames", "2", "--eval-batch", "2", "--iters", "1",
                 *common]) == 0
    doc = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x.json").read_text())
    assert [r["precision"] for r in doc["rows"]] == ["pytorch", "fp32"]
    pytorch, fp32 = doc["rows"]
    assert pytorch["data"] == "synthetic2d:4@2" and pytorch["images"] == 4 and pytorch["image_size"] == [64, 96]
    assert pytorch["fps"] > 0 and pytorch["fps_ratio"] == 1.0 and 0.0 <= pytorch["map"] <= 1.0
    # the fp32 engine runs the same math as PyTorch: same detections
    assert fp32["dmap"] == 0.0 and fp32["output_sqnr_db"] > 60 and fp32["batch"] == 2
    assert doc["training"]["steps"] == 2 and doc["training"]["frames_in_world"] == 6
    assert doc["eval_data"] == "synthetic2d:4@2" and doc["calib_images"] == 2
    md = (tmp_path / "results" / "cpu" / "accuracy-yolox-x.md").read_text()
    assert "DEPARTURE" in md and md.count("| yolox-x | fp32 |") == 1
    assert pytorch["map"] < 0.05 and "WEAK WEIGHTS" in md  # two training steps: the table says so on top
    # a variant run beside it: int8 rows built with SmoothQuant + measured keep-float, its own results file
    assert main(["--stage", "eval", "--precisions", "int8", "--calib-frames", "2", "--eval-batch", "2", "--iters", "1",
                 "--smooth-alpha", "0.5", "--keep-float-below", "1000", "--calib-method", "entropy",
                 "--results-tag", "smooth", *common]) == 0
    variant = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-smooth.json").read_text())
    int8 = variant["rows"][1]
    assert int8["precision"] == "int8" and int8["smooth_alpha"] == 0.5 and int8["keep_float_below_db"] == 1000.0
    assert int8["int8_layers"] == 0  # every ranked layer is below 1000 dB: all kept float
    assert int8["calib_method"] == "entropy"  # not YOLOX's default (percentile)
    variant_md = (tmp_path / "results" / "cpu" / "accuracy-yolox-x-smooth.md").read_text()
    assert "smooth_alpha=0.5" in variant_md and "int8 calibrated (entropy)" in variant_md
    assert [r["precision"] for r in json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x.json")
                                               .read_text())["rows"]] == ["pytorch", "fp32"]  # untouched
    # the (smoothed) row beside the plain int8-fp16 row of the same run: the chain reaches through the smoothing;
    # with QAT its QAT row starts from the smoothed calibration (and replaces the plain QAT row)
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--calib-frames", "2", "--eval-batch", "2",
                 "--iters", "1", "--smoothed-row", "0.5", "--qat-steps", "2", "--qat-batch", "2",
                 "--results-tag", "smoothrow", *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-smoothrow.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch", "pytorch (float control)", "int8-fp16", "int8-fp16 (smoothed)",
                                              "int8-fp16 (smoothed QAT)"]
    plain_row, smooth_row, smooth_qat = rows[2], rows[3], rows[4]
    assert plain_row["smoothing_folded"] is None and smooth_row["smooth_alpha"] == 0.5
    assert 0 < smooth_row["smoothing_folded"] and 0 < smooth_row["int8_writers"] <= plain_row["int8_writers"]
    assert smooth_qat["smooth_alpha"] == 0.5 and smooth_qat["qat_steps"] == 2
    assert smooth_qat["smoothing_folded"] == smooth_row["smoothing_folded"]
    # --bias-corrected-row: the plain and the smoothed builds again, their int8 biases corrected;
    # --float-identity-row: the smoothed build again, its residual identities added as floats
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--calib-frames", "2", "--eval-batch", "2",
                 "--iters", "1", "--smoothed-row", "0.5", "--bias-corrected-row", "--float-identity-row",
                 "--results-tag", "bc", *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-bc.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch", "int8-fp16", "int8-fp16 (smoothed)",
                                              "int8-fp16 (bias-corrected)", "int8-fp16 (smoothed, bias-corrected)",
                                              "int8-fp16 (smoothed, float identities)"]
    assert rows[1]["bias_correction_layers"] is None and all("error" not in r for r in rows)
    assert rows[3]["bias_correction_layers"] > 10 and rows[3].get("smooth_alpha") is None
    assert rows[4]["bias_correction_layers"] > 10 and rows[4]["smooth_alpha"] == 0.5
    identity = rows[5]
    assert identity["int8_chain"] == "float-identity" and identity["smooth_alpha"] == 0.5
    assert identity["bias_correction_layers"] is None and 0 < identity["int8_writers"] <= rows[2]["int8_writers"]
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--calib-frames", "2", "--eval-batch", "2",
                 "--iters", "1", "--qat-steps", "2", "--qat-batch", "2", "--qat-lr", "1e-4", "--results-tag", "qat",
                 *common]) == 0
    qat_doc = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-qat.json").read_text())
    assert [r["precision"] for r in qat_doc["rows"]] == ["pytorch", "pytorch (float control)", "int8-fp16",
                                                         "int8-fp16 (QAT)"]
    control, qrow = qat_doc["rows"][1], qat_doc["rows"][3]
    assert qrow["qat_steps"] == 2 and qrow["qat_batch"] == 2 and qrow["qat_lr"] == 1e-4 and "error" not in qrow
    assert qrow["qat_loss_first"] > 0 and qrow["int8_layers"] > 0 and "qat_data" not in qrow
    # the control: the same recipe in float, scored like the PyTorch row (fake quantization changes the first loss)
    assert "error" not in control and (control["qat_steps"], control["qat_batch"], control["qat_lr"]) == (2, 2, 1e-4)
    assert 0.0 <= control["map"] <= 1.0 and control["dmap"] is not None and control["fps"] is None
    # its first step sees the QAT row's first batch: the same loss up to the rounding of the fake quantization
    assert control["qat_loss_first"] > 0 and abs(control["qat_loss_first"] / qrow["qat_loss_first"] - 1) < 0.05
    qat_md = (tmp_path / "results" / "cpu" / "accuracy-yolox-x-qat.md").read_text()
    assert "6 training images" in qat_md and "pytorch (float control) row" in qat_md
    # --asymmetric: the zero-point row beside the symmetric one, and its QAT form instead of the symmetric QAT
    assert main(["--stage", "eval", "--precisions", "int8-fp16", "--calib-frames", "2", "--eval-batch", "2",
                 "--iters", "1", "--qat-steps", "1", "--qat-batch", "2", "--asymmetric", "--results-tag", "asym",
                 "--int8-dcn", *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-asym.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch", "pytorch (float control)", "int8-fp16",
                                              "int8-fp16 (asymmetric)", "int8-fp16 (asymmetric QAT)",
                                              "int8-fp16 (int8 DCN)"]
    assert all(r.get("asymmetric") is True and "error" not in r for r in rows[3:5]) and rows[4]["qat_steps"] == 1
    # --int8-dcn: its own row (YOLOX has no DCN: the plumbing only; CenterNet's neck is the real case)
    assert rows[5].get("int8_dcn") is True and not rows[5].get("asymmetric") and "error" not in rows[5]
    # --fused-epilogues: each precision again, built fused (YOLOX: its Focus stem reads the image as NHWC)
    assert main(["--stage", "eval", "--precisions", "fp32", "--fused-epilogues", "--eval-batch", "2", "--iters", "1",
                 "--results-tag", "fused", *common]) == 0
    rows = json.loads((tmp_path / "results" / "cpu" / "accuracy-yolox-x-fused.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["pytorch", "fp32", "fp32 (fused)"]
    assert rows[2].get("fused_epilogues") is True and "error" not in rows[2] and rows[2]["map"] == rows[1]["map"]
