"""calibrate(): hooks, table contents (checked against the test's own hooks), save/load, errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from bevdeploy.quant.calib import EntropyCalibrator, PercentileCalibrator
from bevdeploy.quant.calibrate import CalibrationTable, calibrate


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
