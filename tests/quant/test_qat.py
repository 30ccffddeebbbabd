"""QAT (bevdeploy.quant.qat): STE / LSQ gradients, step-0 equality with the PTQ int8 layers, fine-tuning,
strip and the engine build from learned scales.

Toy models (a few convs and a linear) on the CPU; the int8 layers run on their plain-PyTorch
references (``ops_on_references``), which are the oracle of the int8 kernels in test_int8_kernels.py.
"""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from bevdeploy.quant.calibrate import CalibrationPoint, asymmetric_qparams, calibrate
from bevdeploy.quant.modules import QuantConv2d, QuantLinear, quantize_modules
from bevdeploy.quant.qat import (
    float_finetune,
    QATConv2d,
    QATLinear,
    QATPoint,
    fake_quantize,
    learned_scales,
    learned_zero_points,
    prepare_qat,
    qat_finetune,
    strip_qat,
    tie_shared_inputs,
)


class Toy(nn.Module):
    """Odd sizes; ``dw`` (groups=2) cannot run int8; ``point`` marks a tensor an int8 op would read."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 6, 3, stride=2),
                                  nn.ReLU())
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.point = CalibrationPoint()
        self.side = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 5, 7), nn.ReLU(), nn.Linear(7, 5))

    def forward(self, x):
        y = self.dw(self.body(x))
        return self.head(self.point(y) + self.side(y))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: two threads on a shared CPU only add contention (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy_and_scales(seed=0):
    torch.manual_seed(seed)
    model = Toy().eval()
    data = [torch.randn(2, 3, 9, 11) for _ in range(3)]
    table = calibrate(model, lambda m: [m(x) for x in data], "minmax")
    return model, {n: table.scale(n) for n in table.amax}


def test_fake_quantize_lsq_gradients_and_clamp_blocks_outside_range():
    s = torch.tensor(0.05, requires_grad=True)
    # inside, on a tie (2.5 codes -> 2, half to even), just inside, and saturating on both sides
    x = torch.tensor([0.013, -0.2, 0.125, 6.3, 6.36, -6.4, 9.0, -50.0], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 1.5, 3.0, -1.0, 2.0, 0.7])
    y = fake_quantize(x, s)
    v = x.detach() / 0.05
    codes = torch.clamp(torch.round(v), -127, 127)
    torch.testing.assert_close(y.detach(), codes * s.detach(), rtol=0, atol=0)
    assert y[2].item() == pytest.approx(2 * 0.05)  # 2.5 rounds to the even 2, as the int8 kernels
    (y * g).sum().backward()
    inside = v.abs() <= 127
    assert inside.tolist() == [True, True, True, True, False, False, False, False]
    torch.testing.assert_close(x.grad, torch.where(inside, g, torch.zeros_like(g)))  # STE inside, 0 outside
    lsq = torch.where(inside, torch.round(v) - v, torch.sign(v) * 127)  # LSQ's d(x_hat)/ds per element
    torch.testing.assert_close(s.grad, (g * lsq).sum(), rtol=1e-5, atol=1e-6)


def test_prepare_selects_the_int8_layers_and_keeps_float_ones():
    model, scales = _toy_and_scales()
    scales["side"] = 0.0  # an all-zero calibration input stays float, as in the engine
    prepare_qat(model, scales, keep_float={"head.3"})
    assert type(model.body[0]) is QATConv2d and type(model.body[2]) is QATConv2d
    assert type(model.head[1]) is QATLinear and type(model.point) is QATPoint
    assert type(model.dw) is nn.Conv2d and type(model.side) is nn.Conv2d and type(model.head[3]) is nn.Linear
    assert set(learned_scales(model)) == {"body.0", "body.2", "head.1", "point"}
    for name, s in learned_scales(model).items():  # starts at the calibrated scale, bit for bit
        assert s == torch.tensor(scales[name], dtype=torch.float32).item()
    scoped, _ = _toy_and_scales()
    prepare_qat(scoped, _toy_and_scales()[1], scope=("body.",))
    assert set(learned_scales(scoped)) == {"body.0", "body.2"}


def test_step0_forward_equals_ptq_int8_reference(ops_on_references):
    float_model, scales = _toy_and_scales(seed=1)
    ptq = copy.deepcopy(float_model)
    qat = prepare_qat(copy.deepcopy(float_model), scales)
    del scales["point"]  # the int8 op behind a CalibrationPoint is the model's (BEVDet's pooling)
    report = quantize_modules(ptq, scales, out_dtype=torch.float32)
    assert sum(r.precision == "int8" for r in report) == 5
    assert isinstance(ptq.body[0], QuantConv2d) and isinstance(ptq.head[1], QuantLinear)
    qat.point = CalibrationPoint()  # compare the conv / linear math alone
    torch.manual_seed(2)
    x = torch.randn(3, 3, 9, 11) * 1.5  # some inputs beyond the calibrated range saturate
    with torch.no_grad():
        ref = ptq(x)
        out = qat(x)
        fl = float_model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # same codes, fp32 rounding only
    assert (out - fl).abs().max() > 1e-3  # and the quantization error is really there


def test_gradients_reach_every_scale_and_weight():
    model, scales = _toy_and_scales(seed=3)
    prepare_qat(model, scales)
    model.train()
    x = torch.randn(2, 3, 9, 11)
    model(x).square().mean().backward()
    fq = [m for m in model.modules() if isinstance(m, (QATConv2d, QATLinear, QATPoint))]
    assert len(fq) == 6
    for m in fq:
        g = m.scale_log_ratio.grad
        assert g is not None and torch.isfinite(g) and g != 0, m
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_finetune_lowers_the_loss_then_strip_and_ptq_use_learned_scales(ops_on_references):
    teacher, scales = _toy_and_scales(seed=4)
    student = copy.deepcopy(teacher)
    params_before = {n: p for n, p in student.named_parameters()}
    coarse = {n: 4 * s for n, s in scales.items()}  # a poor start (ranges 4x too wide): QAT has work to do
    prepare_qat(student, coarse, keep_float={"head.3"})
    x = torch.randn(16, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = teacher(x)

    def loss_fn(model, batch):  # distillation from the float model
        inputs, t = batch
        return {"mse": (model(inputs) - t).square().mean()}

    losses = qat_finetune(student, loss_fn, itertools.repeat((x, target)), steps=40, lr=1e-4, scale_lr=3e-2,
                          progress=False)
    assert len(losses) == 40 and all(map(math.isfinite, losses))
    with torch.no_grad():
        after = loss_fn(student, (x, target))["mse"].item()
    assert after < 0.5 * losses[0], (losses[0], after)  # 0.13-0.24 over seeds 4-7
    assert not student.training and type(student.head[3]) is nn.Linear and type(student.dw) is nn.Conv2d
    learned = learned_scales(student)
    assert sum(learned[n] < coarse[n] for n in learned) >= 3  # LSQ shrank the too-wide ranges
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        qat_out = student(x)
    strip_qat(student)
    assert not any(isinstance(m, (QATConv2d, QATLinear, QATPoint)) for m in student.modules())
    assert type(student.point) is CalibrationPoint
    assert {n: p for n, p in student.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in student.named_parameters())  # fine-tuned in place
    assert not torch.equal(student.body[0].weight, teacher.body[0].weight)
    # the learned scales and fine-tuned weights prepare the same QAT model again ...
    ref = prepare_qat(copy.deepcopy(student), learned)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), qat_out, rtol=1e-6, atol=1e-7)
    # ... and the unchanged PTQ conversion on them computes the same int8 math (the toy has no int8 op
    # behind its CalibrationPoint: take the point out of both)
    ref.point = nn.Identity()
    student.point = nn.Identity()
    quantize_modules(student, {n: s for n, s in learned.items() if n != "point"}, out_dtype=torch.float32)
    assert student.body[0].input_scale == learned["body.0"] and student.head[1].input_scale == learned["head.1"]
    with torch.no_grad():
        torch.testing.assert_close(student(x), ref(x), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    model, scales = _toy_and_scales()
    with pytest.raises(TypeError, match="sequence of prefixes"):
        prepare_qat(model, scales, scope="body.")
    with pytest.raises(ValueError, match=r"scales\['body.0'\] must be a positive finite float"):
        prepare_qat(model, {**scales, "body.0": float("nan")})
    with pytest.raises(ValueError, match="keep_float names no module"):
        prepare_qat(model, scales, keep_float={"nope"})
    with pytest.raises(ValueError, match="no layer selected"):
        prepare_qat(model, scales, scope=("nothing.",))
    with pytest.raises(ValueError, match="call prepare_qat first"):
        qat_finetune(model, lambda m, b: {}, iter(()), steps=1)
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="fold BatchNorm first"):
        prepare_qat(with_bn, {"0": 0.1})
    prepare_qat(model, scales)
    with pytest.raises(ValueError, match="already has fake-quant layers"):
        prepare_qat(model, scales)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        qat_finetune(model, lambda m, b: {}, iter(()), steps=-1)
    x = torch.randn(1, 3, 9, 11)
    with pytest.raises(ValueError, match="batches ran out after 1 of 3"):
        qat_finetune(model, lambda m, b: {"l": m(b).mean()}, iter([x]), steps=3, progress=False)
    with pytest.raises(RuntimeError, match="step 0: non-finite loss"):
        qat_finetune(model, lambda m, b: {"l": m(b).mean() * float("inf")}, iter([x]), steps=1, progress=False)


def test_float_finetune_is_the_qat_recipe_without_fake_quantization():
    """The control of a QAT row: the same loop on a float model. It trains (the loss of a repeated batch
    falls), starts from the batch QAT starts from (same first loss up to int8 rounding), and refuses a
    model that still has fake-quant layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = torch.randn(5, 8)
    loss = lambda m, b: {"l": (m(b) - 1.0).pow(2).mean()}  # noqa: E731
    control, quantized = copy.deepcopy(model), copy.deepcopy(model)
    losses = float_finetune(control, loss, itertools.repeat(batch), steps=20, lr=1e-2, progress=False)
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0] and control.training  # mode restored
    assert not torch.equal(control[0].weight, model[0].weight)
    prepare_qat(quantized, {"0": batch.abs().max().item() / 127, "2": 0.05})
    q_losses = qat_finetune(quantized, loss, itertools.repeat(batch), steps=2, lr=1e-2, progress=False)
    assert q_losses[0] == pytest.approx(losses[0], rel=0.05) and q_losses[0] != losses[0]
    with pytest.raises(ValueError, match="has fake-quant layers"):
        float_finetune(quantized, loss, iter([batch]), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        float_finetune(control, loss, iter([batch]), steps=-1)
    with pytest.raises(ValueError, match="batches ran out after 1 of 2 float fine-tune steps"):
        float_finetune(control, loss, iter([batch]), steps=2, progress=False)


def _graph_int8_scales(ep) -> list[float]:
    """The input scale argument of every int8 conv / linear call in an exported program."""
    targets = (torch.ops.bevdeploy.int8_conv2d.default, torch.ops.bevdeploy.int8_linear.default)
    return [n.args[2] for n in ep.graph.nodes if n.op == "call_function" and n.target in targets]


@pytest.mark.slow
def test_build_with_qat_steps_writes_an_engine_of_the_learned_scales(tmp_path, ops_on_references, monkeypatch):
    from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
    from bevdeploy.engine import build
    from bevdeploy.engine.engine import read_metadata
    from bevdeploy.quant import qat
    from bevdeploy.quant.calibrate import CalibrationTable
    from tests.engine.test_engine_bevdet import SMALL

    generate(tmp_path / "world", num_scenes=1, samples_per_scene=2, seed=5, image_size=(64, 192), progress=False)
    data = DataSource(tmp_path / "world", SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=2)
    learned = {}

    real = qat.learned_scales

    def spy(model):  # what the build read from the fine-tuned model
        learned.update(real(model))
        return dict(learned)

    monkeypatch.setattr(qat, "learned_scales", spy)
    # per-layer int8 (no chain): every int8 conv then reads its own input scale, which this test traces
    path = build("bevdet-r50-cbgs", "int8", out=tmp_path / "q.engine", model_overrides=SMALL, calib=data,
                 qat_steps=2, progress=False, int8_chain=False)
    ep, meta = read_metadata(path)
    assert meta["qat"]["steps"] == 2 and meta["qat"]["lr"] == 1e-5 and meta["qat"]["data"].endswith("[:2]")
    assert meta["qat"]["layers"] == len(learned) > 50 and "img_view_transformer.feat_point" in learned
    assert meta["calibration_table_file"] == "q.engine.qat.calib.json"
    ptq = CalibrationTable.load(tmp_path / "q.engine.calib.json")  # the entropy start, kept
    table = CalibrationTable.load(tmp_path / "q.engine.qat.calib.json")
    assert table.method == ptq.method == "entropy" and meta["calibration"]["amax"] == table.amax
    for name, s in learned.items():
        assert table.scale(name) == pytest.approx(s, rel=1e-12)
    assert sum(learned[n] != ptq.scale(n) for n in learned) > len(learned) // 2  # two steps moved the scales
    # the int8 layers of the engine run exactly the learned scales
    in_graph = _graph_int8_scales(ep)
    assert len(in_graph) == meta["int8_layers"] - 1  # the int8 pooling is the one int8 op not a conv
    assert set(in_graph) <= set(learned.values())
    assert {learned[n] for n, p in meta["layer_precisions"] if p == "int8" and n in learned} == set(in_graph)


def test_build_refuses_qat_without_int8_or_data(tmp_path, capsys):
    from bevdeploy.cli import main
    from bevdeploy.engine import build

    assert main(["build", "--model", "bevdet-r50-cbgs", "--precision", "fp16", "--qat-steps", "2",
                 "-o", str(tmp_path / "x.engine")]) == 2
    assert "--qat-steps applies to the int8 / fp8 precisions only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="qat_steps fine-tunes an int8 form"):
        build("bevdet-r50-cbgs", "fp16", out=tmp_path / "x.engine", qat_steps=2)
    with pytest.raises(ValueError, match="QAT needs training data"):
        build("bevdet-r50-cbgs", "int8", out=tmp_path / "x.engine", calib_table="t.json", qat_steps=2)
    with pytest.raises(ValueError, match="qat_steps must be an int >= 0"):
        build("bevdet-r50-cbgs", "int8", out=tmp_path / "x.engine", calib="synthetic:2", qat_steps=-1)


def test_distillation_loss_is_the_relative_error_to_the_frozen_teacher():
    from bevdeploy.quant.qat import distillation_loss

    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 4, 3, padding=1)
    student = copy.deepcopy(teacher)
    loss_fn = distillation_loss(teacher, lambda b: (b,))
    x = torch.randn(2, 3, 5, 7)
    assert float(loss_fn(student, x)["distill_output"]) == 0.0  # the same model: no error
    with torch.no_grad():
        student.bias.add_(0.5)
    terms = loss_fn(student, x)
    t = teacher(x)
    assert float(terms["distill_output"]) == pytest.approx(0.25 / float(t.pow(2).mean()), rel=1e-5)
    terms["distill_output"].backward()
    assert student.bias.grad is not None and teacher.bias.grad is None  # only the student learns
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------ asymmetric inputs


@pytest.mark.parametrize("z", [-128, -100, 37, 127])
def test_asymmetric_fake_quantize_codes_and_gradients(z):
    s = torch.tensor(0.05, requires_grad=True)
    lo, hi = -128 - z, 127 - z  # representable codes, in units of s
    # inside, ties (x.5 codes), both ends of the range exactly, and beyond them
    v_in = torch.tensor([0.0, 0.26, -0.5, 2.5, 3.5, lo, hi, lo + 0.4, hi - 0.4, lo - 0.4, hi + 0.4, lo - 50, hi + 50])
    x = (v_in * 0.05).requires_grad_(True)
    g = torch.linspace(-1.0, 2.0, x.numel())
    y = fake_quantize(x, s, z)
    v = x.detach() / s.detach()
    expected = (torch.clamp(torch.round(v) + z, -128, 127) - z) * s.detach()
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
    assert y[0].item() == 0.0  # zero is exact
    (y * g).sum().backward()
    inside = (v >= lo) & (v <= hi)  # x in [s * (-128 - z), s * (127 - z)]
    torch.testing.assert_close(x.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=0, atol=0)
    lsq = torch.where(inside, torch.round(v) - v, torch.where(v < lo, float(lo), float(hi)))
    torch.testing.assert_close(s.grad, (g * lsq).sum(), rtol=1e-5, atol=1e-6)


def test_zero_point_0_is_the_symmetric_fake_quant_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(1000) * 4
    outs = []
    for args in ((), (0,)):
        xi, si = x.clone().requires_grad_(True), torch.tensor(0.02, requires_grad=True)
        y = fake_quantize(xi, si, *args)
        (y * torch.arange(1000.0)).sum().backward()
        outs.append((y.detach(), xi.grad, si.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for bad in (128, -129, 1.0, True):
        with pytest.raises(ValueError, match="zero_point must be an int in"):
            fake_quantize(x, 0.02, bad)


def _asymmetric_qparams_of_toy(seed=0):
    """The toy, its asymmetric (scale, zero point) per conv / linear, and symmetric scales for the point."""
    torch.manual_seed(seed)
    model = Toy().eval()
    data = [torch.randn(2, 3, 9, 11) for _ in range(3)]
    table = calibrate(model, lambda m: [m(x) for x in data], "minmax")
    qp = {n: table.qparams(n, asymmetric=n != "point") for n in table.amax}
    return model, {n: s for n, (s, _) in qp.items()}, {n: z for n, (_, z) in qp.items()}


def test_prepare_without_zero_points_is_todays_symmetric_qat():
    model, scales = _toy_and_scales(seed=4)
    a = prepare_qat(copy.deepcopy(model), scales)
    b = prepare_qat(copy.deepcopy(model), scales, zero_points={n: 0 for n in scales})
    assert a.state_dict().keys() == b.state_dict().keys()  # no zero-point buffer on a symmetric layer
    assert all("zero_point" not in k for k in a.state_dict())
    x = torch.randn(2, 3, 9, 11)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa.grad, pb.grad), na
    assert set(learned_zero_points(a).values()) == {0}


def test_prepare_with_zero_points_fake_quantizes_the_input_asymmetrically():
    model, scales, zps = _asymmetric_qparams_of_toy(seed=5)
    assert zps["body.2"] == -128 and zps["head.3"] == -128  # ReLU inputs
    assert zps["body.0"] != 0 and zps["point"] == 0
    qat = prepare_qat(copy.deepcopy(model), scales, zero_points=zps)
    assert learned_zero_points(qat) == {n: zps[n] for n in learned_scales(qat)}
    assert "zero_point=-128" in repr(qat.body[2])
    # the input z is a fixed buffer, saved with the module; the scale stays the learnable parameter
    assert "body.2.input_zero_point" in qat.state_dict() and "body.2.scale_log_ratio" in dict(qat.named_parameters())
    assert not any("zero_point" in n for n, _ in qat.named_parameters())
    # a layer's output is the float layer on the fake-quantized input and weight
    lin = qat.head[3]
    s, z = scales["head.3"], zps["head.3"]
    x = torch.relu(torch.randn(64, lin.in_features)) * (s * 255 / 4)  # mostly within the calibrated [0, 255 s]
    w_amax = lin.weight.detach().abs().amax(dim=1, keepdim=True)
    w_fq = torch.round(lin.weight.detach() / (w_amax / 127)) * (w_amax / 127)
    ref = nn.functional.linear(fake_quantize(x, s, z), w_fq, lin.bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    # the ReLU input keeps all 256 codes: twice the symmetric resolution (amax / 127), a quarter of the error
    err_asym = (fake_quantize(x, s, z) - x).square().mean()
    err_sym = (fake_quantize(x, s * 255 / 127) - x).square().mean()
    assert err_asym < err_sym / 3
    # a fresh prepare with the same zero points loads the state dict
    again = prepare_qat(copy.deepcopy(model), scales, zero_points=zps)
    again.load_state_dict(qat.state_dict())
    torch.manual_seed(6)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(again(x), qat(x))
    again.train()
    again(x).square().mean().backward()
    assert all(m.scale_log_ratio.grad != 0 for m in (again.body[0], again.body[2], again.head[1], again.head[3]))


def test_zero_point_errors():
    model, scales, zps = _asymmetric_qparams_of_toy()
    with pytest.raises(ValueError, match=r"zero_points\['point'\] = 5: CalibrationPoint 'point' stays symmetric"):
        prepare_qat(copy.deepcopy(model), scales, zero_points={"point": 5})
    with pytest.raises(ValueError, match="zero_points name layers without a scale"):
        prepare_qat(copy.deepcopy(model), {n: s for n, s in scales.items() if n != "body.0"}, zero_points=zps)
    with pytest.raises(ValueError, match=r"zero_points\['body.0'\] must be an int in \[-128, 127\]"):
        prepare_qat(copy.deepcopy(model), scales, zero_points={"body.0": 200})
    with pytest.raises(TypeError, match="zero_points must be a dict"):
        prepare_qat(copy.deepcopy(model), scales, zero_points=[("body.0", 3)])
    assert asymmetric_qparams(0.0, 1.0)[1] == -128


def test_tie_shared_inputs_gives_the_readers_of_one_tensor_one_learned_scale(ops_on_references):
    """``point`` and ``side`` both read ``dw``'s output: the chained engine quantizes that tensor once, so
    QAT must learn one scale for both (the larger start), trained through both readers."""
    model, scales = _toy_and_scales(seed=1)
    scales = {**scales, "side": scales["point"] * 0.5}  # apart at the start: the tie takes the larger
    prepare_qat(model, scales)
    x = torch.randn(4, 3, 9, 11, generator=torch.Generator().manual_seed(2))
    assert tie_shared_inputs(model, lambda: model(x)) == [["point", "side"]]
    assert model.side.scale_log_ratio is model.point.scale_log_ratio
    assert float(model.side.calib_scale) == float(model.point.calib_scale) == pytest.approx(scales["point"])
    losses = qat_finetune(model, lambda m, b: {"l": m(b).square().mean()}, itertools.repeat(x), steps=3,
                          scale_lr=3e-2, progress=False)  # the shared parameter is optimised once
    learned = learned_scales(model)
    assert len(losses) == 3 and learned["point"] == learned["side"] != pytest.approx(scales["point"])
    assert learned["body.0"] != pytest.approx(scales["body.0"])  # the others still learn their own
