import io

import pytest
import torch
import torch.nn.functional as F

from bevdeploy.ops._utils import quantize_int8
from bevdeploy.ops.grid_sample import GridSample, _grid_sample_cpu, _grid_sample_triton, grid_sample, reference
from tests._utils import REL_TOL, assert_int8_close, assert_rel_close, poisoned

MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}


def _inputs(shape, out_hw, device, channels_last=False, spread=1.3):
    """Random input and a grid reaching past [-1, 1] (so every padding mode matters)."""
    N, C, H, W = shape
    x = torch.randn(N, C, H, W, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grid = (torch.rand(N, *out_hw, 2, device=device) * 2 - 1) * spread
    return x, grid


def _ref64(x64, grid, mode, padding, align):
    return F.grid_sample(x64, grid.double(), mode=mode, padding_mode=padding, align_corners=align)


def _run(x, grid, mode, padding, align, variant, scale=1.0):
    N, C = x.shape[:2]
    dtype = torch.float32 if variant == "fp32" else torch.float16
    out = poisoned((N, C, grid.shape[1], grid.shape[2]), dtype, x.device)
    _grid_sample_triton(x, grid, MODES[mode], PADDINGS[padding], align, variant, scale, out=out)
    return out


def _int8_bound(ref, scale):
    # fp32 math on exact int8 values, then one fp16 rounding of the output (half an ulp: 2^-11 relative),
    # plus fp32 slack for up to 16 taps with |weights| summing to < 2.
    return ref.abs().max().item() * 2.0**-11 + 16 * 2 * 127 * scale * 2.0**-23


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("mode", list(MODES))
def test_fp32_every_mode_padding_align(device, mode, padding, align):
    # channels-last for align_corners=True, channels-first otherwise: both load paths in every mode.
    x, grid = _inputs((2, 3, 5, 7), (4, 6), device, channels_last=align)
    out = _run(x, grid, mode, padding, align, "fp32")
    assert_rel_close(out, _ref64(x.double(), grid, mode, padding, align), REL_TOL["fp32"])


@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("nearest", "reflection"), ("bicubic", "border")])
@pytest.mark.parametrize("variant", ["fp16", "fp16x2"])
def test_fp16_variants(device, variant, mode, padding):
    x, grid = _inputs((2, 5, 6, 9), (5, 7), device, channels_last=True)
    xh, gh = x.half(), grid.half()
    out = _run(xh, gh, mode, padding, False, variant)
    assert out.dtype == torch.float16
    assert_rel_close(out, _ref64(xh.double(), gh, mode, padding, False), REL_TOL[variant])


@pytest.mark.parametrize("mode,padding,align", [("bilinear", "border", False), ("nearest", "zeros", True), ("bicubic", "reflection", False)])
@pytest.mark.parametrize("grid_dtype", [torch.float32, torch.float16])
def test_int8(device, mode, padding, align, grid_dtype):
    x, grid = _inputs((2, 5, 6, 9), (5, 7), device, channels_last=True)
    scale = 0.03
    q = quantize_int8(x, scale).contiguous(memory_format=torch.channels_last)
    g = grid.to(grid_dtype)
    out = _run(q, g, mode, padding, align, "int8", scale)
    assert out.dtype == torch.float16
    ref = _ref64(q.double() * scale, g, mode, padding, align)
    assert_int8_close(out, ref, _int8_bound(ref, scale))


@pytest.mark.parametrize("mode", list(MODES))
def test_non_contiguous_inputs(device, mode):
    # strided channels (neither layout), a transposed grid, a grid with a padded last dim,
    # a channels-last input cropped along W (stride_c == 1 but not dense)
    x = torch.randn(2, 6, 5, 7, device=device)[:, ::2]
    g = torch.rand(2, 6, 4, 2, device=device).mul(2.4).sub(1.2).transpose(1, 2)
    assert not x.is_contiguous() and not g.is_contiguous()
    assert_rel_close(_run(x, g, mode, "zeros", False, "fp32"), _ref64(x.double(), g, mode, "zeros", False), REL_TOL["fp32"])
    xc = torch.randn(2, 3, 5, 9, device=device).contiguous(memory_format=torch.channels_last)[..., 1:8]
    g3 = torch.rand(2, 4, 6, 3, device=device).mul(2.4).sub(1.2)[..., :2]
    assert xc.stride(1) == 1 and not g3.is_contiguous()
    assert_rel_close(_run(xc, g3, mode, "border", True, "fp32"), _ref64(xc.double(), g3, mode, "border", True), REL_TOL["fp32"])


@pytest.mark.parametrize("shape,out_hw", [((1, 1, 1, 1), (1, 1)), ((2, 1, 1, 6), (5, 1)), ((1, 2, 6, 1), (3, 4))])
@pytest.mark.parametrize("mode", list(MODES))
def test_odd_sizes(device, shape, out_hw, mode):
    # size-1 dims: align_corners=True reflection has an empty reflection span (ATen returns 0)
    x, grid = _inputs(shape, out_hw, device)
    for padding, align in [("reflection", True), ("zeros", False), ("border", True)]:
        out = _run(x, grid, mode, padding, align, "fp32")
        assert_rel_close(out, _ref64(x.double(), grid, mode, padding, align), REL_TOL["fp32"], f"{padding} {align}")


def test_nearest_rounds_half_to_even(device):
    # align_corners=True, W=5: ix = 2 (x + 1); x = -0.75, -0.25, 0.25, 0.75 land on 0.5, 1.5, 2.5, 3.5
    x = torch.arange(5.0, device=device).view(1, 1, 1, 5)
    gx = torch.tensor([-0.75, -0.25, 0.25, 0.75], device=device)
    grid = torch.stack([gx, torch.zeros_like(gx)], -1).view(1, 1, 4, 2)
    out = _run(x, grid, "nearest", "zeros", True, "fp32")
    assert out.flatten().tolist() == [0.0, 2.0, 2.0, 4.0]
    assert torch.equal(out, F.grid_sample(x, grid, mode="nearest", align_corners=True))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_non_finite_and_huge_coordinates(device, mode):
    # Huge finite coordinates read 0 (outside the image). NaN/inf: bilinear gives NaN there (as
    # ATen's CPU kernel and our reference on every device), nearest reads 0 (as ATen).
    x = torch.randn(1, 3, 4, 5, device=device)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e10, -1e10, 0.3], device=device)
    grid = torch.stack([bad, bad.roll(1)], -1).view(1, 2, 3, 2)
    outside = torch.where(grid.isfinite() & (grid.abs() < 1e6), grid, torch.full_like(grid, -10.0))
    out = _run(x, grid, mode, "zeros", False, "fp32")
    nonfinite = ~grid.isfinite().all(-1)
    assert nonfinite.any() and torch.equal(out.isnan(), nonfinite.unsqueeze(1).expand_as(out) & (mode == "bilinear"))
    torch.testing.assert_close(out.isnan(), reference(x, grid, mode, "zeros", False).isnan())
    keep = ~nonfinite.unsqueeze(1).expand_as(out)
    expected = _ref64(x.double(), outside, mode, "zeros", False)
    assert_rel_close(out[keep], expected[keep], REL_TOL["fp32"])
    finite = torch.stack([bad[3:], bad[3:].flip(0)], -1).view(1, 1, 3, 2)
    out = _run(x, finite, mode, "border", False, "fp32")
    assert_rel_close(out, _ref64(x.double(), finite, mode, "border", False), REL_TOL["fp32"])


def test_public_function_and_module(device):
    x, grid = _inputs((1, 3, 6, 5), (4, 7), device)
    assert_rel_close(grid_sample(x, grid), F.grid_sample(x.double(), grid.double(), align_corners=False), REL_TOL["fp32"])
    module = GridSample("bicubic", "border", align_corners=True)
    assert "bicubic" in repr(module) and "align_corners=True" in repr(module)
    assert_rel_close(module(x, grid), _ref64(x.double(), grid, "bicubic", "border", True), REL_TOL["fp32"])
    out = grid_sample(x.half(), grid.half(), mode="nearest")  # variant inferred: fp16
    assert out.dtype == torch.float16
    q = quantize_int8(x, 0.05)
    out8 = grid_sample(q, grid, variant="int8", input_scale=0.05)
    ref8 = reference(q.double() * 0.05, grid)
    assert out8.dtype == torch.float16
    assert_int8_close(out8, ref8, _int8_bound(ref8, 0.05))


def test_cpu_reference_path():
    # what the op runs on CPU without the interpreter: the reference in the variant's dtypes
    x, grid = _inputs((1, 3, 4, 5), (3, 3), "cpu")
    q = quantize_int8(x, 0.1)
    out = _grid_sample_cpu(q, grid.half(), 2, 2, True, "int8", 0.1)
    assert out.dtype == torch.float16 and out.is_contiguous()
    assert_rel_close(out, _ref64(q.double() * 0.1, grid.half(), "bicubic", "reflection", True), REL_TOL["fp16"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input=torch.randn(3, 4, 5)), r"input must have shape \[N, C, H_in, W_in\]"),
        (dict(grid=torch.zeros(2, 3, 3, 3)), r"grid must have shape \[N, H_out, W_out, 2\]"),
        (dict(grid=torch.zeros(1, 3, 3, 2)), r"grid: the batch size N"),
        (dict(grid=torch.zeros(2, 3, 3, 2, dtype=torch.float64)), r"grid must have dtype"),
        (dict(input=torch.randn(2, 4, 5, 6, dtype=torch.float64)), r"input must be float32, float16 or int8"),
        (dict(input=torch.randn(2, 4, 0, 6)), r"non-empty spatial"),
        (dict(mode="area"), r"mode must be one of"),
        (dict(padding_mode="circular"), r"padding_mode must be one of"),
        (dict(variant="fp16x2"), r"variant 'fp16x2' takes input as torch.float16"),
        (dict(variant="int4"), r"variant must be one of"),
        (dict(input=torch.zeros(2, 4, 5, 6, dtype=torch.int8)), r"needs input_scale"),
        (dict(input=torch.zeros(2, 4, 5, 6, dtype=torch.int8), input_scale=-1.0), r"input_scale must be a positive"),
        (dict(grid=torch.zeros(2, 3, 3, 2, device="meta")), r"grid is on meta"),
    ],
)
def test_input_checks(kwargs, match):
    args = dict(input=torch.randn(2, 4, 5, 6), grid=torch.zeros(2, 3, 3, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        grid_sample(**args)


def test_opcheck():
    x, grid = _inputs((1, 3, 4, 5), (3, 2), "cpu")
    torch.library.opcheck(torch.ops.bevdeploy.grid_sample.default, (x, grid, 0, 2, False, "fp32", 1.0))
    q = quantize_int8(x, 0.05)
    torch.library.opcheck(torch.ops.bevdeploy.grid_sample.default, (q, grid.half(), 1, 0, True, "int8", 0.05))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_gradient_matches_reference(mode):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(1, 3, 2, 2, dtype=torch.float64) * 2.2 - 1.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: reference(a, b, mode, "border", False), (x, grid))
    g = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    ref_grads = torch.autograd.grad(reference(x, grid, mode, "border", False), (x, grid), g)
    x32 = x.detach().float().requires_grad_(True)
    grid32 = grid.detach().float().requires_grad_(True)
    grads = torch.autograd.grad(grid_sample(x32, grid32, mode, "border"), (x32, grid32), g.float())
    for got, want, name in zip(grads, ref_grads, ("input", "grid")):
        assert_rel_close(got, want, 1e-4, name)


class _Tiny(torch.nn.Module):
    def forward(self, x, grid):
        return grid_sample(x, grid, "bicubic", "reflection", True) * 2


def test_export_round_trip(device):
    x, grid = _inputs((1, 3, 4, 5), (3, 4), device)
    module = _Tiny()
    with torch.no_grad():
        eager = module(x, grid)
        ep = torch.export.export(module, (x, grid))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "bevdeploy" in str(n.target)]
    assert [n.target for n in nodes] == [torch.ops.bevdeploy.grid_sample.default]
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    with torch.no_grad():
        out = torch.export.load(buf).module()(x, grid)
    assert torch.equal(out, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["fp32", "fp16", "fp16x2", "int8"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gpu_bev_shape(variant, channels_last):
    # many programs, full channel blocks: the launch configs the benchmarks use
    x, grid = _inputs((2, 64, 50, 50), (40, 44), "cuda", channels_last=channels_last, spread=1.1)
    for mode in MODES:
        if variant == "int8":
            q = quantize_int8(x, 0.03)
            q = q.contiguous(memory_format=torch.channels_last) if channels_last else q
            out = _run(q, grid.half(), mode, "zeros", False, variant, 0.03)
            ref = _ref64(q.double() * 0.03, grid.half(), mode, "zeros", False)
            assert_int8_close(out, ref, _int8_bound(ref, 0.03), mode)
            continue
        xs = x if variant == "fp32" else x.half()
        gs = grid if variant == "fp32" else grid.half()
        out = _run(xs, gs, mode, "zeros", False, variant)
        assert_rel_close(out, _ref64(xs.double(), gs, mode, "zeros", False), REL_TOL[variant], mode)
