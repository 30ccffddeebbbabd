"""scripts/diagnose_int8_2d.py on a reduced YOLOX: every variant it reports is measured (mAP, held-out loss,
SQNR), and the QAT variants come with what they must be judged against."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bevdeploy.models import MODELS
from bevdeploy.train import save_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "diagnose_int8_2d.py"


def _diagnose(tmp_path, monkeypatch, *flags: str, sensitivity: bool = False) -> dict:
    """The script on a random reduced YOLOX-x (2 calibration, 2 held-out images), with ``flags`` added."""
    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    overrides = {"deepen_factor": 0.33, "widen_factor": 0.125, "image_size": [64, 64]}
    torch.manual_seed(0)
    ckpt = save_checkpoint(MODELS["yolox-x"](**{**overrides, "image_size": (64, 64)}), tmp_path / "y.pth",
                           meta={"model_overrides": overrides})
    spec = importlib.util.spec_from_file_location("diagnose_int8_2d", SCRIPT)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    rc = diag.main(["--model", "yolox-x", "--checkpoint", str(ckpt), "--calib", "synthetic2d:4@1", "--calib-images",
                    "2", "--eval", "synthetic2d:2@2", "--batch", "2", "--timing-images", "2", "--device", "cpu",
                    "--methods", "minmax", *([] if sensitivity else ["--no-sensitivity"]), "--keep-worst", "--smooth-alphas", *flags,
                    "--out", str(tmp_path)])
    assert rc == 0
    return json.loads((tmp_path / "diagnose-int8-yolox-x.json").read_text())


def test_diagnosis_reports_qat_variants_with_their_float_control(tmp_path, monkeypatch, ops_on_references):
    report = _diagnose(tmp_path, monkeypatch, "--qat-steps", "1", "--qat-batch", "2", "--qat-loss", "task", "distill")
    names = [v["variant"] for v in report["variants"]]
    assert names[:2] == ["minmax, unchained, reference int8 math", "minmax, chained, reference int8 math"]
    assert names[2] == "float control: fine-tuned 1 steps, no quantization"  # before the task-loss QAT it controls
    assert names[3].startswith("minmax + QAT (distill loss) 1 steps x 2") and names[3].endswith("chained, reference int8 math")
    assert names[4].startswith("minmax + QAT (task loss) 1 steps x 2") and len(names) == 5
    for v in report["variants"]:
        assert 0.0 <= v["map"] <= 1.0 and v["heldout_loss"] > 0 and all(s == s for s in v["sqnr_db"].values())
    assert report["float_heldout_loss"] > 0
    md = (tmp_path / "diagnose-int8-yolox-x.md").read_text()
    assert "| float control: fine-tuned 1 steps, no quantization |" in md and "held-out loss" in md


def test_diagnosis_asymmetric_variants_and_qat_from_them(tmp_path, monkeypatch, ops_on_references):
    """--asymmetric: minmax with zero points, unchained and chained, and the QAT variant starts from them."""
    report = _diagnose(tmp_path, monkeypatch, "--asymmetric", "--qat-steps", "1", "--qat-batch", "2",
                       "--qat-loss", "distill", "--int8-dcn")
    names = [v["variant"] for v in report["variants"]]
    assert names[1:3] == ["minmax asymmetric, unchained, reference int8 math",
                          "minmax asymmetric, chained, reference int8 math"]
    # --int8-dcn: the chained variants again with int8 DCNs (YOLOX has none: the plumbing; CenterNet's neck)
    assert names[4:6] == ["minmax, chained, int8 DCN, reference int8 math",
                          "minmax asymmetric, chained, int8 DCN, reference int8 math"]
    assert names[-1].startswith("minmax asymmetric + QAT (distill loss) 1 steps")


def test_ranking_method_sets_the_sensitivity_keep_float_and_smoothing_scales(tmp_path, monkeypatch, ops_on_references):
    """--ranking-method percentile (YOLOX's build calibration): the ranking, keep-float and SmoothQuant variants
    use it, so they are the variants a `build --keep-float-below` / `--smooth-alpha` engine would run."""
    report = _diagnose(tmp_path, monkeypatch, "--methods", "minmax", "percentile", "--ranking-method", "percentile",
                       "--keep-worst", "1", "--smooth-alphas", "0.5", sensitivity=True)
    names = [v["variant"] for v in report["variants"]]
    assert report["ranking_method"] == "percentile" and report["sensitivity"]
    assert "percentile, chained, reference int8 math" in names
    assert "percentile, chained, keep float 1 worst, reference int8 math" in names
    assert names[-2:] == ["percentile, smoothed alpha 0.5, unchained, reference int8 math",
                          "percentile, smoothed alpha 0.5, chained, reference int8 math"]
    kept = next(v for v in names if "keep float 1" in v)
    assert [v["kept_float"] for v in report["variants"] if v["variant"] == kept] == [[report["sensitivity"][0]["layer"]]]
    md = (tmp_path / "diagnose-int8-yolox-x.md").read_text()
    assert "Worst layers alone in int8 (percentile scales)" in md
    with pytest.raises(SystemExit):
        _diagnose(tmp_path, monkeypatch, "--ranking-method", "entropy")  # not among --methods
