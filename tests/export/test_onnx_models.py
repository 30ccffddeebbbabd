"""Whole models to ONNX (plugin nodes with inferred shapes), checked in onnxruntime against PyTorch."""

import onnx
import pytest

from bevdeploy import cli
from bevdeploy.export.onnx import check_onnx, example_model_inputs, export_model, plugin_nodes, register_plugin_schemas
from tests._utils import ops_on_references_here

pytest.importorskip("onnxruntime_extensions")

TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)
BEVDET_SMALL = dict(image_size=(32, 96), depth_bins=(1.0, 17.0, 2.0), grid_x=(-12.8, 12.8, 1.6),
                    grid_y=(-12.8, 12.8, 1.6), fpn_out_channels=32, bev_channels=16, bev_layer_channels=(16, 32, 64),
                    bev_neck_out_channels=32, share_conv_channels=16, head_conv_channels=16)


@pytest.fixture(autouse=True)
def _refs(ops_on_references):
    """Export and the PyTorch side run the ops' plain-PyTorch references."""


@pytest.fixture(scope="module")
def bevdet_onnx(tmp_path_factory):
    with ops_on_references_here():
        return export_model("bevdet-r50-cbgs", tmp_path_factory.mktemp("onnx") / "bevdet.onnx",
                            model_overrides=BEVDET_SMALL)


def _plugin_shapes(path):
    register_plugin_schemas()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    known = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    return {n.op_type: known.get(n.output[0]) for n in plugin_nodes(model)}


def test_bevdet_onnx_runs_in_onnxruntime_and_matches_pytorch(bevdet_onnx, capsys):
    path = bevdet_onnx
    shapes = _plugin_shapes(path)
    assert shapes == {"BEVPoolV2TRT": [1, 16, 16, 16]}  # [1, Y, X, C]: inferred by the plugin's schema
    from bevdeploy.models import MODELS

    inputs = example_model_inputs(MODELS["bevdet-r50-cbgs"](**BEVDET_SMALL))
    assert int(inputs["interval_lengths"].sum()) > 0  # the rig's cameras really pool points into the BEV
    assert cli.main(["export", "--check", str(path)]) == 0  # model and sizes come from the file's metadata
    out = capsys.readouterr().out
    assert "BEVPoolV2TRT" in out and "OK" in out


@pytest.mark.slow
def test_bevformer_tiny_onnx_runs_in_onnxruntime_and_matches_pytorch(tmp_path):
    path = export_model("bevformer-tiny", tmp_path / "tiny.onnx", model_overrides=TINY)
    shapes = _plugin_shapes(path)
    assert set(shapes) == {"MultiScaleDeformableAttnTRT", "RotateTRT"}
    assert all(s and all(d > 0 for d in s) for s in shapes.values())
    report = check_onnx(path)
    assert report["ok"], report["text"]
    assert report["plugins"]["MultiScaleDeformableAttnTRT"] == 3  # TSA, SCA, decoder cross-attention
    assert set(report["outputs"]) == {"bev_embed", "all_cls_scores", "all_bbox_preds"}
    assert all(o["sqnr_db"] > 80 for o in report["outputs"].values())  # fp32 both sides: rounding only


def test_check_reports_a_wrong_plugin(bevdet_onnx, monkeypatch):
    """A plugin that computes something else (here: BEVPool dropping half the channels) fails the check."""
    import bevdeploy.export.onnx as ox

    path = bevdet_onnx
    real = ox._plugin_impls

    def broken():
        impls = real()
        pool = impls["BEVPoolV2TRT"]

        def half(*a, **k):
            y = pool(*a, **k)
            y[..., ::2] = 0
            return y

        impls["BEVPoolV2TRT"] = half
        return impls

    monkeypatch.setattr(ox, "_plugin_impls", broken)
    report = check_onnx(path)
    assert not report["ok"] and "MISMATCH" in report["text"]


@pytest.mark.parametrize("name, overrides, plugins", [
    ("centernet-r18-dcn", {"image_size": (64, 96)}, {"ModulatedDeformableConv2dTRT": 3}),
    ("yolox-x", {"image_size": (64, 64), "deepen_factor": 0.33, "widen_factor": 0.125}, {}),
])
def test_2d_detector_onnx_runs_in_onnxruntime_and_matches_pytorch(name, overrides, plugins, tmp_path, capsys):
    """The 2D detectors export too (one image input, the head maps out); CenterNet's neck DCNs become the
    reference's ModulatedDeformableConv2dTRT nodes, whose list attributes the check passes to onnxruntime."""
    path = export_model(name, tmp_path / f"{name}.onnx", model_overrides=overrides)
    graph = onnx.load(str(path)).graph
    h, w = overrides["image_size"]
    assert [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input] == [("image", [1, 3, h, w])]
    report = check_onnx(path)
    assert report["ok"], report["text"]
    assert report["plugins"] == plugins
    varying = {n for n, o in report["outputs"].items() if not o["constant"]}
    # random weights: CenterNet's maps all vary; YOLOX's objectness map is flat (its prior bias), its boxes vary
    assert varying >= ({"heatmap", "wh", "offset"} if name.startswith("centernet") else {"bbox_preds"})
    assert cli.main(["export", "--check", str(path)]) == 0 and "OK" in capsys.readouterr().out
