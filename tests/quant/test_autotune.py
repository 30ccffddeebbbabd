"""Build-time launch tuning: the candidate lists, the stored choice reaching the exported graph, and
(on a GPU) a tuned layer giving the same codes as the heuristic's launch."""

import pytest
import torch
from torch import nn

from bevdeploy.quant.autotune import autotune_int8_layers, layer_candidates
from bevdeploy.quant.int8_kernels import gemm_config
from bevdeploy.quant.modules import QuantConv2d, quantize_modules


def _model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 1)).eval().to(device)
    quantize_modules(model, {"0": 0.02, "2": 0.03})
    return model


def test_candidates_start_with_the_heuristic_and_fit_the_shape():
    cuda_like = torch.device("cpu")
    cands = layer_candidates(60000, 64, 64, cuda_like)
    assert cands[0] == gemm_config(60000, 64, 64, cuda_like)
    assert len(cands) == len(set(cands)) >= 3
    tiled = [c for c in cands[1:] if len(c) == 6]  # the per-kernel-point kernel's: K tiles within 64 channels
    assert tiled and all(c[1] <= 128 and c[2] <= 64 for c in tiled)  # no 256-wide tiles for 64 channels


def test_short_k_gemms_try_high_occupancy_and_persistent_launches_first():
    from bevdeploy.quant.autotune import short_k_candidates

    dev = torch.device("cpu")
    heur = gemm_config(34800, 1024, 256, dev)
    cands = layer_candidates(34800, 1024, 256, dev, gemm=True)
    assert cands[:4] == [heur, *short_k_candidates(256)]
    assert [c[:2] for c in cands[1:4]] == [(64, 64), (64, 128), (128, 128)] and cands[3][6] == 1  # persistent
    assert all(c[5] == 2 and c[2] == 128 for c in cands[1:4])  # two stages, K steps of 128
    assert short_k_candidates(64)[0][2] == 64  # a 64-channel K is one step
    for cands in (layer_candidates(34800, 1024, 256, dev), layer_candidates(34800, 1024, 2048, dev, gemm=True)):
        assert all(len(c) == 6 for c in cands)  # not for convs on the implicit-GEMM kernel, nor long K


def test_convs_whose_channels_do_not_fill_k_tiles_try_the_packed_kernel_second():
    from bevdeploy.quant.autotune import _cache_key, packed_k_candidates, packs_k
    from bevdeploy.quant.int8_kernels import PACKED_K

    dev = torch.device("cpu")
    for c in (80, 160, 320, 64):  # YOLOX-x's 3x3 convs, a ResNet's first stage
        cands = layer_candidates(819200, 160, c, dev)
        assert cands[1:3] == packed_k_candidates() and all(x[6] == PACKED_K for x in cands[1:3])
    for c in (256, 640, 24):  # K tiles of 128 full; runs of 16 broken
        assert not packs_k(c, False) and all(len(x) == 6 for x in layer_candidates(9600, 64, c, dev))
    assert not packs_k(160, True)  # the GEMM kernel (a 1x1 conv, a linear) has no kernel points to pack
    key = ("QuantConv2d", (160, 3, 3, 160))
    assert _cache_key(dev, key, packed_k=True) != _cache_key(dev, key)  # cached choices are timed again


def test_tuning_cache_keys_mark_short_k_gemms_and_accept_persistent_choices(tmp_path):
    from bevdeploy.quant.autotune import _cache_key, _runs_gemm_kernel, load_tuning_cache, save_tuning_cache

    model = _model("cpu")
    assert not _runs_gemm_kernel(model[0]) and _runs_gemm_kernel(model[2])  # 3x3 pad 1 / 1x1
    dev, key = torch.device("cpu"), ("QuantConv2d", (24, 1, 1, 32))
    assert _cache_key(dev, key) != _cache_key(dev, key, True)  # choices cached before the new candidates
    path = tmp_path / "cache.json"
    save_tuning_cache(path, {"a": [128, 128, 64, 8, 8, 2, 2], "b": [64, 64, 64, 8, 4, 4]})
    assert load_tuning_cache(path)["a"] == [128, 128, 64, 8, 8, 2, 2]
    path.write_text('{"a": [128, 128, 64, 8, 8]}')
    with pytest.raises(ValueError, match="not a tuning cache"):
        load_tuning_cache(path)


def test_launch_config_is_a_constant_of_the_exported_graph():
    model = _model("cpu")
    model[0].launch_config = (64, 32, 32, 8, 4, 2)
    ep = torch.export.export(model, (torch.randn(1, 16, 6, 5),), strict=False)
    convs = [n for n in ep.graph.nodes if n.target is torch.ops.bevdeploy.int8_conv2d.default]
    assert len(convs) == 2
    configs = [n.kwargs.get("config", n.args[14] if len(n.args) > 14 else None) for n in convs]
    assert configs == [[64, 32, 32, 8, 4, 2], None]
    assert "config=[64, 32, 32, 8, 4, 2]" in repr(model[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and events need a GPU")
def test_autotune_stores_a_choice_and_keeps_the_codes():
    model = _model("cuda")
    x = torch.randn(2, 16, 20, 24, device="cuda")
    with torch.no_grad():
        before = model(x)
    chosen = autotune_int8_layers(model, (x,))
    assert set(chosen) == {"0", "2"}
    assert all(isinstance(m.launch_config, tuple) for m in model if isinstance(m, QuantConv2d))
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
    # a tuning cache filled by one build gives the next one the same choices without timing
    import bevdeploy.quant.autotune as autotune

    cache: dict = {}
    first = autotune_int8_layers(_model("cuda"), (x,), cache=cache)
    assert len(cache) == 2 and all(torch.cuda.get_device_name() in k for k in cache)
    saved = autotune.time_in_graph
    autotune.time_in_graph = None  # calling it would fail: every shape must come from the cache
    try:
        assert autotune_int8_layers(_model("cuda"), (x,), cache=cache) == first
    finally:
        autotune.time_in_graph = saved


def test_tuning_cache_skips_the_timing_of_known_shapes(tmp_path, monkeypatch):
    """A choice is stored under the device, Triton's version and the call's shapes; a build that finds it
    there does not time again (the timing is faked here: CUDA events need a GPU)."""
    import bevdeploy.quant.autotune as autotune
    from bevdeploy.quant.autotune import load_tuning_cache, save_tuning_cache

    timed = []

    def fake_time(fn):  # the last candidate is "fastest": not the heuristic's, so the cache visibly carries it
        timed.append(1)
        return 100.0 - len(timed)

    monkeypatch.setattr(autotune, "time_in_graph", fake_time)
    x = torch.randn(2, 16, 20, 24)
    cache: dict = {}
    first = autotune_int8_layers(_model("cpu"), (x,), cache=cache)
    assert timed and len(cache) == 2 and all(k.startswith("cpu | triton ") for k in cache)
    path = tmp_path / "tune" / "cache.json"
    save_tuning_cache(path, cache)
    save_tuning_cache(path, {"other gpu | triton 0 | (...)": [64, 64, 64, 8, 4, 4]})  # merged, not replaced
    loaded = load_tuning_cache(path)
    assert len(loaded) == 3 and all(loaded[k] == v for k, v in cache.items())

    def no_timing(fn):
        raise AssertionError("timed a shape the cache holds")

    monkeypatch.setattr(autotune, "time_in_graph", no_timing)
    model = _model("cpu")
    assert autotune_int8_layers(model, (x,), cache=loaded) == first
    assert [list(m.launch_config) for m in model if isinstance(m, QuantConv2d)] == [first["0"], first["2"]]
    assert load_tuning_cache(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tuning cache"):
        load_tuning_cache(tmp_path / "bad.json")


def test_choices_reach_the_cache_file_as_they_are_made(tmp_path, monkeypatch):
    """A build cut during tuning (a timeout) keeps on disk the layers it tuned before the cut."""
    import bevdeploy.quant.autotune as autotune
    from bevdeploy.quant.autotune import load_tuning_cache

    path = tmp_path / "cache.json"
    calls = []

    def fake_time(fn):  # the second layer's first timing is "cut": the first layer's choice must be on disk
        calls.append(1)
        if len(load_tuning_cache(path)) == 1:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(autotune, "time_in_graph", fake_time)
    with pytest.raises(KeyboardInterrupt):
        autotune_int8_layers(_model("cpu"), (torch.randn(2, 16, 20, 24),), cache={}, cache_path=path)
    saved = load_tuning_cache(path)
    assert len(saved) == 1 and "QuantConv2d" in next(iter(saved)) and calls


def test_a_config_whose_output_differs_is_named():
    """Autotune and ``bench convs`` time only configs that compute what the heuristic's does."""
    from bevdeploy.quant.autotune import outputs_differ

    q = torch.randint(-127, 127, (64,), dtype=torch.int8)
    assert outputs_differ(q, q) is None and outputs_differ(q + 1, q) is None  # one rounding step
    assert "differ by up to 2" in outputs_differ(q + 2, q)
    y = torch.randn(64)
    assert outputs_differ(y * (1 + 1e-5), y) is None
    assert "relative error" in outputs_differ(y + 1.0, y)
    bad = y.clone()
    bad[3] = float("nan")
    assert "NaN" in outputs_differ(bad, y)


def test_tma_candidates_only_where_the_kernel_can_run():
    from bevdeploy.quant.autotune import tma_candidates

    assert tma_candidates((2, 64, 16, 16), (16, 16), 64, (1, 1), 0, torch.device("cpu")) == []  # no TMA on a CPU
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        dev = torch.device("cuda")
        cands = tma_candidates((2, 160, 40, 40), (40, 40), 320, (1, 1), 0, dev)
        assert cands and all(c[6] == 2 and 160 % c[2] == 0 for c in cands)
        assert tma_candidates((2, 160, 40, 40), (40, 40), 320, (1, 1), 5, dev) == []  # a zero point
        assert tma_candidates((2, 80, 40, 40), (40, 40), 320, (1, 1), 0, dev) == []  # 80 channels: no BLOCK_K >= 32
        assert tma_candidates((2, 64, 41, 40), (21, 20), 64, (2, 2), 0, dev) == []  # odd height at stride 2


def test_tma_candidates_come_second_and_do_not_count_against_the_limit():
    from bevdeploy.quant.autotune import with_tma_candidates

    listed, tma = [(1,), (2,), (3,), (4,)], [(9, 2), (8, 2)]
    assert with_tma_candidates(listed, tma, 3) == [(1,), (9, 2), (8, 2), (2,), (3,)]
    assert with_tma_candidates(listed, [], 2) == [(1,), (2,)]
