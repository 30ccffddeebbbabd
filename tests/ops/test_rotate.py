import io

import pytest
import torch

from bevdeploy.ops._utils import quantize_int8
from bevdeploy.ops.rotate import Rotate, _rotate_cpu, _rotate_triton, reference, rotate
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

INTERP = {"bilinear": 0, "nearest": 1}
_OUT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16, "int8": torch.float16}


def _channels_last(x):
    """The same values with stride_c == 1 (dense [.., H, W, C] memory), as BEVFormer's prev_bev view."""
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)


def _store(x, variant, scale=0.03):
    """(the variant's stored image, its scale, the float64 values the kernel sees)."""
    if variant == "int8":
        q = quantize_int8(x, scale)
        return q, scale, q.double() * scale
    xs = x if variant == "fp32" else x.half()
    return xs, 1.0, xs.double()


def _run(img, angle, center, interpolation, variant="fp32", scale=1.0, out=None):
    if out is None:
        out = poisoned(img.shape, _OUT_DTYPE[variant], img.device)
    return _rotate_triton(img, angle, center, INTERP[interpolation], variant, scale, out=out)


def _int8_bound(ref, scale):
    # fp32 math on exact int8 values, then one fp16 rounding (2^-11 relative) of the output
    return ref.abs().max().item() * 2.0**-11 + 8 * 127 * scale * 2.0**-23


@pytest.mark.parametrize("interpolation", list(INTERP))
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_matches_reference(device, variant, interpolation, channels_last):
    x = torch.randn(5, 9, 11, device=device)
    xs, scale, x64 = _store(x, variant)
    if channels_last:
        xs = _channels_last(xs)
    angle = torch.tensor([23.5], device=device)
    center = torch.tensor([4.0, 5.5], device=device)
    out_shape = (9, 11, 5) if channels_last else (5, 9, 11)
    out = poisoned(out_shape, _OUT_DTYPE[variant], device)
    out = out.permute(2, 0, 1) if channels_last else out
    _run(xs, angle, center, interpolation, variant, scale, out=out)
    ref = reference(x64, angle.double(), center.double(), interpolation)
    if variant == "int8":
        assert_int8_close(out, ref, _int8_bound(ref, scale))
    else:
        assert_rel_close(out, ref, REL_TOL[variant])


@pytest.mark.parametrize("interpolation", list(INTERP))
def test_zero_degrees_is_identity(device, interpolation):
    x = torch.randn(2, 3, 6, 7, device=device)
    zero = torch.zeros(1, device=device)
    for center in (torch.tensor([3.5, 3.0], device=device), torch.tensor([1.25, 4.0], device=device)):
        assert torch.equal(_run(x, zero, center, interpolation), x)
        assert_rel_close(reference(x, 0.0, center, interpolation), x, 1e-6)


@pytest.mark.parametrize("interpolation", list(INTERP))
def test_quarter_turns_are_rot90(device, interpolation):
    # +90 degrees about the centre of an odd square image = torch.rot90 k=1 (counter-clockwise on
    # screen: the top-right pixel moves to the top-left)
    x = torch.randn(3, 7, 7, device=device)
    for angle, k in [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3), (450.0, 1)]:
        want = torch.rot90(x, k, dims=(-2, -1))
        assert torch.equal(rotate(x, angle, interpolation=interpolation), want), angle
        assert_rel_close(reference(x, angle, None, interpolation), want, 1e-6, f"reference {angle}")
    corner = torch.zeros(1, 7, 7, device=device)
    corner[0, 0, 6] = 1.0
    assert rotate(corner, 90.0)[0, 0, 0] == 1.0


@pytest.mark.parametrize("interpolation", list(INTERP))
def test_batched_angles(device, interpolation):
    x = _channels_last(torch.randn(3, 4, 8, 9, device=device))
    angles = torch.tensor([10.0, -37.5, 200.0], device=device)
    center = torch.tensor([3.0, 4.5], device=device)
    out = _run(x, angles, center, interpolation)
    want = torch.stack([reference(x[i].double(), float(angles[i]), center.double(), interpolation) for i in range(3)])
    assert_rel_close(out, want, REL_TOL["fp32"])
    # one angle for the whole batch
    same = rotate(x, angles[1:2], center, interpolation)
    assert_rel_close(same, reference(x.double(), angles[1:2].double(), center.double(), interpolation), REL_TOL["fp32"])


def test_angle_and_center_forms(device):
    x = torch.randn(2, 5, 6, device=device)
    want = rotate(x, torch.tensor([31.0], device=device), torch.tensor([3.0, 2.5], device=device), "bilinear")
    for angle in (31.0, 31, torch.tensor(31.0, device=device), torch.tensor([31.0], dtype=torch.float64, device=device)):
        for center in ((3.0, 2.5), [3, 2.5], torch.tensor([3.0, 2.5], dtype=torch.float16, device=device)):
            assert torch.equal(rotate(x, angle, center, "bilinear"), want), (angle, center)
    # default centre = image centre (W / 2, H / 2)
    assert torch.equal(rotate(x, 31.0), rotate(x, 31.0, (3.0, 2.5)))


def test_non_contiguous_and_layouts(device):
    # BEVFormer's view: prev_bev [H*W, bs, C] -> [:, i] -> [H, W, C] -> [C, H, W] (stride_c == 1, not dense)
    H, W, C, bs = 7, 8, 6, 2
    prev_bev = torch.randn(H * W, bs, C, device=device)
    img = prev_bev[:, 1].reshape(H, W, C).permute(2, 0, 1)
    angle = torch.tensor([-12.0], device=device)
    out = rotate(img, angle, (4.0, 3.0), "bilinear")
    assert out.stride() == (1, W * C, C)  # channels-last out: permute(1, 2, 0) is a free view
    assert_rel_close(out, reference(img.double(), angle.double(), (4.0, 3.0), "bilinear"), REL_TOL["fp32"])
    # strided channels, channels-first: contiguous out
    x = torch.randn(2, 8, 5, 7, device=device)[:, ::2]
    out = rotate(x, angle, None, "nearest")
    assert out.is_contiguous()
    assert_rel_close(out, reference(x.double(), angle.double(), None, "nearest"), REL_TOL["fp32"])


def test_cpu_reference_path():
    # what the op runs on CPU without the interpreter, in the op's output dtype and layout
    x = _channels_last(torch.randn(4, 5, 6))
    q = quantize_int8(x, 0.05)
    angle, center = torch.tensor([40.0]), torch.tensor([2.0, 3.0])
    out = _rotate_cpu(q, angle, center, 0, "int8", 0.05)
    assert out.dtype == torch.float16 and out.stride() == (1, 6 * 4, 4)
    ref = reference(q.double() * 0.05, angle, center, "bilinear")
    assert_int8_close(out, ref, _int8_bound(ref, 0.05))


def test_module():
    module = Rotate(center=(2.0, 3.0), interpolation="bilinear")
    assert "bilinear" in repr(module) and "(2.0, 3.0)" in repr(module)
    x = torch.randn(3, 6, 5)
    assert torch.equal(module(x, 15.0), rotate(x, 15.0, (2.0, 3.0), "bilinear"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img=torch.randn(5, 6)), r"img must be 3-D or 4-D"),
        (dict(img=torch.randn(2, 5, 6, dtype=torch.float64)), r"img must be float32, float16 or int8"),
        (dict(img=torch.randn(2, 0, 6)), r"non-empty H and W"),
        (dict(angle=torch.zeros(2)), r"angle must have shape \[\], \[1\] or \[B\] with B=1"),
        (dict(angle=torch.zeros(1, 1)), r"angle must have shape"),
        (dict(angle=torch.zeros(1, dtype=torch.int64)), r"angle must have dtype"),
        (dict(center=torch.zeros(3)), r"center must have shape \[2\]"),
        (dict(center=(1.0, 2.0, 3.0)), r"center must be a Tensor \[2\] or a sequence"),
        (dict(interpolation="bicubic"), r"interpolation must be one of"),
        (dict(img=torch.zeros(2, 5, 6, dtype=torch.int8)), r"needs img_scale"),
        (dict(variant="fp16"), r"variant 'fp16' takes img as torch.float16"),
        (dict(angle=torch.zeros(1, device="meta")), r"angle is on meta"),
    ],
)
def test_input_checks(kwargs, match):
    args = dict(img=torch.randn(2, 5, 6), angle=torch.zeros(1), center=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rotate(**args)


def test_angle_type_check():
    with pytest.raises(TypeError, match="angle must be a float or a Tensor"):
        rotate(torch.randn(2, 5, 6), "30")


def test_opcheck():
    x = torch.randn(2, 3, 4, 5)
    op = torch.ops.bevdeploy.rotate.default
    torch.library.opcheck(op, (x, torch.tensor([20.0, -50.0]), torch.tensor([2.0, 1.5]), 0, "fp32", 1.0))
    q = _channels_last(quantize_int8(torch.randn(3, 4, 5), 0.05))
    torch.library.opcheck(op, (q, torch.tensor(33.0), torch.tensor([2.5, 2.0]), 1, "int8", 0.05))


def test_gradient_matches_reference():
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    angle = torch.tensor([17.0], dtype=torch.float64, requires_grad=True)
    center = torch.tensor([2.2, 1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: reference(a, b, c, "bilinear"), (x, angle, center))
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    want = torch.autograd.grad(reference(x, angle, center, "bilinear"), (x, angle, center), g)
    args32 = [t.detach().float().requires_grad_(True) for t in (x, angle, center)]
    got = torch.autograd.grad(rotate(args32[0], args32[1], args32[2], "bilinear"), args32, g.float())
    for a, b, name in zip(got, want, ("img", "angle", "center")):
        assert_rel_close(a, b, 1e-4, name)


class _Tiny(torch.nn.Module):
    def forward(self, bev, angle):
        return rotate(bev, angle, (4.0, 5.0), interpolation="bilinear") + 1


def test_export_round_trip(device):
    bev, angle = torch.randn(3, 9, 8, device=device), torch.tensor([7.5], device=device)
    module = _Tiny()
    with torch.no_grad():
        eager = module(bev, angle)
        ep = torch.export.export(module, (bev, angle))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "bevdeploy" in str(n.target)]
    assert [n.target for n in nodes] == [torch.ops.bevdeploy.rotate.default]
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    with torch.no_grad():
        out = torch.export.load(buf).module()(bev, angle)
    assert torch.equal(out, eager)


@pytest.mark.parametrize("interpolation", list(INTERP))
def test_matches_torchvision(device, interpolation):
    TF = pytest.importorskip("torchvision.transforms.functional")
    mode = TF.InterpolationMode(interpolation)
    x = torch.randn(4, 13, 12, device=device)
    for angle, center in [(17.0, None), (-33.3, (4.0, 7.5)), (90.0, None), (123.0, (2.0, 3.0))]:
        ours = rotate(x, angle, center, interpolation)
        theirs = TF.rotate(x, angle, interpolation=mode, center=None if center is None else list(center))
        ref = reference(x, angle, center, interpolation)
        if interpolation == "bilinear":
            assert_rel_close(ours, theirs, 1e-5, f"{angle}")
            assert_rel_close(ref, theirs, 1e-6, f"reference {angle}")
        else:
            # nearest: a coordinate within rounding error of a half-pixel tie may pick the other
            # pixel (torchvision's grid passes through two more roundings); allow 0.5% of pixels
            for name, got in (("ours", ours), ("reference", ref)):
                differ = (got != theirs).any(0).float().mean().item()
                assert differ <= 0.005, f"{name} {angle}: {differ:.2%} of pixels differ"
            # fill=0 equals zero padding for nearest
            assert torch.equal(TF.rotate(x, angle, interpolation=mode, center=None if center is None else list(center), fill=0), theirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
def test_gpu_bevformer_shapes(variant):
    # prev_bev as BEVFormer rotates it: [C=256, 50, 50] channels-last view, and contiguous
    x = torch.randn(50 * 50, 256, device="cuda")
    angle, center = torch.tensor([3.7], device="cuda"), torch.tensor([100.0, 100.0], device="cuda")
    for layout in ("channels_last", "contiguous"):
        img = x.reshape(50, 50, 256).permute(2, 0, 1)
        img = img if layout == "channels_last" else img.contiguous()
        xs, scale, x64 = _store(img, variant)
        if layout == "channels_last":
            xs = _channels_last(xs)
        for interpolation in INTERP:
            out = _run(xs, angle, center, interpolation, variant, scale)
            ref = reference(x64, angle.double(), center.double(), interpolation)
            if variant == "int8":
                assert_int8_close(out, ref, _int8_bound(ref, scale), f"{layout} {interpolation}")
            else:
                assert_rel_close(out, ref, REL_TOL[variant], f"{layout} {interpolation}")
