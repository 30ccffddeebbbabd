"""Percentile calibration: clip at the given percentile of ``|x|``, read off the 2048-bin histogram.

With ``cdf[k] = sum(counts[:k + 1]) / sum(counts)`` over the histogram of
:class:`~bevdeploy.quant.calib.entropy.HistogramCalibrator` (2048 bins over ``[0, max |x|]``)::

    k* = the first bin with cdf[k*] >= percentile / 100
    amax = k* * max|x| / 2048        (the LOWER edge of bin k*)

exactly as pytorch_quantization's / modelopt's ``_compute_amax_percentile``
(``idx = np.searchsorted(cdf, percentile / 100); amax = calib_bin_edges[idx]``), the "histogram"
calibration of the reference system's explicit-quantization tool (99.99 there). The lower edge
means the answer can sit one bin below the exact percentile (and ``percentile=100`` gives the
lower edge of the last non-empty bin, not ``max |x|``).
"""

from __future__ import annotations

import numpy as np

from bevdeploy.quant.calib.entropy import HistogramCalibrator

__all__ = ["PercentileCalibrator", "percentile_threshold"]


def percentile_threshold(hist: np.ndarray, percentile: float) -> int:
    """The bin ``k*`` where the cumulative fraction of ``hist`` first reaches ``percentile / 100``.

    ``amax = k* * bin_width`` (the lower edge of that bin).

    Args:
        hist (ndarray[N]): non-negative bin counts, not all zero.
        percentile: in ``[0, 100]``.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile=}")
    counts = np.asarray(hist, dtype=np.float64)
    cum = np.cumsum(counts)
    if not cum[-1] > 0:
        raise ValueError("hist has no counts")
    cdf = cum / cum[-1]  # cdf[-1] == 1.0 exactly, so k* < N
    return int(np.searchsorted(cdf, percentile / 100.0, side="left"))


class PercentileCalibrator(HistogramCalibrator):
    """Clips at a percentile of ``|x|`` (99.99 by default), on the shared 2048-bin histogram.

    Args:
        percentile: in ``[0, 100]``.
        num_bins: histogram bins over ``[0, max |x|]``.
    """

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile=}")
        super().__init__(num_bins)
        self.percentile = float(percentile)

    def compute_amax(self) -> float:
        """The percentile range ``amax`` (int8 scale = amax / 127); 0.0 if every value was 0.

        Raises:
            RuntimeError: nothing was collected.
        """
        counts, amax_seen = self.histogram()
        if amax_seen == 0.0:
            return 0.0
        return percentile_threshold(counts, self.percentile) * amax_seen / self.num_bins
