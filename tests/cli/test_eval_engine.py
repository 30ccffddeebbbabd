"""``bevdeploy build`` -> ``bevdeploy eval --engine``: same numbers as the model, a results file the
devkit's own ``DetectionEval`` scores the same, the metrics JSON."""

import json

import pytest

from bevdeploy import cli
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.engine import build
from bevdeploy.eval.detection import evaluate
from tests._utils import ops_on_references_here

TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("world"), num_scenes=2, samples_per_scene=2, seed=3, image_size=(128, 192),
                    progress=False)
    return root, f"nuscenes:{root}@{SYNTHETIC_VERSION}"


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    with ops_on_references_here():
        return build("bevformer-tiny", "fp32", out=tmp_path_factory.mktemp("e") / "tiny.engine", model_overrides=TINY,
                     progress=False, device="cpu")


def test_eval_engine_equals_model_and_results_file_reproduces_nds(world, engine_path, tmp_path, capsys):
    root, data = world
    model = evaluate("bevformer-tiny", data, model_overrides=TINY, device="cpu", progress=False)
    assert "RANDOM weights" in capsys.readouterr().err
    results, metrics = tmp_path / "results.json", tmp_path / "metrics.json"
    rc = cli.main(["eval", "--engine", str(engine_path), "--data", data, "--device", "cpu", "--results", str(results),
                   "--metrics", str(metrics), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0 and "RANDOM weights" in err
    printed = json.loads(metrics.read_text())
    assert printed["NDS"] == pytest.approx(model["NDS"], abs=1e-6) and printed["mAP"] == pytest.approx(model["mAP"], abs=1e-6)
    for key in ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert f"{key}: " in out
    assert f"NDS: {printed['NDS']:.4f}" in out and "traffic_cone" in out and str(results) in out

    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    submission = json.loads(results.read_text())
    assert set(submission["meta"]) >= {"use_camera", "use_lidar"} and len(submission["results"]) == 4
    boxes = [b for recs in submission["results"].values() for b in recs]
    assert boxes and set(boxes[0]) == {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                                       "detection_score", "attribute_name"}
    nusc = NuScenes(version=SYNTHETIC_VERSION, dataroot=str(root), verbose=False)
    devkit = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(results), SYNTHETIC_SPLIT,
                           str(tmp_path / "devkit"), verbose=False)
    dk_metrics, _ = devkit.evaluate()
    assert dk_metrics.nd_score == pytest.approx(printed["NDS"], abs=1e-9)
    assert dk_metrics.mean_ap == pytest.approx(printed["mAP"], abs=1e-9)


def test_eval_refuses_a_checkpoint_with_an_engine_and_nothing_to_evaluate(engine_path, capsys):
    assert cli.main(["eval", "--engine", str(engine_path), "--checkpoint", "x.pth", "--data", "synthetic:1"]) == 2
    assert "--checkpoint applies to --model only" in capsys.readouterr().err
    assert cli.main(["eval", "--data", "synthetic:1"]) == 2
    assert "--model NAME, --engine FILE" in capsys.readouterr().err


def test_eval_refuses_a_corrupt_checkpoint_before_reading_the_data(tmp_path, monkeypatch, capsys):
    """``eval --model --checkpoint``: the model and its checkpoint come before the data, so a corrupt file is
    reported at once (a nuScenes-sized dataset would otherwise be read first)."""
    import bevdeploy.data.synthetic as synthetic

    def no_render(*args, **kwargs):
        raise AssertionError("the data was resolved before the checkpoint was read")

    monkeypatch.setattr(synthetic, "resolve_data_spec", no_render)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["eval", "--model", "bevformer-tiny", "--checkpoint", str(bad), "--data", "synthetic:50",
                     "-q"]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "internal error" not in err
