"""2D detector engines on the CPU: build -> load -> run for YOLOX and CenterNet at reduced sizes.

fp32 engines must equal the eager model; int8 engines (backbone, neck and head convs int8, calibrated
on a synthetic COCO set) must stay above an SQNR floor against it. Ops and int8 layers run on their
references here (the kernels are tested in tests/ops and tests/quant).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bevdeploy.engine import Engine, build
from bevdeploy.eval.coco import run_det2d
from bevdeploy.models import MODELS
from bevdeploy.quant.sensitivity import sqnr_db

SMALL = {
    "yolox-x": dict(deepen_factor=0.33, widen_factor=0.125, image_size=(64, 64)),
    "centernet-r18-dcn": dict(image_size=(64, 64)),
}
#: Minimum SQNR (dB) of every int8 output against the eager fp32 model (random weights, 4 images).
INT8_SQNR_FLOOR_DB = 15.0
BATCH = 2


@pytest.fixture(scope="module")
def calib_spec(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BEVDEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
    from bevdeploy.data.det2d import resolve_det2d_spec

    resolve_det2d_spec("synthetic2d:4", progress=False)  # generated once, found again through the cache
    yield "synthetic2d:4"
    mp.undo()


def _eager(name):
    torch.manual_seed(0)  # build() seeds 0 before creating random weights
    return MODELS[name](**SMALL[name]).eval()


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 3, 64, 64, generator=g) * 4 - 2


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_fp32_engine_equals_eager(name, tmp_path, calib_spec, ops_on_references):
    path = build(name, "fp32", out=tmp_path / f"{name}.engine", model_overrides=SMALL[name], batch=BATCH,
                 progress=False)
    engine = Engine.load(path, device="cpu")
    assert engine.family == ("yolox" if name == "yolox-x" else "centernet")
    assert engine.input_spec == {"image": ((BATCH, 3, 64, 64), torch.float32)}
    x = _images()
    out = engine(image=x)
    eager = _eager(name)
    with torch.no_grad():
        ref = eager(x)
    assert list(out) == list(engine.output_names)
    for k in engine.output_names:
        torch.testing.assert_close(out[k], ref[k], atol=2e-4, rtol=2e-4, msg=lambda m: f"{k}: {m}")
    with pytest.raises(ValueError, match="static shape"):
        engine(image=x[:1])
    if name == "centernet-r18-dcn":  # the evaluation loop takes an engine; a short last batch is filled up
        import dataclasses

        from bevdeploy.data.det2d import resolve_det2d_spec

        data = dataclasses.replace(resolve_det2d_spec(calib_spec, progress=False), num_images=3)
        cpu = torch.device("cpu")
        results, _ = run_det2d(lambda im: engine(image=im), data, name, engine.metadata["model_config"],
                               batch=BATCH, device=cpu)
        expected, _ = run_det2d(eager, data, name, eager.config, batch=1, device=cpu)
        assert len(results) == len(expected) == 3 * 100
        assert [r["image_id"] for r in results] == [r["image_id"] for r in expected]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(results, expected)) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_engine_results_outlive_the_next_call(precision, tmp_path):
    """A CUDA-graph engine replays into static output buffers; each call's results must be its own float32
    tensors (an fp16 output's cast is the copy, a float32 output is cloned), untouched by the next call."""
    name = "centernet-r18-dcn"
    path = build(name, precision, out=tmp_path / "g.engine", model_overrides=SMALL[name], batch=BATCH,
                 progress=False)
    engine = Engine.load(path, device="cuda")
    first = engine(image=_images(0).cuda())
    kept = {k: v.clone() for k, v in first.items()}
    second = engine(image=_images(1).cuda())
    for k in engine.output_names:
        assert first[k].dtype == second[k].dtype == torch.float32, k
        assert first[k].data_ptr() != second[k].data_ptr(), k
        torch.testing.assert_close(first[k], kept[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(first["heatmap"], second["heatmap"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_bindings_replay_gives_the_calls_outputs_in_the_engines_own_buffers(tmp_path):
    """``bindings()`` + ``replay()``: the input written in place, the graph replayed, the outputs read from the
    graph's own buffers (fp16 for an fp16 engine) equal the call's float32 results on the same batch; the next
    replay on another batch overwrites them."""
    name = "centernet-r18-dcn"
    path = build(name, "fp16", out=tmp_path / "b.engine", model_overrides=SMALL[name], batch=BATCH, progress=False)
    engine = Engine.load(path, device="cuda")
    called = engine(image=_images(0).cuda())
    inputs, outputs = engine.bindings()
    assert list(inputs) == ["image"] and list(outputs) == list(engine.output_names)
    inputs["image"].copy_(_images(1).cuda())
    engine.replay()
    inputs["image"].copy_(_images(0).cuda())
    engine.replay()
    torch.cuda.synchronize()
    for k in engine.output_names:
        assert outputs[k].dtype == torch.float16, k
        # the same graph on the same batch (a kernel summing with atomics may round differently: not bit-exact)
        torch.testing.assert_close(outputs[k].float(), called[k], atol=1e-3, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    held = outputs["heatmap"].clone()
    inputs["image"].copy_(_images(1).cuda())
    engine.replay()
    torch.cuda.synchronize()
    assert not torch.equal(outputs["heatmap"], held)


def test_bindings_need_the_cuda_graph(tmp_path, ops_on_references):
    """A CPU engine (no CUDA graph) has no bindings to hand out nor a graph to replay: a clear error each."""
    name = "centernet-r18-dcn"
    engine = Engine.load(build(name, "fp32", out=tmp_path / "c.engine", model_overrides=SMALL[name], batch=BATCH,
                               progress=False), device="cpu")
    with pytest.raises(ValueError, match="without one.*call it instead"):
        engine.bindings()
    with pytest.raises(ValueError, match="no CUDA graph to replay"):
        engine.replay()


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_int8_engine_sqnr(name, tmp_path, calib_spec, ops_on_references):
    path = build(name, "int8", out=tmp_path / f"{name}-int8.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, calib_method="minmax", progress=False)
    engine = Engine.load(path, device="cpu")
    rows = dict(engine.layer_precisions)
    int8 = [n for n, p in rows.items() if p == "int8"]
    assert any(n.startswith("backbone.") for n in int8) and any(n.startswith("bbox_head.") for n in int8)
    if name == "centernet-r18-dcn":
        assert any(n.startswith("neck.") and n.endswith("(op)") for n in rows)  # the DCN, float, says so
        assert not any(n.startswith("neck.") and "ConvTranspose" in n for n in int8)
    assert (tmp_path / f"{name}-int8.engine.calib.json").is_file()
    _assert_int8_floor(engine, name)


def test_the_2d_detectors_calibrate_without_the_kl_threshold_by_default():
    """YOLOX's SiLU activations and CenterNet's trained heatmap lose to the KL threshold, and YOLOX's PAN
    outliers to the max (see ``default_calibration_method``); the BEV families keep TensorRT's entropy
    method, fp8 the max."""
    from bevdeploy.engine.model_io import default_calibration_method

    assert default_calibration_method("yolox") == "percentile"  # measured on its trained checkpoint (H100)
    assert default_calibration_method("centernet") == "minmax"  # measured on its trained checkpoint (H100)
    assert default_calibration_method("bevdet") == default_calibration_method("bevformer") == "entropy"
    assert default_calibration_method("bevformer", fp8=True) == default_calibration_method("yolox", fp8=True) == "minmax"


def _assert_int8_floor(engine, name):
    """Every output of an int8 engine of the reduced model is finite and above the int8 SQNR floor vs eager."""
    x = _images(1)
    out = engine(image=x)
    with torch.no_grad():
        ref = _eager(name)(x)
    for k in engine.output_names:
        assert torch.isfinite(out[k]).all(), k
        db = sqnr_db(ref[k], out[k].float())
        precision = engine.metadata["precision"]
        assert db >= INT8_SQNR_FLOOR_DB, f"{name} {precision} {k}: SQNR {db:.1f} dB < {INT8_SQNR_FLOOR_DB}"


def test_yolox_int8_engine_calibrates_by_the_percentile_unless_told(tmp_path, calib_spec, ops_on_references):
    """A YOLOX build without ``calib_method`` takes the family's default (the 99.99th percentile; entropy put a
    trained YOLOX-x's box outputs at 4 dB, and the max lost 0.49 mAP on another checkpoint, H100) and records
    it in the engine's table."""
    name = "yolox-x"
    path = build(name, "int8", out=tmp_path / "y.engine", model_overrides=SMALL[name], batch=BATCH, calib=calib_spec,
                 progress=False)
    engine = Engine.load(path, device="cpu")
    assert engine.metadata["calibration"]["method"] == "percentile"
    _assert_int8_floor(engine, name)


def test_the_image_reading_stems_are_the_convs_kept_float():
    """The int8 build keeps the convs reading the camera image float: the 3-channel stems and YOLOX's
    Focus conv on the 12-channel space-to-depth; nothing past the stem qualifies."""
    from bevdeploy.engine.model_io import image_input_convs

    assert image_input_convs(_eager("yolox-x")) == ["backbone.stem.conv.conv"]
    assert image_input_convs(_eager("centernet-r18-dcn")) == ["backbone.conv1"]


def test_yolox_int8_fp16_engine_chains_int8(tmp_path, calib_spec, ops_on_references):
    """The int8-fp16 YOLOX engine with the chain (the build's default): every int8 conv but the head's
    predictors writes int8 codes (recorded in the metadata and in the layer reports), the engine loads
    and runs, its outputs stay above the un-chained engine test's floor."""
    name = "yolox-x"
    path = build(name, "int8-fp16", out=tmp_path / "c.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, progress=False)
    engine = Engine.load(path, device="cpu")
    int8 = {n for n, p in engine.layer_precisions if p == "int8"}
    writers = set(engine.metadata["int8_outputs"])
    predictors = {f"bbox_head.multi_level_conv_{k}.{i}" for k in ("cls", "reg", "obj") for i in range(3)}
    assert predictors <= int8 and writers == int8 - predictors and len(writers) == 73
    for n in ("backbone.stage2.1.blocks.0.conv2.conv", "backbone.stage4.1.conv1.conv", "neck.reduce_layers.0.conv",
              "neck.out_convs.0.conv", "bbox_head.multi_level_reg_convs.2.1.conv"):
        assert n in writers, n
    _assert_int8_floor(engine, name)


def test_keep_float_below_keeps_exactly_the_layers_the_sensitivity_ranks_below_the_threshold(tmp_path, calib_spec,
                                                                                             ops_on_references):
    """``keep_float_below_db``: the layers whose alone-in-int8 SQNR (the written sensitivity report) is
    below the threshold stay float, are recorded, and every other calibrated layer is still int8."""
    import json

    name = "yolox-x"
    probe = build(name, "int8", out=tmp_path / "probe.engine", model_overrides=SMALL[name], batch=BATCH,
                  calib=calib_spec, progress=False, sensitivity=True)
    ranking = json.loads(Path(f"{probe}.sensitivity.json").read_text())
    worst = sorted(r["sqnr_db"] for r in ranking)
    threshold = (worst[2] + worst[3]) / 2  # between the 3rd and 4th worst: exactly three layers below
    path = build(name, "int8", out=tmp_path / "k.engine", model_overrides=SMALL[name], batch=BATCH, calib=calib_spec,
                 progress=False, keep_float_below_db=threshold)
    meta = Engine.load(path, device="cpu").metadata
    below = {r["layer"] for r in ranking if r["sqnr_db"] < threshold}
    assert len(below) == 3 and set(meta["keep_float_measured"]) == below and meta["keep_float_below_db"] == threshold
    assert below <= set(meta["keep_float"])
    precisions = dict(meta["layer_precisions"])
    assert all(precisions[n] != "int8" for n in below)
    assert meta["int8_layers"] == Engine.load(probe, device="cpu").metadata["int8_layers"] - 3
    with pytest.raises(ValueError, match="finite number of dB"):
        build(name, "int8", out=tmp_path / "bad.engine", model_overrides=SMALL[name], batch=BATCH, calib=calib_spec,
              progress=False, keep_float_below_db=float("nan"))


def test_smoothed_int8_yolox_engine_builds_records_and_runs(tmp_path, calib_spec, ops_on_references):
    """``smooth_alpha``: every int8 candidate conv but the kept-float stem gets a ChannelScale before it,
    the smoothed names are recorded, the chain folds most divisors into their producers (their layers read
    int8 codes: ``smoothing_folded``, a subset), the engine runs at the floor."""
    name = "yolox-x"
    path = build(name, "int8-fp16", out=tmp_path / "s.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, progress=False, smooth_alpha=0.5)
    engine = Engine.load(path, device="cpu")
    meta = engine.metadata
    assert meta["smooth_alpha"] == 0.5 and meta["smoothed_layers"]
    assert "backbone.stem.conv.conv" not in meta["smoothed_layers"]
    int8 = {n for n, p in meta["layer_precisions"] if p == "int8"}
    assert int8 and all(n.endswith(".1") for n in int8)  # the smoothed layers, under their new names
    folded = set(meta["smoothing_folded"])
    assert folded < set(meta["smoothed_layers"])
    assert "backbone.stage1.0.conv" not in folded  # its producer, the stem, is float
    # as in tests/quant/test_int8_chain_yolox.py (its UNFOLDED: the stem's reader multiplies a float)
    assert len(folded) == 81 and len(meta["smoothed_layers"]) == 82
    assert len(meta["int8_outputs"]) == 73  # as unsmoothed: the chain links through the folded divisors
    _assert_int8_floor(engine, name)
    with pytest.raises(ValueError, match="smooth_alpha"):
        build(name, "fp16", out=tmp_path / "f.engine", model_overrides=SMALL[name], batch=BATCH, smooth_alpha=0.5)


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_int8_engine_with_qat_fine_tunes_on_the_2d_set(name, tmp_path, calib_spec, ops_on_references):
    """``qat_steps`` on a 2D model: the family's own loss (YOLOX SimOTA / CenterNet focal) trains the
    fake-quant form on every image of the 2D set, the learned scales are recorded and the engine runs."""
    from bevdeploy.quant.calibrate import CalibrationTable

    path = build(name, "int8-fp16", out=tmp_path / "q.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, progress=False, qat_steps=2, qat_batch=2)
    engine = Engine.load(path, device="cpu")
    qat = engine.metadata["qat"]
    assert qat["steps"] == 2 and qat["data"].endswith("[:4]") and qat["layers"] > 10
    assert qat["tied_groups"] >= 3  # CSP main / short convs, ResNet conv1 / downsample: one scale each
    assert all(map(lambda v: v == v and v < float("inf"), (qat["loss_first"], qat["loss_last"])))
    ptq = CalibrationTable.load(tmp_path / "q.engine.calib.json")
    learned = CalibrationTable.load(tmp_path / "q.engine.qat.calib.json")
    moved = [n for n in ptq.amax if n in learned.amax and learned.amax[n] != ptq.amax[n]]
    assert len(moved) > qat["layers"] // 2  # two steps moved most scales
    _assert_int8_floor(engine, name)
    with pytest.raises(ValueError, match="QAT data"):
        build(name, "int8-fp16", out=tmp_path / "bad.engine", model_overrides=SMALL[name], batch=BATCH,
              calib=calib_spec, progress=False, qat_steps=1, qat_data=123)


def test_qat_engine_with_fused_epilogues_pads_the_fine_tuned_stem(tmp_path, calib_spec, ops_on_references):
    """QAT, then the fused Focus stem: its trained weight is padded to the NHWC rows' 16 input channels after the
    fine-tuning, which left no gradients to conflict with the new shape (session 20's GPU call failed at export:
    'a gradient of size [80, 12, 3, 3] to a tensor of size [80, 16, 3, 3]')."""
    path = build("yolox-x", "int8-fp16", out=tmp_path / "qf.engine", model_overrides=SMALL["yolox-x"], batch=BATCH,
                 calib=calib_spec, progress=False, qat_steps=1, qat_batch=2, smooth_alpha=0.5, fused_epilogues=True)
    engine = Engine.load(path, device="cpu")
    assert engine.metadata["qat"]["steps"] == 1 and "backbone.stem" in engine.metadata["fused_epilogues"]
    _assert_int8_floor(engine, "yolox-x")


def test_bias_corrected_int8_engine_records_its_layers_and_runs(tmp_path, calib_spec, ops_on_references):
    """``bias_correction``: every int8 layer's bias shifted on the calibration images (recorded per layer: its largest
    shift relative to its output RMS), the engine at the int8 floor; the option's misuses are clear errors."""
    name = "centernet-r18-dcn"
    plain = Engine.load(build(name, "int8-fp16", out=tmp_path / "p.engine", model_overrides=SMALL[name], batch=BATCH,
                              calib=calib_spec, progress=False), device="cpu")
    path = build(name, "int8-fp16", out=tmp_path / "bc.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, progress=False, bias_correction=True)
    engine = Engine.load(path, device="cpu")
    shifts = engine.metadata["bias_correction"]
    int8 = {n for n, p in engine.layer_precisions if p == "int8"}
    assert plain.metadata["bias_correction"] is None and set(shifts) <= int8 and len(shifts) >= len(int8) - 3
    assert all(v >= 0 for v in shifts.values()) and max(shifts.values()) > 0
    _assert_int8_floor(engine, name)
    with pytest.raises(ValueError, match="bias_correction corrects int8 rounding"):
        build(name, "fp16", out=tmp_path / "f.engine", model_overrides=SMALL[name], progress=False, bias_correction=True)
    with pytest.raises(ValueError, match="needs calib"):
        build(name, "int8-fp16", out=tmp_path / "t.engine", model_overrides=SMALL[name], batch=BATCH,
              calib_table=f"{tmp_path / 'p.engine'}.calib.json", progress=False, bias_correction=True)


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_asymmetric_int8_engine_records_zero_points_and_runs(name, tmp_path, calib_spec, ops_on_references):
    """``asymmetric``: the int8 convs' inputs get the zero points of their calibrated signed ranges
    (ReLU / SiLU inputs: one-sided, so nearly all), recorded in the metadata; chained as usual; the
    engine runs at the int8 floor; with QAT the zero points stay and the scales are learned."""
    path = build(name, "int8-fp16", out=tmp_path / "a.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, progress=False, asymmetric=True)
    engine = Engine.load(path, device="cpu")
    meta = engine.metadata
    int8 = {n for n, p in meta["layer_precisions"] if p == "int8"}
    assert meta["zero_points"] and set(meta["zero_points"]) <= int8 | set(meta["keep_float"])
    assert len(set(meta["zero_points"]) & int8) > len(int8) // 2
    assert all(-128 <= z <= 127 and z != 0 for z in meta["zero_points"].values())
    assert meta["int8_outputs"]  # still chained
    _assert_int8_floor(engine, name)
    qat = build(name, "int8-fp16", out=tmp_path / "aq.engine", model_overrides=SMALL[name], batch=BATCH,
                calib=calib_spec, progress=False, asymmetric=True, qat_steps=2, qat_batch=2)
    engine = Engine.load(qat, device="cpu")
    assert engine.metadata["zero_points"] == meta["zero_points"] and engine.metadata["qat"]["steps"] == 2
    _assert_int8_floor(engine, name)
    with pytest.raises(ValueError, match="asymmetric"):
        build(name, "fp16", out=tmp_path / "f.engine", model_overrides=SMALL[name], batch=BATCH, asymmetric=True)


def test_int8_dcn_engine(tmp_path, calib_spec, ops_on_references):
    """``int8_dcn``: CenterNet's neck DCNs run int8 (recorded in the metadata and the layer table), the
    engine stays above the int8 floor, also after QAT in that form and with zero points; refused for float
    precisions."""
    name = "centernet-r18-dcn"
    path = build(name, "int8-fp16", out=tmp_path / "d.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, calib_method="minmax", progress=False, int8_dcn=True)
    engine = Engine.load(path, device="cpu")
    rows = dict(engine.layer_precisions)
    dcns = [n for n in rows if n.startswith("neck.deconv_layers.") and n.endswith(".conv")]
    assert engine.metadata["int8_dcn"] is True and dcns and all(rows[n] == "int8" for n in dcns), rows
    # measured 38.8 dB wh, 40.8 dB offset, 61.5 dB heatmap (float DCNs: 42.0 / 43.1 / 62.5)
    _assert_int8_floor(engine, name)
    qat = build(name, "int8-fp16", out=tmp_path / "q.engine", model_overrides=SMALL[name], batch=BATCH,
                calib=calib_spec, calib_method="minmax", progress=False, int8_dcn=True, qat_steps=2, qat_batch=2)
    engine = Engine.load(qat, device="cpu")
    assert engine.metadata["int8_dcn"] is True and engine.metadata["qat"]["steps"] == 2
    assert all(dict(engine.layer_precisions)[n] == "int8" for n in dcns)
    _assert_int8_floor(engine, name)
    # with zero points: the DCNs take their offset convs' (asymmetric codes sampled as q - z)
    asym = build(name, "int8-fp16", out=tmp_path / "a.engine", model_overrides=SMALL[name], batch=BATCH,
                 calib=calib_spec, calib_method="minmax", progress=False, int8_dcn=True, asymmetric=True)
    engine = Engine.load(asym, device="cpu")
    assert all(dict(engine.layer_precisions)[n] == "int8" for n in dcns)
    assert {f"{n}.conv_offset" for n in dcns} <= set(engine.metadata["zero_points"])
    _assert_int8_floor(engine, name)
    with pytest.raises(ValueError, match="precision must be int8"):
        build(name, "fp16", out=tmp_path / "f.engine", model_overrides=SMALL[name], batch=BATCH, int8_dcn=True)


def test_centernet_fused_engine_runs_the_head_as_one_conv_pair(tmp_path, calib_spec, ops_on_references):
    """``fused_epilogues`` on CenterNet int8-fp16: the stem reads NHWC, the neck DCNs take their ReLU, the head's
    six convs run as two int8 convs (named after the layers they replace), and the outputs are the plain int8
    engine's (same table)."""
    name = "centernet-r18-dcn"
    plain = build(name, "int8-fp16", out=tmp_path / "p.engine", model_overrides=SMALL[name], batch=BATCH,
                  calib=calib_spec, progress=False)
    fused = build(name, "int8-fp16", out=tmp_path / "f.engine", model_overrides=SMALL[name], batch=BATCH,
                  calib_table=f"{plain}.calib.json", progress=False, fused_epilogues=True)
    a, b = Engine.load(plain, device="cpu"), Engine.load(fused, device="cpu")
    rows = dict(b.layer_precisions)
    assert rows["bbox_head.convs.2 (fused heatmap_head.2, wh_head.2, offset_head.2)"] == "int8"
    # the float neck DCNs apply their ConvModule's ReLU in their own epilogue
    assert [n for n in b.metadata["fused_epilogues"] if n.startswith("neck.")] == [
        f"neck.deconv_layers.{i}.conv" for i in (0, 2, 4)]
    assert not any(n.startswith("bbox_head.heatmap_head") for n in rows)
    assert sum(p == "int8" for p in rows.values()) == sum(p == "int8" for _, p in a.layer_precisions) - 4
    x = _images(1)
    out_a, out_b = a(image=x), b(image=x)
    for k in a.output_names:  # measured: heatmap identical, wh 58.9 dB, offset 57.8 dB (rounding)
        assert sqnr_db(out_a[k].float(), out_b[k].float()) > 35, k
    _assert_int8_floor(b, name)
