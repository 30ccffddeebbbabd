"""calibrate(): hooks, table contents (checked against the test's own hooks), save/load, errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from bevdeploy.quant.calib import EntropyCalibrator, PercentileCalibrator
from bevdeploy.quant.calibrate import CalibrationTable, asymmetric_qparams, calibrate
from bevdeploy.quant.qat import fake_quantize


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 4))
        self.aux = nn.Linear(4, 4)  # never called by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


RUN_LAYERS = ["stem", "body.1", "head.0", "head.2"]


def make_batches(n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 12, 12, generator=g) * (1 + i) for i in range(n)]


def capture_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Every conv/linear input seen while running ``batches``, via forward hooks of the test's own."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].clone()))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return seen


def loop_over(batches):
    def forward_loop(model: nn.Module) -> None:
        for b in batches:
            model(b)

    return forward_loop


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


def test_minmax_table_is_max_abs_input(model, caplog):
    batches = make_batches()
    with caplog.at_level(logging.WARNING, logger="bevdeploy.quant.calibrate"):
        table = calibrate(model, loop_over(batches), "minmax", model_name="small", dataset="random x5")
    assert list(table.amax) == RUN_LAYERS  # exactly the conv/linear layers that ran, in module order
    seen = capture_inputs(model, batches)
    for name in RUN_LAYERS:
        assert table.amax[name] == max(t.abs().max().item() for t in seen[name]), name
        assert table.scale(name) == table.amax[name] / 127
    assert "aux" not in table and "aux" in caplog.text and table.metadata["not_run"] == ["aux"]
    assert table.method == "minmax" and table.num_samples == len(batches)
    assert table.metadata["model"] == "small" and table.metadata["dataset"] == "random x5"
    assert no_hooks_left(model)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_see_the_same_inputs(model, method):
    batches = make_batches()
    table = calibrate(model, loop_over(batches), method, percentile=99.9)
    seen = capture_inputs(model, batches)
    assert list(table.amax) == RUN_LAYERS
    for name in RUN_LAYERS:
        cal = EntropyCalibrator() if method == "entropy" else PercentileCalibrator(99.9)
        for t in seen[name]:
            cal.collect(t)
        assert table.amax[name] == cal.compute_amax(), name
        assert 0 < table.amax[name] <= max(t.abs().max().item() for t in seen[name])
    if method == "percentile":
        assert table.metadata["percentile"] == 99.9


def test_loop_runs_once_without_grad_and_may_count_samples(model):
    calls = []

    def forward_loop(m):
        calls.append(torch.is_grad_enabled())
        for b in make_batches(3):
            m(b)
        return 6  # 3 batches of 2

    table = calibrate(model, forward_loop, "minmax")
    assert calls == [False] and table.num_samples == 6


def test_layer_types_and_shared_modules():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), lin, nn.ReLU(), lin)  # lin runs twice per forward
    x = torch.randn(3, 1, 2, 2)
    table = calibrate(model, lambda m: m(x), "minmax", layer_types=(nn.Linear,))
    assert list(table.amax) == ["2"]  # named_modules() names a shared module once
    first = model[1](model[0](x))
    second = model[3](lin(first))
    assert table.amax["2"] == max(first.abs().max().item(), second.abs().max().item())


def test_fp16_inputs(model):
    batches = [b.half() for b in make_batches(2)]
    table16 = calibrate(model.half(), loop_over(batches), "entropy")
    seen = capture_inputs(model, batches)
    assert all(t.dtype == torch.float16 for ts in seen.values() for t in ts)
    for name in RUN_LAYERS:
        cal = EntropyCalibrator()
        for t in seen[name]:
            cal.collect(t.float())
        assert table16.amax[name] == cal.compute_amax()


def test_hooks_removed_when_the_loop_raises(model):
    def failing_loop(m):
        m(make_batches(1)[0])
        raise KeyError("dataset ran out")

    with pytest.raises(KeyError, match="dataset ran out"):
        calibrate(model, failing_loop)
    assert no_hooks_left(model)


def test_nan_input_names_the_layer(model):
    x = make_batches(1)[0]
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"layer 'stem'.*NaN"):
        calibrate(model, lambda m: m(x), "entropy")
    assert no_hooks_left(model)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(model, lambda m: None, "kl")
    with pytest.raises(ValueError, match="no module of the types"):
        calibrate(nn.ReLU(), lambda m: None)
    with pytest.raises(ValueError, match="percentile must be in"):
        calibrate(model, lambda m: None, "percentile", percentile=120.0)


# ------------------------------------------------------------------------------------------- table


def test_save_load_round_trip(model, tmp_path):
    table = calibrate(model, loop_over(make_batches(2)), "entropy", model_name="small", dataset="random x2")
    path = tmp_path / "small.calib.json"
    table.save(path)
    doc = json.loads(path.read_text())  # plain, inspectable JSON
    assert doc["method"] == "entropy" and set(doc["amax"]) == set(RUN_LAYERS)
    loaded = CalibrationTable.load(path)
    assert loaded == table
    assert list(loaded.amax) == list(table.amax)
    text = str(loaded)
    assert "method entropy" in text and "small" in text and "head.2" in text and "scale" in text


def test_str_lists_top_entries():
    table = CalibrationTable(amax={f"layer{i}": float(i) for i in range(30)}, method="minmax", num_samples=3)
    lines = str(table).splitlines()
    assert "layer29" in lines[3] and "layer10" in str(table) and "layer9 " not in str(table)
    assert "10 more" in lines[-1]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"format": "bevdeploy.calibration_table", "version": 1, "amax": {"a": 1.0', "invalid JSON"),
        ("\x00\x01 binary", "invalid JSON"),
        ('{"format": "something_else", "version": 1}', "not a calibration table"),
        ("[1, 2]", "not a calibration table"),
        ('{"format": "bevdeploy.calibration_table", "version": 99}', "version 99"),
        ('{"format": "bevdeploy.calibration_table", "version": 1, "method": "entropy"}', "lacks"),
    ],
)
def test_load_refuses_corrupt_files(tmp_path, content, match):
    path = tmp_path / "broken.calib.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        CalibrationTable.load(path)
    assert "broken.calib.json" in str(info.value)


@pytest.mark.parametrize("bad", ['"1.0"', "-1.0", "NaN", "Infinity", "true"])
def test_load_refuses_bad_amax(tmp_path, bad):
    path = tmp_path / "bad.calib.json"
    table = CalibrationTable(amax={"conv": 1.0}, method="minmax", num_samples=1)
    path.write_text(table.to_json().replace('"conv": 1.0', f'"conv": {bad}'))
    with pytest.raises(ValueError, match=r"bad.calib.json: amax of 'conv'"):
        CalibrationTable.load(path)


def test_scale_of_unknown_layer():
    table = CalibrationTable(amax={"conv": 2.54}, method="minmax", num_samples=1)
    assert table.scale("conv") == pytest.approx(0.02)
    with pytest.raises(KeyError, match="no calibrated range for layer 'fc'"):
        table.scale("fc")


def sparse_grid_batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Inputs like a splatted BEV grid: empty cells exactly zero, the occupied ones heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 3, 12, 12, generator=g).abs() ** 3 * 4
        out.append(x * (torch.rand(2, 1, 12, 12, generator=g) < 0.5))
    return out


@pytest.mark.parametrize("two_pass", [False, True])
def test_method_overrides_take_the_max_of_the_named_layer(model, two_pass):
    batches = sparse_grid_batches()
    seen = capture_inputs(model, batches)
    peak = max(t.abs().max().item() for t in seen["stem"])
    plain = calibrate(model, loop_over(batches), "entropy", two_pass=two_pass)
    # the failure the override exists for: entropy clips most of a sparse input's range
    assert plain.amax["stem"] < 0.5 * peak
    table = calibrate(model, loop_over(batches), "entropy", two_pass=two_pass, method_overrides={"stem": "minmax"})
    assert table.amax["stem"] == peak
    for name in RUN_LAYERS[1:]:  # the others keep the build's method
        assert table.amax[name] == plain.amax[name], name
    assert table.method == "entropy" and table.metadata["method_overrides"] == {"stem": "minmax"}
    assert no_hooks_left(model)


def test_method_overrides_refuse_unknown_layers_and_methods(model):
    with pytest.raises(ValueError, match="method_overrides names 'nope'"):
        calibrate(model, loop_over(make_batches(1)), "entropy", method_overrides={"nope": "minmax"})
    with pytest.raises(ValueError, match=r"method_overrides\['stem'\] must be one of"):
        calibrate(model, loop_over(make_batches(1)), "entropy", method_overrides={"stem": "kl"})


# ------------------------------------------------------------------- asymmetric (signed ranges)


@pytest.mark.parametrize(
    ("lo", "hi", "zero_point"),
    [
        (0.0, 6.0, -128),  # ReLU: all 256 codes on [0, hi]
        (-0.278, 5.0, -128 + round(0.278 / (5.278 / 255))),  # SiLU: a little below 0
        (-3.0, -1.0, 127),  # all negative: widened to [-3, 0]
        (-2.0, 2.0, 0),  # symmetric range: z = round(-0.5) = 0, the symmetric scheme
        (-1.0, 3.0, -64),
    ],
)
def test_asymmetric_qparams(lo, hi, zero_point):
    scale, z = asymmetric_qparams(lo, hi)
    wide_lo, wide_hi = min(lo, 0.0), max(hi, 0.0)
    assert scale == pytest.approx((wide_hi - wide_lo) / 255, rel=1e-12) and z == zero_point
    assert isinstance(z, int) and -128 <= z <= 127
    # zero is exact (q = z), and every value of the widened range is within half a step after fake quant
    assert fake_quantize(torch.zeros(3), scale, z).tolist() == [0.0, 0.0, 0.0]
    x = torch.linspace(wide_lo, wide_hi, 10001, dtype=torch.float64).float()
    err = (fake_quantize(x, scale, z) - x).abs().max().item()
    assert err <= scale / 2 * (1 + 1e-4), (err, scale)


def test_asymmetric_qparams_edge_cases():
    assert asymmetric_qparams(0.0, 0.0) == (1.0, 0)  # zero width
    assert asymmetric_qparams(0.0, 2.55) == (pytest.approx(0.01), -128)
    with pytest.raises(ValueError, match="finite lo <= hi"):
        asymmetric_qparams(1.0, -1.0)
    with pytest.raises(ValueError, match="finite lo <= hi"):
        asymmetric_qparams(0.0, float("inf"))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_ranges_are_the_signed_min_max_of_every_method(model, method):
    batches = make_batches()
    table = calibrate(model, loop_over(batches), method)
    seen = capture_inputs(model, batches)
    assert list(table.ranges) == list(table.amax) == RUN_LAYERS
    for name in RUN_LAYERS:
        lo, hi = min(t.min().item() for t in seen[name]), max(t.max().item() for t in seen[name])
        assert table.ranges[name] == (lo, hi), name
        assert table.qparams(name, asymmetric=False) == (table.scale(name), 0)
        amax = table.amax[name]
        assert table.qparams(name, asymmetric=True) == asymmetric_qparams(max(lo, -amax), min(hi, amax))
        if method == "minmax":  # no clip: the range's larger end is amax
            assert max(-lo, hi) == amax
    # a ReLU input (body.1 reads the ReLU of the stem) is one-sided: z = -128
    assert table.ranges["body.1"][0] == 0.0 and table.qparams("body.1", asymmetric=True)[1] == -128


def test_asymmetric_qparams_apply_the_entropy_clip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    g = torch.Generator().manual_seed(0)
    # one-sided, heavy-tailed (exponential): entropy clips the tail
    batches = [-torch.rand(20000, 4, generator=g).log() for _ in range(2)]
    table = calibrate(model, loop_over(batches), "entropy")
    lo, hi = table.ranges["0"]
    amax = table.amax["0"]
    assert lo >= 0.0 and amax < hi * 0.9  # the tail is clipped
    scale, z = table.qparams("0", asymmetric=True)
    assert (scale, z) == asymmetric_qparams(lo, amax) and z == -128 and scale == pytest.approx(amax / 255)
    assert scale < table.scale("0") / 1.9  # twice the resolution of the symmetric step
    # a clip below a one-sided range's near end still gives a valid range [-amax, 0]
    clipped = CalibrationTable(amax={"a": 3.0}, method="percentile", num_samples=1, ranges={"a": (-5.0, -4.0)})
    assert clipped.qparams("a", asymmetric=True) == asymmetric_qparams(-3.0, 0.0) == (pytest.approx(3 / 255), 127)


def test_ranges_json_round_trip_and_tables_without_ranges(model, tmp_path):
    table = calibrate(model, loop_over(make_batches(2)), "percentile")
    path = tmp_path / "t.calib.json"
    table.save(path)
    doc = json.loads(path.read_text())
    assert doc["ranges"]["body.1"] == list(table.ranges["body.1"])
    loaded = CalibrationTable.load(path)
    assert loaded.ranges == table.ranges and loaded == table
    # a table written before ranges existed: loads, symmetric works, asymmetric says to re-calibrate
    del doc["ranges"]
    path.write_text(json.dumps(doc))
    old = CalibrationTable.load(path)
    assert old.ranges == {} and old.amax == table.amax
    assert old.qparams("stem", asymmetric=False) == (table.scale("stem"), 0)
    with pytest.raises(KeyError, match="no signed input range for layer 'stem'.*re-calibrate"):
        old.qparams("stem", asymmetric=True)
    with pytest.raises(KeyError, match="no calibrated range for layer 'nope'"):
        old.qparams("nope", asymmetric=False)


@pytest.mark.parametrize("bad", ['[1.0]', '[2.0, 1.0]', '[0.0, "1"]', '[0.0, Infinity]', '{"lo": 0}'])
def test_load_refuses_bad_ranges(tmp_path, bad):
    path = tmp_path / "bad.calib.json"
    table = CalibrationTable(amax={"conv": 1.0}, method="minmax", num_samples=1, ranges={"conv": (-0.5, 1.0)})
    path.write_text(table.to_json().replace('[\n   -0.5,\n   1.0\n  ]', bad))
    assert bad in path.read_text()
    with pytest.raises(ValueError, match=r"bad.calib.json: range of 'conv'"):
        CalibrationTable.load(path)


def _sharded_signed_tables(ctx):
    batches = make_batches(5)[ctx.rank::ctx.world_size]  # 3 and 2 batches
    torch.manual_seed(0)
    net = SmallNet().eval()
    return {method: calibrate(net, loop_over(batches), method, dist=ctx) for method in ("minmax", "entropy")}


def test_two_processes_give_the_single_process_ranges():
    from tests.distributed._spawn import run_in_processes

    tables = run_in_processes(_sharded_signed_tables, 2)
    for method in ("minmax", "entropy"):
        torch.manual_seed(0)
        single = calibrate(SmallNet().eval(), loop_over(make_batches(5)), method, two_pass=True)
        for t in tables:
            assert t[method].ranges == single.ranges, method  # min / max: exact
            assert t[method].amax == single.amax, method
            assert all(t[method].qparams(n, True) == single.qparams(n, True) for n in single.amax)
    torch.manual_seed(0)
    for shard in (make_batches(5)[0::2], make_batches(5)[1::2]):  # no shard alone has the whole range
        assert calibrate(SmallNet().eval(), loop_over(shard), "minmax").ranges != single.ranges
