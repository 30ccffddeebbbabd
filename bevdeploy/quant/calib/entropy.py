"""Entropy (KL-divergence) calibration: TensorRT's ``IInt8EntropyCalibrator2`` method, per tensor.

Histogram. ``|x|`` is binned into ``num_bins = 2048`` equal bins over ``[0, amax_seen]`` (the running
max). Collection keeps an exact, finer histogram: the first batch fixes the bin width
``w = max|x_0| / 2048``; when a later batch exceeds the covered range, bins of width ``w`` are
appended, and whenever more than ``2 * 2048`` bins would be needed, adjacent pairs are merged
(``w *= 2``, exact). At :meth:`histogram` time this fine histogram is re-binned once onto 2048 bins
over ``[0, amax_seen]``, spreading each fine bin's count uniformly over its width (the only
approximation: mass moves by less than one fine bin (<= one final bin); none at all when the range
never grew). One big batch and the same data in many batches thus give the same histogram to
within a bin.

KL search (``kl_divergences``), for ``hist`` of ``N`` bins, ``nq = 128`` quantized levels (int8:
the positive half), candidates ``i = 128 .. N`` (inclusive)::

    bins = hist; bins[0] = bins[1]            # the zero spike of ReLU outputs would dominate P
    T = sum(bins)
    P_i[j] = bins[j] (j < i - 1),  P_i[i-1] = bins[i-1] + sum(bins[i:])          # clip outliers
    group(j) = floor(j * nq / i)                                                   # j < i
    Q_i[j] = mean of bins[j'] over the non-zero j' < i of group(j), if bins[j] > 0; else 0
    KL_i = sum_{P_i[j] > 0} p[j] * log(p[j] / q[j]),  p = P_i / T,  q = Q_i / sum(Q_i)
           (= inf where some p[j] > 0 has q[j] = 0, or when sum(Q_i) = 0)
    i* = the LARGEST i with minimal KL_i;   amax = i* * amax_seen / N   (bin edge i*)

This is exactly pytorch_quantization's / modelopt's ``_compute_amax_entropy`` (``calib/histogram.py``):
``bins[0] = bins[1]``, ``start_bin = 128``, ``stride = 1``, ``i`` up to and including ``N``, Q built
from the un-clipped ``bins[:i]`` (outliers are in P only, as in the GTC 2017 slides "8-bit Inference
with TensorRT", S7310), no smoothing (``scipy.stats.entropy``'s normalization and ``inf`` rules),
the last argmin, and ``amax = calib_bin_edges[i*]``. Differences from that code: the histogram
(they grow the bin count at fixed width without bound and search all grown bins; we keep 2048 bins
over the running max), ``sum(Q_i) = 0`` gives ``inf`` here (NaN there, which ``np.argmin`` would pick),
and the sums are regrouped (see ``kl_divergences``; equal to the direct sum to ~1e-11 relative), so
divergences within ``1e-12`` of the minimum count as ties (resolved to the largest ``i`` as the
last argmin does). The GTC slides put the
threshold at ``(i* + 0.5) * bin_width``; the pytorch_quantization code (the reference system's
explicit-quantization tool) uses the edge ``i* * bin_width``, and so do we. TensorRT's own
implementation is closed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bevdeploy.quant.calib.max import check_calib_input

__all__ = ["EntropyCalibrator", "HistogramCalibrator", "entropy_threshold", "kl_divergences"]

#: torch.histc counts in the input's float32: a bin saturates at 2**24, so batches go in chunks.
_HISTC_CHUNK = 1 << 24
#: Divergences this close to the minimum are ties (resolved to the largest threshold).
_KL_TIE = 1e-12


def kl_divergences(hist: np.ndarray, num_quantized_bins: int = 128, start_bin: int = 128) -> np.ndarray:
    """KL(P_i || Q_i) for every candidate threshold bin ``i = start_bin .. len(hist)``.

    See the module docstring for P_i, Q_i and the rules (``bins[0] = bins[1]``, inf where Q_i
    misses mass of P_i).

    Args:
        hist (ndarray[N]): non-negative bin counts of ``|x|`` over ``[0, amax_seen]`` (fractional
            counts allowed), ``N >= start_bin``.
        num_quantized_bins: quantized levels of the positive half (128 for int8).
        start_bin: smallest candidate ``i`` (clipping at most to ``start_bin / N`` of the range).

    Returns:
        ndarray[N - start_bin + 1] (float64): entry ``k`` is the divergence of candidate
        ``i = start_bin + k``.
    """
    bins = np.asarray(hist, dtype=np.float64).copy()
    n = bins.size
    if bins.ndim != 1 or n < 2:
        raise ValueError(f"hist must be a 1-D array of at least 2 bins, got shape {bins.shape}")
    if not 1 <= num_quantized_bins <= start_bin <= n:
        raise ValueError(
            f"need 1 <= num_quantized_bins <= start_bin <= len(hist), got {num_quantized_bins=}, {start_bin=}, {n=}"
        )
    if not np.isfinite(bins).all() or (bins < 0).any():
        raise ValueError("hist must hold finite non-negative counts")
    bins[0] = bins[1]
    total = bins.sum()
    divergences = np.full(n - start_bin + 1, np.inf)
    if total <= 0:
        return divergences
    nq = num_quantized_bins
    # Per candidate i (K = sum(bins[:i]), last = bins[i-1], level g with sum s_g over its c_g
    # non-zero bins and mean m_g = s_g / c_g; every non-zero bin j < i - 1 has p = b_j / T and
    # q = m_g(j) / K), the sum over those bins regroups as
    #   (1/T) [sum b_j log b_j - sum_g s_g log m_g + last * log m_last] + ((K - last)/T) log(K/T)
    # (the last bin j = i - 1 is in level nq - 1 and is added on its own). The first sum is a prefix
    # sum, the second is over nq levels: O(nq) per candidate instead of O(N), with no cancellation
    # worth the name (the terms are ~K log(count), the result ~K * KL; float64 keeps 1e-12).
    b_log_b = np.where(bins > 0, bins * np.log(np.where(bins > 0, bins, 1.0)), 0.0)
    prefix = np.concatenate([[0.0], np.cumsum(bins)])  # prefix[j] = sum(bins[:j])
    prefix_nonzero = np.concatenate([[0], np.cumsum(bins > 0)])
    prefix_b_log_b = np.concatenate([[0.0], np.cumsum(b_log_b)])
    i = np.arange(start_bin, n + 1)[:, None]  # (C, 1) candidates
    # level g holds bins ceil(g*i/nq) .. ceil((g+1)*i/nq) - 1, i.e. floor(j*nq/i) == g; none is empty (i >= nq)
    starts = (np.arange(nq)[None, :] * i + nq - 1) // nq  # (C, nq)
    ends = np.concatenate([starts[:, 1:], i], axis=1)
    level_sum = np.maximum(prefix[ends] - prefix[starts], 0.0)
    level_nonzero = prefix_nonzero[ends] - prefix_nonzero[starts]
    level_mean = level_sum / np.maximum(level_nonzero, 1)
    level_term = np.sum(np.where(level_sum > 0, level_sum * np.log(np.where(level_sum > 0, level_mean, 1.0)), 0.0), axis=1)
    i = i[:, 0]
    kept = prefix[i]  # K
    last = bins[i - 1]
    mean_last = level_mean[:, -1]
    outliers = total - kept
    with np.errstate(divide="ignore", invalid="ignore"):
        body = (prefix_b_log_b[i - 1] - level_term + np.where(last > 0, last * np.log(mean_last), 0.0)) / total
        body += (kept - last) / total * np.log(kept / total)
        p_last = (last + outliers) / total
        tail = np.where(p_last > 0, p_last * np.log(p_last * kept / mean_last), 0.0)
        kl = body + tail
    # inf where Q_i has no mass at all, or none in the last bin that holds the clipped outliers
    missing = (kept <= 0) | ((last <= 0) & (outliers > 0))
    divergences[:] = np.where(missing, np.inf, kl)
    return divergences


def entropy_threshold(hist: np.ndarray, num_quantized_bins: int = 128, start_bin: int = 128) -> int:
    """The threshold bin ``i*`` minimising :func:`kl_divergences` (the largest on ties).

    ``amax = i* * bin_width``. If every candidate is ``inf``, ``i* = len(hist)`` (no clipping).
    Divergences within ``1e-12`` of the minimum count as ties (float noise of the regrouped sums).
    """
    divergences = kl_divergences(hist, num_quantized_bins, start_bin)
    # divergences within float noise of the minimum tie (e.g. exact zeros computed as +-1e-17)
    ties = np.flatnonzero(divergences <= divergences.min() + _KL_TIE)
    return start_bin + int(ties[-1])


class HistogramCalibrator:
    """Collects the 2048-bin histogram of ``|x|`` shared by the entropy and percentile calibrators.

    Subclasses implement :meth:`compute_amax` from :meth:`histogram`. The histogram lives on the
    device of the first collected batch (``torch.histc`` there); each :meth:`collect` syncs once
    with the host (to read ``max |x|``, which also catches NaN/inf).

    Args:
        num_bins: bins over ``[0, amax_seen]`` of the final histogram (2048, TensorRT's count).
    """

    def __init__(self, num_bins: int = 2048) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins=}")
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        """Forget everything collected (and a fixed range)."""
        self._hist: Tensor | None = None  # float64 counts of bins [k*w, (k+1)*w), k < len
        self._width = 0.0
        self._amax_seen = 0.0
        self._num_collected = 0  # elements
        self._pending_zeros = 0  # elements collected while every value so far was 0
        self._fixed: float | None = None

    def fix_range(self, amax: float) -> None:
        """Forget everything and bin the coming data over ``[0, amax]`` exactly (``num_bins`` bins, no growth).

        For a second calibration pass whose range is known from the first (``amax`` = max ``|x|`` of
        the same data): the histogram is then exact, independent of batch order, and histograms of
        several processes add up to the one of all their data (:meth:`all_reduce`).

        Raises:
            ValueError: ``amax`` negative or not finite.
        """
        if not (0.0 <= float(amax) < math.inf):
            raise ValueError(f"amax must be finite and >= 0, got {amax}")
        self.reset()
        if amax > 0.0:
            self._fixed = float(amax)
            self._width = self._fixed / self.num_bins

    def all_reduce(self) -> None:
        """Sum the fixed-range histograms of every process of the job (``torch.distributed``), in place.

        Raises:
            RuntimeError: the range was not fixed with :meth:`fix_range` (growing histograms of
                different processes have different bins and cannot be added exactly).
        """
        import torch.distributed as dist

        from bevdeploy.distributed import comm_device

        if self._fixed is None and (self._hist is not None or self._amax_seen > 0.0):
            raise RuntimeError("all_reduce() needs a histogram over a fixed range: call fix_range() before collecting")
        dev = comm_device()
        hist = self._hist.to(dev) if self._hist is not None else torch.zeros(self.num_bins, dtype=torch.float64, device=dev)
        counts = torch.tensor([self._num_collected, self._pending_zeros], dtype=torch.float64, device=dev)
        dist.all_reduce(hist)
        dist.all_reduce(counts)
        self._num_collected, self._pending_zeros = int(counts[0].item()), int(counts[1].item())
        if self._fixed is not None:
            self._hist = hist
            self._hist[0] += self._pending_zeros
            self._pending_zeros = 0
            self._amax_seen = self._fixed

    @property
    def num_collected(self) -> int:
        """Elements collected since the last reset."""
        return self._num_collected

    def collect(self, x: Tensor) -> None:
        """Add ``|x|`` of one batch (any shape, float dtype, any device) to the histogram.

        Raises:
            RuntimeError: ``x`` holds NaN or inf.
            TypeError: ``x`` is not a floating-point tensor.
        """
        x, x_max = check_calib_input(x)
        if x.numel() == 0:
            return
        self._num_collected += x.numel()
        if x_max == 0.0:
            if self._hist is None:
                self._pending_zeros += x.numel()
            else:
                self._hist[0] += x.numel()
            return
        if self._fixed is not None and x_max > self._fixed:
            raise RuntimeError(f"max |x| {x_max} exceeds the fixed range {self._fixed}: the passes saw different data")
        if self._hist is None:
            self._width = self._width if self._fixed is not None else x_max / self.num_bins
            self._hist = torch.zeros(self.num_bins, dtype=torch.float64, device=x.device)
            self._hist[0] += self._pending_zeros
            self._pending_zeros = 0
        elif self._fixed is None and x_max > self._hist.numel() * self._width:
            self._grow(x_max)
        self._amax_seen = self._fixed if self._fixed is not None else max(self._amax_seen, x_max)
        n = self._hist.numel()
        top = n * self._width
        # histc drops values above `max`; its float32 rounding of `top` must not drop max|x|
        x = x.flatten().clamp_(max=top)
        for chunk in x.split(_HISTC_CHUNK):
            self._hist += torch.histc(chunk, bins=n, min=0.0, max=top).to(self._hist)

    def _grow(self, x_max: float) -> None:
        """Extend the fine histogram at fixed width to cover ``x_max``, merging bin pairs past 2*num_bins."""
        assert self._hist is not None
        hist, width = self._hist, self._width
        needed = math.ceil(x_max / width)
        while needed > 2 * self.num_bins:
            if hist.numel() % 2:
                hist = torch.cat([hist, hist.new_zeros(1)])
            hist = hist.view(-1, 2).sum(dim=1)  # bins 2k, 2k+1 -> k: exact
            width *= 2.0
            needed = math.ceil(x_max / width)
        while needed * width < x_max:
            needed += 1
        self._hist = torch.cat([hist, hist.new_zeros(max(needed - hist.numel(), 0))])
        self._width = width

    def histogram(self) -> tuple[np.ndarray, float]:
        """The collected histogram: ``(counts, amax_seen)``.

        Returns:
            counts (ndarray[num_bins], float64): counts of ``|x|`` in the bins
            ``[k * amax_seen / num_bins, (k + 1) * amax_seen / num_bins)`` (the last one closed);
            fractional where the range grew during collection (see the module docstring).
            amax_seen: the largest ``|x|`` collected.

        Raises:
            RuntimeError: nothing was collected.
        """
        if self._num_collected == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute_amax() called before any data was collected (call collect() first)"
            )
        counts = np.zeros(self.num_bins, dtype=np.float64)
        if self._hist is None:  # every value was zero
            counts[0] = self._pending_zeros
            return counts, 0.0
        fine = self._hist.cpu().numpy()
        if fine.size == self.num_bins:  # the range never grew: the fine histogram is the histogram
            return fine.copy(), self._amax_seen
        # fine bin k covers [k*w, (k+1)*w), the last one [(n-1)*w, amax_seen] (the max set the range);
        # spread each count uniformly over its bin and read the cumulative count at the new edges
        n = fine.size
        fine_edges = np.arange(n + 1) * self._width
        fine_edges[-1] = self._amax_seen
        new_edges = np.arange(self.num_bins + 1) * (self._amax_seen / self.num_bins)
        new_edges[-1] = self._amax_seen
        k = np.clip(np.searchsorted(fine_edges, new_edges, side="right") - 1, 0, n - 1)
        frac = np.clip((new_edges - fine_edges[k]) / (fine_edges[k + 1] - fine_edges[k]), 0.0, 1.0)
        # edges that coincide up to rounding must move no mass: an empty bin has to stay exactly empty
        # (the KL search treats any count > 0 as a populated bin)
        frac[frac < 1e-6] = 0.0
        frac[frac > 1 - 1e-6] = 1.0
        cum = np.concatenate([[0.0], np.cumsum(fine)])
        cum_at = cum[k] + frac * fine[k]
        return np.maximum(np.diff(cum_at), 0.0), self._amax_seen

    def compute_amax(self) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        bins = 0 if self._hist is None else self._hist.numel()
        return (
            f"{type(self).__name__}(num_bins={self.num_bins}, collected={self._num_collected}, "
            f"amax_seen={self._amax_seen:.6g}, fine_bins={bins})"
        )


class EntropyCalibrator(HistogramCalibrator):
    """TensorRT-style entropy calibrator (IInt8EntropyCalibrator2's method): the threshold that
    minimises KL(P || Q) between the clipped and the 128-level quantized histogram of ``|x|``.

    See the module docstring for the exact algorithm.

    Args:
        num_bins: histogram bins over ``[0, max |x|]`` (2048).
        num_quantized_bins: quantized levels of the positive half (128 for int8).
        start_bin: smallest candidate threshold bin (128: amax >= max |x| / 16 with the defaults).
    """

    def __init__(self, num_bins: int = 2048, num_quantized_bins: int = 128, start_bin: int = 128) -> None:
        if not 1 <= num_quantized_bins <= start_bin <= num_bins:
            raise ValueError(
                f"need 1 <= num_quantized_bins <= start_bin <= num_bins, got {num_quantized_bins=}, "
                f"{start_bin=}, {num_bins=}"
            )
        super().__init__(num_bins)
        self.num_quantized_bins = num_quantized_bins
        self.start_bin = start_bin

    def compute_amax(self) -> float:
        """The KL-optimal range ``amax`` (int8 scale = amax / 127); 0.0 if every value was 0.

        Raises:
            RuntimeError: nothing was collected.
        """
        counts, amax_seen = self.histogram()
        if amax_seen == 0.0:
            return 0.0
        best = entropy_threshold(counts, self.num_quantized_bins, self.start_bin)
        return best * amax_seen / self.num_bins
