"""Camera-gathered SCA: the Triton kernel (interpreter on CPU) against the static form, the op's
registration (fake, export, autograd, ONNX), and BEVFormer with the gathered switch on and off."""

import io

import pytest
import torch

from bevdeploy.ops import sca as sca_module
from bevdeploy.ops._utils import dequantize_int8, quantize_int8
from bevdeploy.ops.sca import SCAGathered, _sca_cpu, _sca_triton, reference, sca_gathered
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

# Two odd levels; the interpreter is slow, so every kernel call stays tiny. Q = 13 is not a multiple
# of the query block (8 here: P = 4 rows per query, 32 rows per block).
SHAPES = [(5, 7), (3, 4)]
S = sum(h * w for h, w in SHAPES)
B, N, Q, H, P, R = 2, 4, 13, 3, 4, 2
L = len(SHAPES)


def _mask(b=B, n=N, q=Q, seed=0):
    """Random visibility with the corner cases: query 0 seen by no camera, query 1 by all, camera 2
    by none, camera 3 only by queries of the second block (the first block skips it)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, n, q, generator=g) < 0.4
    m[:, :, 0] = False
    m[:, :, 1] = True
    m[:, 2] = False
    m[:, 3, :8] = False
    m[:, 3, 9] = True
    m[:, 2, 1] = True  # query 1 sees every camera; camera 2 sees only it in block 0
    return m


def _mask_no_cam2(b=B):
    m = _mask(b)
    m[:, 2] = False
    return m


def _inputs(device, D, small=torch.float32, seed=0, b=B, h=H):
    """value (fp32), per-camera reference points (some outside the image), pixel offsets, logits."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(b, N, S, h, D, generator=g)
    ref = torch.rand(b, N, Q, R, 2, generator=g) * 1.2 - 0.1
    offsets = torch.randn(b, Q, h, L, P, 2, generator=g) * 2.0
    logits = torch.randn(b, Q, h, L * P, generator=g) * 2.0
    return value.to(device), ref.to(device, small), offsets.to(device, small), logits.to(device, small)


def _store(value, variant):
    """The value the variant takes, its scale, and the float64 values the kernel really sees."""
    if variant == "int8":
        scale = value.abs().max().item() / 127
        q = quantize_int8(value, scale)
        return q, scale, dequantize_int8(q, scale).double()
    stored = value.half() if variant in ("fp16", "fp16x2") else value
    return stored, None, stored.double()


def _int8_bound(scale):
    # as msda's: |out| <= 127 * scale (a mean of convex combinations); fp16 output rounding and
    # fp32 accumulation only
    return 127 * scale * (2**-11 + 2**-16)


def _expected(value64, ref, mask, offsets, logits):
    return reference(value64, SHAPES, ref.double(), mask, offsets.double(), logits.double())


# (variant, head dim, dtype of the small tensors, mask dtype): odd D (masked channels) and even D
CASES = [
    ("fp32", 5, torch.float32, torch.bool),
    ("fp16", 8, torch.float16, torch.float16),
    ("fp16x2", 5, torch.float32, torch.float32),
    ("fp16x2", 8, torch.float16, torch.uint8),
    ("int8", 8, torch.float16, torch.bool),
]


@pytest.mark.parametrize("variant,D,small,mask_dtype", CASES)
def test_gathered_equals_static_form(device, variant, D, small, mask_dtype):
    value, ref, offsets, logits = _inputs(device, D, small)
    mask = _mask().to(device, mask_dtype)
    stored, scale, value64 = _store(value, variant)
    out = poisoned((B, Q, H * D), torch.float32 if variant == "fp32" else torch.float16, device)
    _sca_triton(stored, SHAPES, ref, mask, offsets, logits, variant, 1.0 if scale is None else scale, out=out)
    expected = _expected(value64, ref, mask, offsets, logits)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # seen by no camera: exactly 0
    if variant == "int8":
        assert_int8_close(out, expected, _int8_bound(scale))
    else:
        assert_rel_close(out, expected, REL_TOL[variant])
    # and the public function (the op) agrees with the kernel bit for bit
    again = sca_gathered(stored, SHAPES, ref, mask, offsets, logits, variant=variant, value_scale=scale)
    assert torch.equal(again, out)


def test_query_seen_by_all_cameras_is_their_mean(device):
    value, ref, offsets, logits = _inputs(device, 4, b=1)
    mask = torch.zeros(1, N, Q, dtype=torch.bool, device=device)
    mask[:, :, 1] = True
    out = sca_gathered(value, SHAPES, ref, mask, offsets, logits)
    from bevdeploy.ops.msda import reference_fused

    per_cam = [reference_fused(value[:, n].double(), SHAPES, ref[:, n].double(), offsets.double(), logits.double())
               for n in range(N)]
    mean = torch.stack(per_cam).mean(0)
    assert_rel_close(out[:, 1], mean[:, 1], REL_TOL["fp32"])
    assert torch.equal(out[:, 2:], torch.zeros_like(out[:, 2:]))


def test_camera_seen_by_nobody_is_never_read(device):
    # camera 2's value is NaN: the static form's mask multiply would give NaN (0 * NaN), the
    # gathered kernel skips the camera and equals the static form on the other cameras
    value, ref, offsets, logits = _inputs(device, 4)
    mask = _mask_no_cam2().to(device)
    poisoned_value = value.clone()
    poisoned_value[:, 2] = float("nan")
    out = sca_gathered(poisoned_value, SHAPES, ref, mask, offsets, logits)
    expected = _expected(value.double(), ref, mask, offsets, logits)
    assert_rel_close(out, expected, REL_TOL["fp32"])


def test_all_cameras_blind_gives_zeros(device):
    value, ref, offsets, logits = _inputs(device, 4, b=1)
    mask = torch.zeros(1, N, Q, device=device)
    out = poisoned((1, Q, H * 4), torch.float32, device)
    _sca_triton(value, SHAPES, ref, mask, offsets, logits, "fp32", out=out)
    assert torch.equal(out, torch.zeros_like(out))


def test_four_levels_one_camera_edge_shapes(device):
    # 4 levels with sides of 1, P = 3 (a padded point row), R = 3, Q = 1, D = 3, one camera
    shapes = [(1, 5), (4, 1), (2, 3), (1, 1)]
    g = torch.Generator().manual_seed(5)
    value = torch.randn(2, 1, sum(h * w for h, w in shapes), 2, 3, generator=g).to(device)
    ref = torch.rand(2, 1, 1, 3, 2, generator=g).to(device)
    offsets = (torch.randn(2, 1, 2, 4, 3, 2, generator=g) * 1.5).to(device)
    logits = torch.randn(2, 1, 2, 12, generator=g).to(device)
    mask = torch.tensor([[[True]], [[False]]], device=device)
    out = sca_gathered(value, shapes, ref, mask, offsets, logits)
    expected = reference(value.double(), shapes, ref.double(), mask, offsets.double(), logits.double())
    assert_rel_close(out, expected, REL_TOL["fp32"])


def test_non_contiguous_inputs(device):
    value, ref, offsets, logits = _inputs(device, 6, b=1, h=2)
    mask = _mask(b=1).to(device)
    value_nc = torch.stack([value, value], -1)[..., 0]
    ref_nc = ref.transpose(1, 2).contiguous().transpose(1, 2)
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    logits_nc = torch.cat([logits, logits], -1)[..., : L * P]
    assert not any(t.is_contiguous() for t in (value_nc, ref_nc, mask_nc, logits_nc))
    expected = _expected(value.double(), ref, mask, offsets, logits)
    assert_rel_close(sca_gathered(value_nc, SHAPES, ref_nc, mask_nc, offsets, logits_nc), expected, REL_TOL["fp32"])


def test_module_and_bf16(device):
    value, ref, offsets, logits = _inputs(device, 4, b=1)
    mask = _mask(b=1).to(device)
    module = SCAGathered(variant="fp16x2")
    assert "fp16x2" in repr(module)
    out = module(value.half(), torch.tensor(SHAPES), ref, mask, offsets, logits)
    assert out.dtype == torch.float16
    assert_rel_close(out, _expected(value.half().double(), ref, mask, offsets, logits), REL_TOL["fp16x2"])
    # bf16 (from a model under bf16 autocast) runs in fp32
    out = sca_gathered(value.bfloat16(), SHAPES, ref.bfloat16(), mask.bfloat16(), offsets.bfloat16(), logits.bfloat16())
    want = sca_gathered(*(t.bfloat16().float() for t in (value,)), SHAPES,
                        *(t.bfloat16().float() for t in (ref, mask, offsets, logits)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)


def test_empty_query_set(device):
    value, ref, offsets, logits = _inputs(device, 4)
    out = sca_gathered(value, SHAPES, ref[:, :, :0], _mask().to(device)[:, :, :0], offsets[:, :0], logits[:, :0])
    assert out.shape == (B, 0, H * 4)


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_cpu_reference_path(variant):
    # what the op runs on CPU tensors without the interpreter (and differentiates for autograd)
    value, ref, offsets, logits = _inputs("cpu", 5)
    mask = _mask()
    stored, scale, value64 = _store(value, variant)
    out = _sca_cpu(stored, [v for hw in SHAPES for v in hw], ref, mask, offsets, logits, variant,
                   1.0 if scale is None else scale)
    assert out.dtype == torch.float16
    assert_rel_close(out, _expected(value64, ref, mask, offsets, logits), REL_TOL["fp16"])


def _tiny(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (2, 3)]
    value = torch.randn(1, 2, 18, 1, 3, generator=g)
    ref = torch.rand(1, 2, 3, 2, 2, generator=g)
    mask = torch.tensor([[[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    offsets = torch.randn(1, 3, 1, 2, 2, 2, generator=g)
    logits = torch.randn(1, 3, 1, 4, generator=g)
    return shapes, *(t.to(dtype) for t in (value, ref, mask, offsets, logits))


def test_op_gradients_match_reference():
    shapes, value, ref, mask, offsets, logits = _tiny(torch.float64)
    grad = torch.randn(1, 3, 3, dtype=torch.float64)
    tensors = (value, ref, offsets, logits)
    inputs64 = [t.detach().requires_grad_(True) for t in tensors]
    v, r, o, lg = inputs64
    expected = torch.autograd.grad(reference(v, shapes, r, mask, o, lg), inputs64, grad)
    inputs = [t.detach().float().requires_grad_(True) for t in tensors]
    v, r, o, lg = inputs
    got = torch.autograd.grad(sca_gathered(v, shapes, r, mask.float(), o, lg), inputs, grad.float())
    for gt, e in zip(got, expected):
        assert_rel_close(gt, e, 1e-4)


def test_opcheck(monkeypatch):
    # on the CPU reference path (the interpreter would make the aot_dispatch checks minutes long)
    monkeypatch.setattr(sca_module, "use_triton", lambda t: t.device.type == "cuda")
    shapes, value, ref, mask, offsets, logits = _tiny()
    flat = [v for hw in shapes for v in hw]
    args = (value.requires_grad_(True), flat, ref, mask, offsets.requires_grad_(True), logits.requires_grad_(True),
            "fp32", 1.0)
    torch.library.opcheck(torch.ops.bevdeploy.sca_gathered.default, args)


def _bad():
    value, ref, offsets, logits = _inputs("cpu", 4)
    return dict(value=value, spatial_shapes=SHAPES, reference_points_cam=ref, bev_mask=_mask(),
                sampling_offsets=offsets, attention_logits=logits)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(value=torch.randn(B, S, H, 4)), r"value must have shape \[B, N, S, H, D\]"),
        (dict(value=torch.randn(B, N, S, H, 4, dtype=torch.float64)), r"value must be float32, float16 or int8"),
        (dict(value=torch.randn(B, N, S + 1, H, 4)), r"S = sum\(h\*w\) over spatial_shapes = 47, got S=48"),
        (dict(variant="fp16"), r"variant 'fp16' takes value as torch.float16"),
        (dict(value=torch.zeros(B, N, S, H, 4, dtype=torch.int8)), r"variant 'int8' needs value_scale"),
        (dict(spatial_shapes=[(1, 1)] * 4 + [(5, 7), (3, 4)]), r"at most 4 levels"),
        (dict(bev_mask=torch.ones(B, N + 1, Q, dtype=torch.bool)), r"bev_mask: num_cams \(dim 1, value's dim 1\) must be 4"),
        (dict(bev_mask=torch.ones(B, N, Q + 1, dtype=torch.bool)), r"bev_mask: num_queries \(dim 2\) must be 13"),
        (dict(bev_mask=torch.ones(B, N, Q, dtype=torch.int64)), r"bev_mask must have dtype in"),
        (dict(bev_mask=torch.ones(B, N * Q, dtype=torch.bool)), r"bev_mask must have shape \[B, N, Q\]"),
        (dict(reference_points_cam=torch.rand(B, N - 1, Q, R, 2)), r"reference_points_cam: num_cams \(dim 1"),
        (dict(reference_points_cam=torch.rand(B, N, Q, 3, 2)), r"R \(dim 3\) must divide num_points P=4"),
        (dict(reference_points_cam=torch.rand(B, N, Q + 2, R, 2)), r"reference_points_cam: num_queries \(dim 2\)"),
        (dict(reference_points_cam=torch.rand(B, N, Q, R, 2).half()), r"reference_points_cam must have dtype"),
        (dict(sampling_offsets=torch.rand(B, Q, H, L + 1, P, 2)), r"sampling_offsets: num_levels \(dim 3\) must be 2"),
        (dict(sampling_offsets=torch.rand(B, Q, H + 1, L, P, 2)), r"sampling_offsets: num_heads \(dim 2\) must be 3"),
        (dict(attention_logits=torch.rand(B, Q, H, L * P + 1)), r"attention_logits must have shape \[2, 13, 3, 8\]"),
        (dict(bev_mask=torch.ones(B, N, Q, dtype=torch.bool, device="meta")), r"bev_mask is on meta"),
    ],
)
def test_input_checks(change, match):
    with pytest.raises(ValueError, match=match):
        sca_gathered(**(_bad() | change))


class _Gathered(torch.nn.Module):
    def forward(self, value, ref, mask, offsets, logits):
        return sca_gathered(value, [(3, 4), (2, 3)], ref, mask, offsets, logits)


def test_export_round_trip_fake_shapes():
    shapes, value, ref, mask, offsets, logits = _tiny()
    args = (value, ref, mask, offsets, logits)
    exported = torch.export.export(_Gathered(), args)
    nodes = [n for n in exported.graph.nodes if n.target == torch.ops.bevdeploy.sca_gathered.default]
    assert len(nodes) == 1
    assert tuple(nodes[0].meta["val"].shape) == (1, 3, 3) and nodes[0].meta["val"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert torch.equal(loaded.module()(*args), _Gathered()(*args))
    # fp16 value: fp16 output from the fake too
    ep16 = torch.export.export(_Gathered(), (value.half(), ref, mask.half(), offsets.half(), logits.half()))
    val = next(n for n in ep16.graph.nodes if n.target == torch.ops.bevdeploy.sca_gathered.default).meta["val"]
    assert val.dtype == torch.float16


def test_onnx_is_the_reference_static_form(ops_on_references):
    """The op exports as the reference system's SCA (one MSDA plugin node over B*N images, mask
    multiply, sum, clamped count), and that graph computes what the op computes."""
    import numpy as np
    import onnx

    from bevdeploy.export import onnx as ox

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    shapes, value, ref, mask, offsets, logits = _tiny()
    mask[0, 1, 2] = 1.0  # query 2: two cameras; query 1: none
    args = (value, ref, mask, offsets, logits)
    proto = ox.export_onnx(_Gathered(), args)
    plugins = ox.plugin_nodes(proto)
    assert [n.op_type for n in plugins] == ["MultiScaleDeformableAttnTRT"]
    inferred = onnx.shape_inference.infer_shapes(proto)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    assert dims[plugins[0].input[0]] == [2, 18, 1, 3]  # value [B*N, S, H, D]
    assert dims[plugins[0].input[2]] == [2, 3, 1, 4]  # reference points [B*N, Q, 1, R*2]
    assert dims[plugins[0].input[3]] == [2, 3, 1, 8]  # offsets [B*N, Q, H, L*P*2]
    ops = {n.op_type for n in proto.graph.node}
    assert {"Mul", "ReduceSum", "Max", "Div"} <= ops
    # run it: the plugin as onnxruntime-extensions' Python op (as check_onnx does)
    ox._register_python_ops(proto)
    for node in ox.plugin_nodes(proto):
        node.domain = ox.CHECK_DOMAIN
    proto.opset_import.append(onnx.helper.make_opsetid(ox.CHECK_DOMAIN, 1))
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(np.asarray(session.run(None, feeds)[0]))
    assert_rel_close(got, reference(*(t.double() for t in (value,)), shapes, ref.double(), mask, offsets.double(),
                                    logits.double()), REL_TOL["fp32"])


# ------------------------------------------------------------------------------ BEVFormer switch


def test_bevformer_gathered_switch_gives_the_same_output(device, monkeypatch):
    """A reduced BEVFormer (random weights, a rig with blind spots and overlaps): the static form and
    the gathered form, whose SCA runs the Triton kernel (on a CPU through the interpreter, the other
    ops on their references), give the same outputs; set_sca_gathered finds every SCA."""
    from bevdeploy.engine.deploy import set_sca_gathered
    from bevdeploy.models import BEVFormer
    from tests.models._helpers import randomize_, rig_lidar2img, small_config

    if device.type == "cpu" and type(getattr(sca_module, "_sca_fwd_kernel", None)).__name__ != "InterpretedFunction":
        pytest.skip("the SCA kernel was not decorated under Triton's interpreter (BEVDEPLOY_TEST_INTERPRET=0)")
    cfg = small_config("bevformer-tiny", num_encoder_layers=2, num_decoder_layers=1)
    torch.manual_seed(0)
    model = randomize_(BEVFormer.from_config(cfg)).eval().to(device)
    g = torch.Generator().manual_seed(1)
    H_img, W_img = cfg.image_size
    inputs = dict(image=torch.randn(1, 6, 3, H_img, W_img, generator=g), lidar2img=rig_lidar2img(1, cfg.image_size),
                  can_bus=torch.zeros(1, 18), prev_bev=torch.randn(1, cfg.num_bev, cfg.embed_dims, generator=g),
                  use_prev_bev=torch.ones(1))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU: every op on its reference ...
    calls = []
    real = sca_module._sca_triton
    monkeypatch.setattr(sca_module, "_sca_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sca_module, "use_triton", lambda t: True)  # ... except the gathered SCA's kernel
    with torch.no_grad():
        static = model(**inputs)
        names = set_sca_gathered(model, True)
        assert names == [f"pts_bbox_head.transformer.encoder.layers.{i}.attentions.1" for i in range(2)]
        gathered = model(**inputs)
        encoder = model.pts_bbox_head.transformer.encoder
        ref_3d = encoder.reference_points_3d(cfg.bev_h, cfg.bev_w, device, torch.float32)
        seen = encoder.point_sampling(ref_3d, inputs["lidar2img"])[1].sum(1)
    assert len(calls) == 2  # one kernel launch per encoder layer, none in the static form
    assert (seen == 0).any() and (seen >= 2).any()  # the rig exercises blind queries and overlaps
    for k in static:
        assert_rel_close(gathered[k], static[k], 1e-5, name=k)
    set_sca_gathered(model, False)
    with torch.no_grad():
        again = model(**inputs)
    for k in static:
        assert torch.equal(again[k], static[k])


def test_apply_precision_turns_the_gathered_op_on():
    from bevdeploy.engine.deploy import apply_precision
    from bevdeploy.models import BEVFormer
    from tests.models._helpers import small_config

    model = BEVFormer.from_config(small_config("bevformer-tiny", num_encoder_layers=1, num_decoder_layers=1)).eval()
    scas = [m for m in model.modules() if hasattr(m, "gathered")]
    assert scas and not any(m.gathered for m in scas)  # the eager model (and its ONNX export): static form
    apply_precision(model, "fp16x2")
    assert all(m.gathered for m in scas)
    assert all(m.deformable_attention.op_variant == "fp16x2" for m in scas)


@pytest.mark.parametrize("launch", [(2, 1), (16, 8)])
def test_other_launch_configs_agree(device, launch):
    # the benchmark's (BLOCK_Q, num_warps) sweep: smaller and larger query blocks give the same result
    value, ref, offsets, logits = _inputs(device, 4)
    mask = _mask().to(device)
    out = poisoned((B, Q, H * 4), torch.float32, device)
    _sca_triton(value, SHAPES, ref, mask, offsets, logits, "fp32", out=out, launch=launch)
    assert_rel_close(out, _expected(value.double(), ref, mask, offsets, logits), REL_TOL["fp32"])
