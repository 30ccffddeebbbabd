"""The engine on the CPU: build -> file -> load -> run, int8 layers, refusals, temporal state.

A reduced BEVFormer-tiny (64x96 images, 8x8 BEV, 20 queries, one encoder and one decoder layer; the
R50 backbone keeps its full width, so engine files are ~100 MB). fp32 engines run the ops on their
PyTorch references, and so do the int8 engine's int8 convs / linears (``torch reference on int8
codes``: the same int8 x int8 -> int32 math): through Triton's interpreter the int8 R50 forward took
over 10 minutes on this CPU (the kernels themselves are tested in tests/quant).
"""

import json
import os
import shutil
import zipfile

import pytest
import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.preprocess import BEVFORMER_TINY, prepare_frame
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
from bevdeploy.engine import Engine, build
from bevdeploy.engine.build import METADATA_KEY
from bevdeploy.models import MODELS
from bevdeploy.quant.sensitivity import sqnr_db

TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)
#: Minimum SQNR (dB) of the int8 engine's outputs against the fp32 engine's (random weights, 2 calibration frames).
INT8_SQNR_FLOOR_DB = 25.0  # measured ~39 dB (bev_embed) and ~70 dB (heads)


def _on_references():
    """What the ``ops_on_references`` fixture does, for module-scoped fixtures."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    return mp


def _inputs(seed: int = 1, gate: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(image=torch.randn(1, 6, 3, 64, 96, generator=g), lidar2img=torch.eye(4).expand(1, 6, 4, 4).clone(),
                can_bus=torch.zeros(1, 18), prev_bev=torch.randn(1, 64, 256, generator=g),
                use_prev_bev=torch.full((1,), gate))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, num_scenes=2, samples_per_scene=2, seed=3, image_size=(128, 192), progress=False)
    return root, load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)


@pytest.fixture(scope="module")
def fp32_engine_path(tmp_path_factory):
    mp = _on_references()
    try:
        yield build("bevformer-tiny", "fp32", out=tmp_path_factory.mktemp("fp32") / "tiny.engine",
                    model_overrides=TINY, progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def fp32_engine(fp32_engine_path):
    return Engine.load(fp32_engine_path, device="cpu")


def test_fp32_round_trip_equals_eager_model(fp32_engine, fp32_engine_path, ops_on_references):
    engine = fp32_engine
    meta = engine.metadata
    assert meta["precision"] == "fp32" and meta["model_config"]["bev_h"] == 8 and meta["calibration"] is None
    assert meta["sca_gathered"] is True  # the deploy form runs the camera-gathered SCA op
    assert meta["torch"] == torch.__version__ and meta["inputs"]["image"]["shape"] == [1, 6, 3, 64, 96]
    assert engine.file_mb == pytest.approx(os.path.getsize(fp32_engine_path) / 2**20)
    with zipfile.ZipFile(fp32_engine_path) as z:  # the export's example inputs (a frame of zeros) are not kept
        sample_bytes = sum(i.file_size for i in z.infolist() if "sample_inputs" in i.filename)
    assert sample_bytes < 4096
    assert engine.bev_shape == (64, 256) and engine.preprocess_name == "bevformer-tiny"
    assert all(p == "fp32" for _, p in engine.layer_precisions)
    torch.manual_seed(0)  # build() seeds 0 before creating random weights
    model = MODELS["bevformer-tiny"](**TINY).eval()
    x = _inputs()
    with torch.no_grad():
        ref = model(**x)
    out = engine(**x)
    for k in ref:  # BN folding reorders float math: near-equal, not bit-equal
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    (boxes, scores, labels), = engine.decode(out)
    (rboxes, rscores, rlabels), = model.decode(ref)
    assert boxes.shape[1] == 9 and torch.equal(labels, rlabels)
    torch.testing.assert_close(scores, rscores, rtol=1e-4, atol=1e-5)


def test_int8_round_trip_reports_layers_and_reuses_table(world, fp32_engine, tmp_path, ops_on_references):
    root, _ = world
    calib = DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=2)  # one scene, two frames
    path = build("bevformer-tiny", "int8", out=tmp_path / "q.engine", model_overrides=TINY, calib=calib,
                 progress=False, sensitivity=True)
    table_file = tmp_path / "q.engine.calib.json"
    assert table_file.is_file()
    sens = json.loads((tmp_path / "q.engine.sensitivity.json").read_text())  # worst layer first
    assert len(sens) > 50 and sens[0]["sqnr_db"] <= sens[-1]["sqnr_db"]
    engine = Engine.load(path, device="cpu")
    meta = engine.metadata
    assert meta["calibration"]["method"] == "entropy" and meta["calibration"]["num_samples"] == 2
    int8 = [n for n, p in engine.layer_precisions if p == "int8"]
    assert meta["int8_layers"] == len(int8) > 50
    assert "img_backbone.layer1.0.conv1" in int8 and "img_neck.lateral_convs.0.conv" in int8
    # the stem reads the 3-channel image: kept float by default (faster), and recorded as such
    assert "img_backbone.conv1" not in int8 and meta["keep_float"] == ["img_backbone.conv1"]
    assert any(n.startswith("pts_bbox_head.transformer.encoder.") for n in int8)
    assert not any(n.startswith(("pts_bbox_head.transformer.decoder.", "pts_bbox_head.cls_branches",
                                 "pts_bbox_head.reg_branches")) for n in int8)  # decoder and heads stay float
    # the int8 chain (on by default) reaches the encoder: its FFN's first linear writes int8 codes
    assert "pts_bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0" in meta["int8_outputs"]
    x = _inputs()
    out = engine(**x)
    ref = fp32_engine(**x)
    for k in ref:
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]).all()
        assert sqnr_db(ref[k], out[k]) > INT8_SQNR_FLOOR_DB, k
    # the saved table rebuilds the same engine without calibration data
    again = build("bevformer-tiny", "int8", out=tmp_path / "q2.engine", model_overrides=TINY,
                  calib_table=str(table_file), progress=False)
    assert Engine.load(again, device="cpu").metadata["content_hash"] == meta["content_hash"]
    # zero points from the same table's signed ranges: the FFN's second linear reads a ReLU output
    # (zero point -128, written so by the chained first linear); attention inputs are near-symmetric
    asym = Engine.load(build("bevformer-tiny", "int8", out=tmp_path / "a.engine", model_overrides=TINY,
                             calib_table=str(table_file), progress=False, asymmetric=True), device="cpu")
    assert asym.metadata["zero_points"]["pts_bbox_head.transformer.encoder.layers.0.ffns.0.layers.1"] == -128
    out = asym(**x)
    for k in ref:
        assert torch.isfinite(out[k]).all() and sqnr_db(ref[k], out[k]) > INT8_SQNR_FLOOR_DB, k


def test_int8_layers_through_triton_interpreter(world, fp32_engine, tmp_path, monkeypatch):
    """The int8 engine's layers run the real Triton int8 kernels (through the interpreter on a CPU).

    The R50 backbone stays float here (``keep_float``): an int8 R50 through the interpreter takes
    minutes; the neck convs and the encoder linears go int8 and run the same kernels the GPU runs.
    """
    import torch.nn as nn

    from bevdeploy.ops._utils import interpreter_enabled

    if torch.cuda.is_available():
        pytest.skip("CPU-only test: on a GPU the int8 round trip above already runs the Triton kernels")
    if os.environ.get("BEVDEPLOY_TEST_INTERPRET", "1") == "0":
        pytest.skip("the interpreter is off for this run (BEVDEPLOY_TEST_INTERPRET=0)")
    root, _ = world
    backbone = [n for n, m in MODELS["bevformer-tiny"](**TINY).named_modules()
                if n.startswith("img_backbone") and isinstance(m, nn.Conv2d)]
    mp = _on_references()  # calibrate on the references (faster); the int8 kernels run below
    try:
        path = build("bevformer-tiny", "int8", out=tmp_path / "qi.engine", model_overrides=TINY, keep_float=backbone,
                     calib=DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=2), progress=False)
    finally:
        mp.undo()
    engine = Engine.load(path, device="cpu")
    int8 = [n for n, p in engine.layer_precisions if p == "int8"]
    assert "img_neck.lateral_convs.0.conv" in int8 and not any(n.startswith("img_backbone") for n in int8)
    assert any(n.startswith("pts_bbox_head.transformer.encoder.") for n in int8)
    # the chained FFN: its first linear's int8-out epilogue runs in the interpreted kernel below
    assert "pts_bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0" in engine.metadata["int8_outputs"]
    x = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # module fixtures route ops to references; not here
    assert interpreter_enabled()
    out = engine(**x)  # the int8 layers (and the ops) launch their Triton kernels through the interpreter
    mp = _on_references()
    try:
        ref = fp32_engine(**x)
    finally:
        mp.undo()
    for k in ref:
        assert torch.isfinite(out[k]).all()
        assert sqnr_db(ref[k], out[k]) > INT8_SQNR_FLOOR_DB, k


def test_fp16x2_engine_runs_half2_ops_close_to_fp32(fp32_engine, tmp_path, ops_on_references):
    engine = Engine.load(device="cpu", path=build("bevformer-tiny", "fp16x2", out=tmp_path / "h.engine", model_overrides=TINY,
                               progress=False))
    ops = [(n, p) for n, p in engine.layer_precisions if n.endswith("(op)")]
    assert len(ops) == 4 and all(p == "fp16x2" for _, p in ops)  # rotate + TSA + SCA + decoder msda
    assert engine.metadata["inputs"]["image"]["dtype"] == "float16"
    x = _inputs()
    out, ref = engine(**x), fp32_engine(**x)
    for k in ref:
        assert out[k].dtype == torch.float32 and sqnr_db(ref[k], out[k]) > 40.0, k  # measured ~61-68 dB


def test_int8_needs_calibration_and_precision_is_checked(tmp_path):
    with pytest.raises(ValueError, match="calib"):
        build("bevformer-tiny", "int8", out=tmp_path / "x.engine", model_overrides=TINY)
    with pytest.raises(ValueError, match="precision must be one of"):
        build("bevformer-tiny", "int4", out=tmp_path / "x.engine", model_overrides=TINY)


def test_truncated_or_flipped_engine_is_refused(fp32_engine_path, tmp_path):
    data = fp32_engine_path.read_bytes()
    truncated = tmp_path / "truncated.engine"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.engine.*(corrupt|truncated)"):
        Engine.load(truncated)
    flipped = tmp_path / "flipped.engine"
    shutil.copy(fp32_engine_path, flipped)
    with open(flipped, "r+b") as f:  # the middle of the file is weight bytes
        f.seek(len(data) // 2)
        chunk = f.read(64)
        f.seek(len(data) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(ValueError, match="flipped.engine.*corrupt"):
        Engine.load(flipped)
    with pytest.raises(FileNotFoundError, match="missing.engine"):
        Engine.load(tmp_path / "missing.engine")


def test_metadata_mismatch_asks_for_rebuild(fp32_engine_path, tmp_path):
    extra = {METADATA_KEY: ""}
    with open(fp32_engine_path, "rb") as f:
        ep = torch.export.load(f, extra_files=extra)
    meta = json.loads(extra[METADATA_KEY])
    meta["torch"] = "1.13.1"
    edited = tmp_path / "old.engine"
    with open(edited, "wb") as f:
        torch.export.save(ep, f, extra_files={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(RuntimeError, match=r"torch 1\.13\.1.*rebuild it .*`bevdeploy build --model bevformer-tiny "
                                           r"--precision fp32"):
        Engine.load(edited)


def test_step_carries_prev_bev_and_resets_at_scene_change(world, fp32_engine, ops_on_references):
    _, infos = world
    scenes = [i["scene_token"] for i in infos]
    assert scenes[0] == scenes[1] != scenes[2]
    frames = [prepare_frame(infos[0], None, BEVFORMER_TINY), prepare_frame(infos[1], infos[0], BEVFORMER_TINY),
              prepare_frame(infos[2], infos[1], BEVFORMER_TINY)]
    assert [f["use_prev_bev"].item() for f in frames] == [0.0, 1.0, 0.0]
    engine = fp32_engine
    engine.reset()
    outs = [engine.step(f) for f in frames]

    def direct(frame, prev_bev, gate):
        return engine(image=frame["image"][None], lidar2img=frame["lidar2img"][None], can_bus=frame["can_bus"][None],
                      prev_bev=prev_bev, use_prev_bev=torch.tensor([gate]))

    zeros = torch.zeros(1, *engine.bev_shape)
    torch.testing.assert_close(outs[0]["bev_embed"], direct(frames[0], zeros, 0.0)["bev_embed"])
    carried = direct(frames[1], outs[0]["bev_embed"], 1.0)["bev_embed"]
    torch.testing.assert_close(outs[1]["bev_embed"], carried)
    assert not torch.allclose(carried, direct(frames[1], zeros, 1.0)["bev_embed"], atol=1e-3)  # prev_bev matters
    torch.testing.assert_close(outs[2]["bev_embed"], direct(frames[2], zeros, 0.0)["bev_embed"])  # reset
    # a frame whose gate says 1 but whose scene token changed is reset too; streams are independent
    wrong_gate = dict(frames[2], use_prev_bev=torch.ones(1))
    engine.step(frames[0], stream=1)
    engine.step(frames[1], stream=1)
    torch.testing.assert_close(engine.step(wrong_gate, stream=1)["bev_embed"], outs[2]["bev_embed"])
    torch.testing.assert_close(engine._streams[0]["prev_bev"], outs[2]["bev_embed"])


def test_int8_fp16x2_keeps_dcn_offset_convs_int8():
    """The fp16x2 variant wraps DCN packs (renaming their offset convs): quantization happens first."""
    from torch import nn

    from bevdeploy.engine.deploy import apply_precision, layer_precisions
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack
    from bevdeploy.quant.modules import QuantConv2d, QuantDeformConv2d

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ModulatedDeformConv2dPack(8, 8, 3, padding=1)).eval()

    scales = {"0": 0.02, "1.conv_offset": 0.05}
    for precision in ("int8-fp16", "int8-fp16x2"):
        model = net()
        report = apply_precision(model, precision, scales=scales, scope=("",))
        offset = model[1].pack.conv_offset if precision.endswith("x2") else model[1].conv_offset
        assert isinstance(model[0], QuantConv2d) and isinstance(offset, QuantConv2d), precision
        rows = dict(layer_precisions(model, report, precision))
        assert sum(p == "int8" for p in rows.values()) == 2, (precision, rows)
        # int8_dcn: the DCN itself runs int8 (no variant wrapper) and reads the conv's codes (chained)
        model = net()
        report = apply_precision(model, precision, scales=scales, scope=("",), int8_dcn=True)
        assert isinstance(model[1], QuantDeformConv2d) and isinstance(model[1].conv_offset, QuantConv2d)
        assert model[0].out_scale == model[1].input_scale == 0.05  # the larger of the readers' scales
        rows = dict(layer_precisions(model, report, precision))
        assert rows["1"] == "int8" and sum(p == "int8" for p in rows.values()) == 3, (precision, rows)
    with pytest.raises(ValueError, match="int8_dcn applies to the int8 precisions"):
        apply_precision(net(), "fp16", scales=scales, int8_dcn=True)


def test_frozen_compile_discards_the_eager_weights(tmp_path):
    """The compiled engine keeps the weights once, as Inductor's frozen constants: the exported
    module's parameters and buffers are gone after the first call (and an eager call would raise)."""
    from bevdeploy.engine.engine import held_weight_bytes

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.register_buffer("offset", torch.randn(8, 1, 1))

        def forward(self, image):
            return (self.conv(image) * 2 + self.offset,)

    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, 10)
    ep = torch.export.export(Net().eval(), (x,))
    with torch.no_grad():
        ref = ep.module()(x)[0]
    path = tmp_path / "net.engine"
    path.write_bytes(b"")
    meta = {"model": "net", "family": "net", "inputs": {"image": {"shape": [1, 3, 10, 10], "dtype": "float32"}},
            "outputs": ["out"]}
    engine = Engine(path, ep, meta, torch.device("cpu"), compile=True, cuda_graphs=False)
    assert engine.eager_weights_mb > 0  # compiled on the first call
    torch.testing.assert_close(engine(image=x)["out"], ref, rtol=1e-5, atol=1e-5)
    assert engine.eager_weights_mb == 0 and held_weight_bytes(engine._module) == 0
    y = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(engine(image=y)["out"], ep.module()(y)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="discarded"):
        engine._module(y)
    uncompiled = Engine(path, ep, meta, torch.device("cpu"), compile=False, cuda_graphs=False)
    assert uncompiled.eager_weights_mb > 0  # the CPU path runs the module itself


@pytest.fixture(scope="module")
def batch2_engine(tmp_path_factory):
    mp = _on_references()
    try:
        path = build("bevformer-tiny", "fp32", out=tmp_path_factory.mktemp("b2") / "tiny-b2.engine",
                     model_overrides=TINY, batch=2, progress=False)
    finally:
        mp.undo()
    return Engine.load(path, device="cpu")


def test_batch2_streams_equal_two_batch1_engines(world, fp32_engine_path, batch2_engine, ops_on_references):
    """Stream i of a batch-2 engine = a batch-1 engine stepped on stream i's frames, with a scene
    change in stream 0 only and a NaN frame in stream 0 only (its reset leaves stream 1 alone)."""
    _, infos = world
    assert [i["scene_token"] for i in infos][1:3] == [infos[0]["scene_token"], infos[3]["scene_token"]]

    def frame(i, prev):
        return prepare_frame(infos[i], None if prev is None else infos[prev], BEVFORMER_TINY)

    nan_frame = frame(3, 2)
    nan_frame["image"] = nan_frame["image"].clone()
    nan_frame["image"][2, :, 10:20, 30:40] = float("nan")
    streams = [
        [frame(0, None), frame(1, 0), frame(2, 1), nan_frame, dict(frame(3, 3), token="after-nan")],  # scene A -> B
        [frame(2, None), frame(3, 2), frame(3, 3), frame(3, 3), frame(3, 3)],  # scene B throughout
    ]
    assert [f["use_prev_bev"].item() for f in streams[0]] == [0.0, 1.0, 0.0, 1.0, 1.0]
    singles = [Engine.load(fp32_engine_path, device="cpu") for _ in streams]
    batched = batch2_engine
    batched.reset()
    for t in range(5):
        frames = [s[t] for s in streams]
        if t == 4:  # stream 0's previous BEV is NaN: reset, warned with its frame token, once
            with pytest.warns(RuntimeWarning, match="frame after-nan: the previous BEV holds NaN") as caught:
                out = batched.step_batch(frames)
            assert len([w for w in caught if "NaN" in str(w.message)]) == 1
            with pytest.warns(RuntimeWarning, match="after-nan"):
                single = [singles[0].step(frames[0])]
            single.append(singles[1].step(frames[1]))
        else:
            out = batched.step_batch(frames)
            single = [e.step(f) for e, f in zip(singles, frames)]
        for i, per_stream in enumerate(batched.split_streams(out)):
            for k in per_stream:
                torch.testing.assert_close(per_stream[k], single[i][k], rtol=1e-4, atol=1e-4, equal_nan=True,
                                           msg=lambda m: f"t={t} stream {i} {k}: {m}")
        if t == 3:
            assert not torch.isfinite(out["bev_embed"][0]).all() and torch.isfinite(out["bev_embed"][1]).all()
    assert torch.isfinite(out["bev_embed"]).all()
    # the carried state matters: stream 1 at t=4 differs from a fresh start on the same frame
    fresh = singles[1]
    fresh.reset()
    assert not torch.allclose(fresh.step(dict(streams[1][4], use_prev_bev=torch.zeros(1)))["bev_embed"],
                              out["bev_embed"][1:2], atol=1e-3)


def test_batch_step_api_errors(world, fp32_engine, batch2_engine, ops_on_references):
    _, infos = world
    f = prepare_frame(infos[0], None, BEVFORMER_TINY)
    with pytest.raises(ValueError, match="batch 2: call step_batch\\(\\) with 2 frames"):
        batch2_engine.step(f)
    with pytest.raises(ValueError, match="this engine has batch 2, got 1 frames"):
        batch2_engine.step_batch([f])
    with pytest.raises(ValueError, match="this engine has batch 2, got one frame dict"):
        batch2_engine.step_batch(f)
    assert batch2_engine.metadata["inputs"]["image"]["shape"][0] == 2 and batch2_engine.batch == 2
    from bevdeploy.eval.detection import run_model

    with pytest.raises(ValueError, match="one frame per call and this engine has batch 2"):
        run_model(batch2_engine, infos, "bevformer-tiny", torch.device("cpu"))
    fp32_engine.reset()
    one = fp32_engine.step_batch([f])  # batch 1: a list of one frame, stream 0's state
    torch.testing.assert_close(fp32_engine._streams[0]["prev_bev"], one["bev_embed"])
    fp32_engine.reset()
    torch.testing.assert_close(fp32_engine.step(f)["bev_embed"], one["bev_embed"])
