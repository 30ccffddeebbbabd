"""Calibrators against hand-computed answers and an independent float64 KL search.

The independent search below follows the GTC 2017 pseudocode / pytorch_quantization formulation
(``np.digitize`` over ``linspace(0, i, 129)`` for the levels, direct ``sum p log(p/q)``) and shares
no code with ``bevdeploy.quant.calib.entropy`` (which regroups the sums over prefix sums).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevdeploy.quant.calib import (
    CALIB_METHODS,
    Calibrator,
    EntropyCalibrator,
    MaxCalibrator,
    PercentileCalibrator,
    make_calibrator,
)
from bevdeploy.quant.calib.entropy import entropy_threshold, kl_divergences
from bevdeploy.quant.calib.percentile import percentile_threshold

ALL = [MaxCalibrator, EntropyCalibrator, PercentileCalibrator]


def reference_entropy_bin(hist: np.ndarray, nq: int = 128, start: int = 128) -> int:
    """Straightforward KL search: for each i, build P and Q bin by bin and take KL(P || Q)."""
    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences = []
    for i in range(start, bins.size + 1):
        levels = np.digitize(np.arange(i), np.linspace(0, i, nq + 1)) - 1
        kept = bins[:i]
        nonzero = kept > 0
        level_sum = np.bincount(levels, weights=np.where(nonzero, kept, 0.0), minlength=nq)
        level_count = np.bincount(levels, weights=nonzero.astype(np.float64), minlength=nq)
        q = np.zeros(i)
        q[nonzero] = level_sum[levels[nonzero]] / level_count[levels[nonzero]]
        p = kept.copy()
        p[-1] += bins[i:].sum()
        if q.sum() == 0:
            divergences.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        support = p > 0
        if (q[support] == 0).any():
            divergences.append(np.inf)
        else:
            divergences.append(np.sum(p[support] * np.log(p[support] / q[support])))
    divergences = np.array(divergences)
    return start + int(np.flatnonzero(divergences == divergences.min())[-1])


def uniform_with_outliers(n: int = 200_000, outliers=(7.5, 9.0, 10.0), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand(n, generator=g), torch.tensor(outliers)])
    return x[torch.randperm(x.numel(), generator=g)]


# ---------------------------------------------------------------------------------------------- max


def test_max_known_tensors():
    cal = MaxCalibrator()
    cal.collect(torch.tensor([1.0, -3.0, 2.0]))
    assert cal.compute_amax() == 3.0
    cal.collect(torch.tensor([[-0.5], [4.25]]))
    assert cal.compute_amax() == 4.25
    cal.collect(torch.tensor([-4.0, 0.0]))  # smaller: the running max stays
    assert cal.compute_amax() == 4.25
    cal.collect(torch.tensor([-6.5], dtype=torch.float16))  # fp16 is read in fp32
    assert cal.compute_amax() == 6.5
    cal.reset()
    cal.collect(torch.zeros(3))
    assert cal.compute_amax() == 0.0


def test_max_is_max_abs_of_random_batches():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * s for s in (1.0, 3.0, 0.5)]
    cal = MaxCalibrator()
    for b in batches:
        cal.collect(b)
    assert cal.compute_amax() == max(b.abs().max().item() for b in batches)


# --------------------------------------------------------------------------------------- percentile


def test_percentile_of_evenly_spaced_values():
    # 10000 values k/10000, k = 1..10000 -> max 1.0, bin width 1/2048, bin b = [b/2048, (b+1)/2048).
    # 99%: the 9900th value 0.99 is in bin floor(0.99 * 2048) = 2027 (bins up to 2026 hold 9897
    # values, up to 2027 hold 9902): amax = the lower edge 2027/2048.
    # 90%: 0.9 -> bin 1843 (8999 values below it, 9003 through it): 1843/2048.
    # 99.99%: 9999 values needed, reached only in the last bin 2047: 2047/2048.
    x = torch.arange(1, 10001, dtype=torch.float64).float() / 10000
    for pct, expected in [(99.0, 2027 / 2048), (90.0, 1843 / 2048), (99.99, 2047 / 2048)]:
        cal = PercentileCalibrator(pct)
        cal.collect(x)
        assert cal.compute_amax() == pytest.approx(expected, rel=1e-12), pct


def test_percentile_threshold_function():
    hist = np.array([5.0, 0.0, 3.0, 2.0])  # cdf 0.5, 0.5, 0.8, 1.0
    assert percentile_threshold(hist, 50.0) == 0
    assert percentile_threshold(hist, 50.1) == 2
    assert percentile_threshold(hist, 80.0) == 2
    assert percentile_threshold(hist, 100.0) == 3
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile_threshold(hist, 101.0)
    with pytest.raises(ValueError, match="percentile must be in"):
        PercentileCalibrator(-1.0)


# ------------------------------------------------------------------------------------------ entropy


def test_kl_divergences_hand_computed():
    # 8 bins, 2 quantized levels, candidates i = 2..8. T = 13 (bins[0] = bins[1] = 4 changes nothing).
    hist = np.array([4, 4, 2, 2, 0, 0, 0, 1], dtype=np.float64)
    ln = math.log
    expected = [
        # i=2: levels {0}, {1}; Q = [4, 4]/8; P = [4, 4 + 5 outliers]/13
        4 / 13 * ln((4 / 13) / (1 / 2)) + 9 / 13 * ln((9 / 13) / (1 / 2)),
        # i=3: levels {0, 1}, {2}; Q = [4, 4, 2]/10; P = [4, 4, 2 + 3]/13
        2 * 4 / 13 * ln((4 / 13) / (4 / 10)) + 5 / 13 * ln((5 / 13) / (2 / 10)),
        # i=4: levels {0, 1}, {2, 3}; Q = [4, 4, 2, 2]/12; P = [4, 4, 2, 2 + 1]/13
        2 * 4 / 13 * ln((4 / 13) / (4 / 12)) + 2 / 13 * ln((2 / 13) / (2 / 12)) + 3 / 13 * ln((3 / 13) / (2 / 12)),
        # i=5..7: the clipped outlier lands in an empty bin, where Q is 0
        math.inf,
        math.inf,
        math.inf,
        # i=8: levels {0..3} (mean 3), {4..7} (only bin 7 non-zero: mean 1); Q = [3, 3, 3, 3, 0, 0, 0, 1]/13
        2 * 4 / 13 * ln(4 / 3) + 2 * 2 / 13 * ln(2 / 3),
    ]
    got = kl_divergences(hist, num_quantized_bins=2, start_bin=2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert entropy_threshold(hist, num_quantized_bins=2, start_bin=2) == 4  # KL 0.0135 is the minimum
    assert reference_entropy_bin(hist, nq=2, start=2) == 4

    # the same histogram through the calibrator: values in [0, 8], bin width 1 -> amax = 4 bins = 4.0
    cal = EntropyCalibrator(num_bins=8, num_quantized_bins=2, start_bin=2)
    cal.collect(torch.tensor([0.5] * 4 + [1.5] * 4 + [2.5] * 2 + [-3.5] * 2 + [8.0]))
    np.testing.assert_array_equal(cal.histogram()[0], hist)
    assert cal.compute_amax() == 4.0


def test_entropy_clips_outliers():
    # uniform [0, 1) plus 3 outliers up to 10: 2048 bins of width 10/2048; the uniform part fills
    # bins 0..204. Thresholds between bin 205 and 2047 put the outliers in an empty bin (KL = inf),
    # so the answer is either ~1.0 (clip the outliers) or 10 (keep them); KL picks the clip.
    x = uniform_with_outliers()
    cal = EntropyCalibrator()
    cal.collect(x)
    hist, amax_seen = cal.histogram()
    assert amax_seen == 10.0 and hist.sum() == x.numel()
    expected_bin = reference_entropy_bin(hist)
    assert cal.compute_amax() == pytest.approx(expected_bin * 10.0 / 2048, rel=1e-12)
    assert 0.95 <= cal.compute_amax() <= 1.0 + 10.0 / 2048  # at the top of the uniform part
    assert cal.compute_amax() < amax_seen / 5


def test_entropy_uniform_keeps_the_range():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(200_000, generator=g) * 3.0
    cal = EntropyCalibrator()
    cal.collect(x)
    hist, amax_seen = cal.histogram()
    expected_bin = reference_entropy_bin(hist)
    assert cal.compute_amax() == pytest.approx(expected_bin * amax_seen / 2048, rel=1e-12)
    assert cal.compute_amax() >= 0.98 * amax_seen  # nothing to clip: amax at (or next to) the max


@pytest.mark.parametrize("seed", [3, 4])
def test_entropy_matches_reference_on_skewed_data(seed):
    # heavy-tailed ReLU activations: the threshold lands mid-range, not at an easy edge
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(100_000, generator=g) * torch.rand(100_000, generator=g).pow(3) * 4)
    cal = EntropyCalibrator()
    cal.collect(x)
    hist, amax_seen = cal.histogram()
    expected_bin = reference_entropy_bin(hist)
    assert cal.compute_amax() == pytest.approx(expected_bin * amax_seen / 2048, rel=1e-12)
    assert cal.compute_amax() < amax_seen


def test_entropy_degenerate_inputs():
    cal = EntropyCalibrator()
    cal.collect(torch.full((100,), -3.0))  # one value: only "no clipping" has a finite KL
    assert cal.compute_amax() == 3.0
    cal.reset()
    cal.collect(torch.tensor([0.5] * 100 + [2.0] * 7))  # two spikes: KL 0 at bin 513 and at 2048, ties -> largest
    assert cal.compute_amax() == 2.0
    cal.reset()
    cal.collect(torch.zeros(10))
    assert cal.compute_amax() == 0.0
    cal.collect(torch.ones(10))  # zeros collected before the range existed go to bin 0
    hist, amax_seen = cal.histogram()
    assert amax_seen == 1.0 and hist[0] == 10 and hist[-1] == 10 and hist.sum() == 20


# ---------------------------------------------------------------------------------------- re-binning


def test_histogram_unchanged_when_the_range_does_not_grow():
    x = uniform_with_outliers(50_000)
    first = torch.cat([x[x == 10.0], x[:1000]])  # the max comes first: one grid, exact
    one, many = EntropyCalibrator(), EntropyCalibrator()
    one.collect(torch.cat([first, x[1000:]]))
    many.collect(first)
    for chunk in x[1000:].split(7000):
        many.collect(chunk)
    np.testing.assert_array_equal(one.histogram()[0], many.histogram()[0])


@pytest.mark.parametrize("data", ["outliers", "gauss"])
def test_histogram_regrowth_matches_one_batch_within_a_bin(data):
    if data == "outliers":
        x = uniform_with_outliers(100_000, seed=5)
    else:
        x = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    # batches in increasing order of their max: the range grows ~30 times; a tiny first batch
    # (max / 1000 of the final one) makes the fine histogram merge bin pairs several times
    chunks = sorted(x.split(3000), key=lambda c: c.abs().max().item())
    one, many = EntropyCalibrator(), EntropyCalibrator()
    one.collect(x)
    many.collect(chunks[0] * 1e-3)
    one.collect(chunks[0] * 1e-3)
    for chunk in chunks:
        many.collect(chunk)
    (h1, m1), (h2, m2) = one.histogram(), many.histogram()
    assert m1 == m2 and h2.sum() == pytest.approx(h1.sum(), rel=1e-12)
    # the cumulative counts differ by at most one bin's worth of data (mass moved by < 1 bin)
    cum1, cum2 = np.cumsum(h1), np.cumsum(h2)
    window = np.maximum(h1, np.concatenate([h1[1:], [0]])) + np.concatenate([[0], h1[:-1]])
    assert (np.abs(cum1 - cum2) <= window + 1e-6).all()
    bin_width = m1 / 2048
    assert abs(one.compute_amax() - many.compute_amax()) <= bin_width * (1 + 1e-9)
    p1, p2 = PercentileCalibrator(99.9), PercentileCalibrator(99.9)
    p1.collect(x)
    for chunk in chunks:
        p2.collect(chunk)
    assert abs(p1.compute_amax() - p2.compute_amax()) <= bin_width * (1 + 1e-9)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_refused(cls, bad):
    cal = cls()
    cal.collect(torch.ones(4))
    x = torch.ones(8)
    x[3] = bad
    with pytest.raises(RuntimeError, match="NaN" if math.isnan(bad) else "inf"):
        cal.collect(x)
    with pytest.raises(RuntimeError, match="NaN"):
        cls().collect(torch.tensor([1.0, math.nan], dtype=torch.float16))


@pytest.mark.parametrize("cls", ALL)
def test_compute_before_collect_raises(cls):
    cal = cls()
    with pytest.raises(RuntimeError, match="before any data was collected"):
        cal.compute_amax()
    cal.collect(torch.empty(0, 3))  # nothing in it
    with pytest.raises(RuntimeError, match="before any data was collected"):
        cal.compute_amax()
    cal.collect(torch.tensor([2.0]))
    cal.compute_amax()
    cal.reset()
    with pytest.raises(RuntimeError, match="before any data was collected"):
        cal.compute_amax()
    with pytest.raises(TypeError, match="floating-point"):
        cal.collect(torch.tensor([1, 2]))


@pytest.mark.parametrize("cls", ALL)
def test_fp16_inputs_match_fp32(cls):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(6)).half()
    a, b = cls(), cls()
    a.collect(x)
    b.collect(x.float())
    assert a.compute_amax() == b.compute_amax()


def test_make_calibrator():
    assert isinstance(make_calibrator("minmax"), MaxCalibrator)
    assert isinstance(make_calibrator("entropy"), EntropyCalibrator)
    assert make_calibrator("percentile", percentile=99.9).percentile == 99.9
    assert all(isinstance(make_calibrator(m), Calibrator) for m in CALIB_METHODS)
    with pytest.raises(ValueError, match="method must be one of"):
        make_calibrator("kl")
    with pytest.raises(ValueError, match="start_bin"):
        EntropyCalibrator(num_bins=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [EntropyCalibrator, PercentileCalibrator])
def test_histogram_on_gpu_matches_cpu(cls):
    x = uniform_with_outliers(100_000)
    cpu, gpu = cls(), cls()
    for chunk in x.split(30_000):
        cpu.collect(chunk)
        gpu.collect(chunk.cuda().half())
    assert gpu._hist.device.type == "cuda"
    assert abs(cpu.compute_amax() - gpu.compute_amax()) <= 10.0 / 2048 * (1 + 1e-9)


def test_entropy_clips_silu_outputs_that_relu_outputs_keep():
    """Why YOLOX calibrates by the max (``bevdeploy.engine.model_io.default_calibration_method``): the
    same heavy-tailed pre-activations get a KL threshold near their range's useful top after ReLU, but
    a third of it after SiLU, whose negative lobe (64% of the values, all in [-0.28, 0)) folds onto
    the smallest bins of the |x| histogram and dominates the divergence; the clipped tensor then
    loses 8 dB against its max-calibrated quantization (16 vs 24 dB)."""
    import torch.nn.functional as F

    from bevdeploy.quant.sensitivity import sqnr_db

    g = torch.Generator().manual_seed(0)
    gain = torch.exp(torch.randn(32, 1, generator=g) * 0.5)  # per-channel spread, as after BN
    # a scale mixture of normals: heavy tails, as a trained detector's pre-activations
    pre = torch.randn(32, 20000, generator=g) * torch.exp(torch.randn(32, 20000, generator=g) * 0.5) * gain - 0.3
    amax = {}
    for name, act in (("relu", F.relu), ("silu", F.silu)):
        cal = EntropyCalibrator()
        cal.collect(act(pre))
        amax[name] = cal.compute_amax()
    assert amax["silu"] < 0.5 * amax["relu"]

    def fake_quant(t, a):
        return torch.clamp(torch.round(t / (a / 127)), -127, 127) * (a / 127)

    x = F.silu(pre)
    assert sqnr_db(x, fake_quant(x, x.abs().max().item())) > sqnr_db(x, fake_quant(x, amax["silu"])) + 3
