"""BEVDet engines on the CPU: build -> load -> run, the int8 precision (int8 convs + int8 bev_pool_v2),
the detection loop over a synthetic world, and BEVDet-specific refusals.

A reduced BEVDet (6 cameras of 32x96, 8 depth bins, 16x16 BEV, narrow BEV encoder; the R50 image
backbone keeps its full width). Ops and int8 layers run on their references here (the kernels
are tested in tests/ops and tests/quant), except in the test that runs the int8 pooling through
Triton's interpreter.
"""

import json
import os

import pytest
import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
from bevdeploy.engine import Engine, build
from bevdeploy.engine.deploy import apply_precision, fold_batchnorms
from bevdeploy.engine.model_io import calibration_forward_loop, calibration_method_overrides
from bevdeploy.eval.detection import run_model
from bevdeploy.models import MODELS
from bevdeploy.quant.calibrate import CalibrationTable, calibrate
from bevdeploy.quant.sensitivity import sqnr_db
from bevdeploy.models.bevdet import HEAD_OUTPUTS, BEVPoolRanks
from tests._utils import ops_on_references_here

SMALL = dict(image_size=(32, 96), depth_bins=(1.0, 17.0, 2.0), grid_x=(-12.8, 12.8, 1.6), grid_y=(-12.8, 12.8, 1.6),
             fpn_out_channels=32, bev_channels=16, bev_layer_channels=(16, 32, 64), bev_neck_out_channels=32,
             share_conv_channels=16, head_conv_channels=16)
#: Minimum SQNR (dB) of the int8 engine's maps against the fp32 engine's (random weights, 3 calibration samples).
INT8_SQNR_FLOOR_DB = 20.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, num_scenes=2, samples_per_scene=2, seed=5, image_size=(64, 192), progress=False)
    return root, load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)


@pytest.fixture(scope="module")
def sample(world):
    """Network inputs of the world's first sample: image [1, 6, 3, 32, 96] and its geometry."""
    _, infos = world
    x = prepare_bevdet_inputs(infos[0], BEVDetPreprocess(input_size=SMALL["image_size"]))
    return {k: v[None] for k, v in x.items()}


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory):
    with ops_on_references_here():
        path = build("bevdet-r50-cbgs", "fp32", out=tmp_path_factory.mktemp("fp32") / "bevdet.engine",
                     model_overrides=SMALL, progress=False)
    return Engine.load(path, device="cpu")


def _model():
    torch.manual_seed(0)  # build() seeds 0 before creating random weights
    return MODELS["bevdet-r50-cbgs"](**SMALL).eval()


def test_fp32_engine_equals_eager_model(fp32_engine, sample, ops_on_references):
    engine, model = fp32_engine, _model()
    meta = engine.metadata
    assert meta["family"] == "bevdet" and meta["outputs"] == list(HEAD_OUTPUTS) and meta["bev_shape"] is None
    # the engine runs the head's branches as one conv stack; the eager model below has them unfused
    assert meta["head_branches_fused"] == ["pts_bbox_head.task_heads.0"]
    P = 6 * 8 * 2 * 6 + 16 * 16  # frustum points (cams x depth bins x 2x6 features) + voxels
    assert meta["inputs"]["ranks_bev"] == {"shape": [P], "dtype": "int32"}
    assert meta["inputs"]["interval_lengths"] == {"shape": [256], "dtype": "int32"}
    geometry = [sample[k] for k in GEOMETRY_KEYS]
    ranks = engine.prepare(*geometry)
    for a, b in zip(ranks, model.prepare(*geometry)):
        assert torch.equal(a, b)
    assert engine.prepare(*geometry) is ranks  # cached per camera geometry
    inputs = {"image": sample["image"], **dict(zip(BEVPoolRanks._fields, ranks))}
    with torch.no_grad():
        ref = model(**inputs)
    out = engine(**inputs)
    assert list(out) == list(HEAD_OUTPUTS)
    for k in HEAD_OUTPUTS:  # BN folding reorders float math: near-equal, not bit-equal
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    (boxes, scores, labels), = engine.decode(out, sample["bev2lidar"])
    (rboxes, rscores, rlabels), = model.decode(ref, sample["bev2lidar"])
    assert boxes.shape[1] == 9 and len(boxes) == len(rboxes) > 0
    # near-equal scores of random weights may swap places after NMS: match boxes as sets
    assert torch.cdist(boxes.double(), rboxes.double()).amin(dim=1).max() < 1e-3


def test_detection_loop_runs_engine_and_model_alike(world, fp32_engine, ops_on_references):
    _, infos = world
    model = _model()
    run_e = run_model(fp32_engine, infos, "bevdet-r50-cbgs", torch.device("cpu"), progress=False)
    run_m = run_model(model, infos, "bevdet-r50-cbgs", torch.device("cpu"), progress=False)
    assert list(run_e.boxes) == [i["token"] for i in infos] == list(run_m.boxes)
    assert len(run_e.latencies_ms) == len(infos)
    for token, (b, s, lab) in run_m.boxes.items():
        eb, es, elab = run_e.boxes[token]
        assert len(b) == len(eb) > 0 and sorted(lab.tolist()) == sorted(elab.tolist())
        assert torch.cdist(torch.from_numpy(eb).double(), torch.from_numpy(b).double()).amin(dim=1).max() < 1e-3


def test_int8_engine_quantizes_up_to_the_head_and_pools_in_int8(world, fp32_engine, sample, tmp_path,
                                                                ops_on_references):
    root, _ = world
    calib = DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=3)
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "q.engine", model_overrides=SMALL, calib=calib,
                 progress=False)
    engine = Engine.load(path, device="cpu")
    meta = engine.metadata
    assert meta["calibration"]["num_samples"] == 3
    assert meta["calibration"]["amax"]["img_view_transformer.feat_point"] > 0
    # the convs reading the splatted BEV grid (sparse: entropy would clip its occupied cells) take its max
    overrides = calibration_method_overrides(_model())
    assert set(overrides) == {f"img_bev_encoder_backbone.layers.0.0.{c}" for c in ("conv1", "downsample")}
    assert meta["calibration"]["metadata"]["method_overrides"] == overrides
    folded = _model()
    fold_batchnorms(folded)
    minmax = calibrate(folded, calibration_forward_loop(world[1][:3], "bevdet-r50-cbgs", folded, torch.device("cpu"),
                                                        False), "minmax")
    for name in overrides:
        assert meta["calibration"]["amax"][name] == pytest.approx(minmax.amax[name], rel=1e-4), name
    precisions = dict(engine.layer_precisions)
    assert precisions["img_view_transformer (op)"] == "int8"
    assert precisions["img_backbone.conv1"] == "fp32"  # the stem (3 input channels) stays float by default
    for name in ("img_backbone.layer1.0.conv1", "img_neck.fpn_convs.0.conv", "img_view_transformer.depth_net",
                 "img_bev_encoder_backbone.layers.0.0.conv1", "img_bev_encoder_neck.conv.0"):
        assert precisions[name] == "int8", name
    head = [n for n, p in engine.layer_precisions if n.startswith("pts_bbox_head")]
    assert head and all(precisions[n] == "fp32" for n in head)  # the CenterPoint head stays float
    # its branches are fused after calibration and quantization: the table has the official names
    assert meta["head_branches_fused"] == ["pts_bbox_head.task_heads.0"]
    assert [n.split(" ")[0] for n in head] == ["pts_bbox_head.shared_conv.conv", "pts_bbox_head.task_heads.0.convs.0",
                                              "pts_bbox_head.task_heads.0.convs.1"]
    assert "pts_bbox_head.task_heads.0.heatmap.1" in meta["calibration"]["amax"]
    ranks = engine.prepare(*(sample[k] for k in GEOMETRY_KEYS))
    inputs = {"image": sample["image"], **dict(zip(BEVPoolRanks._fields, ranks))}
    out, ref = engine(**inputs), fp32_engine(**inputs)
    for k in HEAD_OUTPUTS:
        assert torch.isfinite(out[k]).all() and sqnr_db(ref[k], out[k]) > INT8_SQNR_FLOOR_DB, k
    # the same int8 deploy form with the head unfused, run eagerly: the fusion changes no map
    unfused = _model()
    fold_batchnorms(unfused)
    table = CalibrationTable.load(f"{path}.calib.json")
    apply_precision(unfused, "int8", scales={n: table.scale(n) for n in table.amax}, keep_float=meta["keep_float"],
                    fuse_heads=False)
    with torch.no_grad():
        eager = unfused(**inputs)
    for k in HEAD_OUTPUTS:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-4)
    # keep_float on the calibration point keeps the pooling float, the convs int8
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "k.engine", model_overrides=SMALL,
                 calib_table=str(tmp_path / "q.engine.calib.json"), keep_float=["img_view_transformer.feat_point"],
                 progress=False)
    kept = dict(Engine.load(path, device="cpu").layer_precisions)
    assert kept["img_view_transformer (op)"] == "fp32" and kept["img_view_transformer.depth_net"] == "int8"
    # the sensitivity ranking covers the convs and linears only (the calibration point has no int8 twin;
    # it crashed the ranking before); keep_float_below_db keeps what ranks below it float
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "s.engine", model_overrides=SMALL, calib=calib,
                 progress=False, keep_float_below_db=1000.0)
    ranking = json.loads((tmp_path / "s.engine.sensitivity.json").read_text())
    assert ranking and "img_view_transformer.feat_point" not in {r["layer"] for r in ranking}
    meta = Engine.load(path, device="cpu").metadata
    assert set(meta["keep_float_measured"]) == {r["layer"] for r in ranking}
    precisions = dict(meta["layer_precisions"])
    assert all(precisions[r["layer"]] != "int8" for r in ranking)
    assert precisions["img_view_transformer (op)"] == "int8"  # the pooling (not ranked) stays int8


def test_asymmetric_int8_engine_keeps_the_pooling_symmetric(world, fp32_engine, sample, tmp_path,
                                                            ops_on_references):
    """``asymmetric`` on BEVDet: the convs (ReLU inputs) get zero points, the int8 pooling input stays
    symmetric (its op has no zero point), the chain links through the FPN and the BEV encoder, and
    the engine stays above the int8 floor."""
    root, _ = world
    calib = DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=3)
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "a.engine", model_overrides=SMALL, calib=calib,
                 progress=False, asymmetric=True)
    engine = Engine.load(path, device="cpu")
    zps = engine.metadata["zero_points"]
    assert "img_view_transformer.feat_point" not in zps
    assert {"img_backbone.layer1.0.conv2", "img_bev_encoder_backbone.layers.0.0.conv2"} <= set(zps)
    assert dict(engine.layer_precisions)["img_view_transformer (op)"] == "int8"
    assert engine.metadata["int8_outputs"]
    ranks = engine.prepare(*(sample[k] for k in GEOMETRY_KEYS))
    inputs = {"image": sample["image"], **dict(zip(BEVPoolRanks._fields, ranks))}
    out, ref = engine(**inputs), fp32_engine(**inputs)
    for k in HEAD_OUTPUTS:
        assert torch.isfinite(out[k]).all() and sqnr_db(ref[k], out[k]) > INT8_SQNR_FLOOR_DB, k


def test_int8_pooling_through_triton_interpreter_matches_float_pooling(sample, monkeypatch):
    """The view transformer's int8 path (quantize kernel + int8 bev_pool_v2 kernel) against its float path."""
    from bevdeploy.ops._utils import interpreter_enabled

    if torch.cuda.is_available():
        pytest.skip("CPU-only test: on a GPU the kernels run natively in the engine tests")
    if os.environ.get("BEVDEPLOY_TEST_INTERPRET", "1") == "0":
        pytest.skip("the interpreter is off for this run (BEVDEPLOY_TEST_INTERPRET=0)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_enabled()
    model = _model()
    g = torch.Generator().manual_seed(4)
    ranks = model.prepare(*(sample[k] for k in GEOMETRY_KEYS))
    lss = model.img_view_transformer
    x = torch.randn(6, 32, 2, 6, generator=g)
    with torch.no_grad():
        ref = lss(x, 1, ranks)
        depth, feat = lss.lift(x, 1)
        lss.feat_scale = float(feat.abs().amax()) / 127
        out = lss(x, 1, ranks)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all() and sqnr_db(ref, out) > 25.0  # 8-bit depth and features


def test_step_is_bevformer_only(fp32_engine):
    with pytest.raises(ValueError, match="bevdet engine"):
        fp32_engine.step({"use_prev_bev": torch.zeros(1)})
