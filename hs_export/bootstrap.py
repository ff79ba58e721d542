"""The percentile bootstrap of a mean, shared by the paired quality statistics (over images)
and the bench's paired efficiency (over timing rounds); fixed seed, so a rerun gives the same
interval."""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL, unit: str = "images") -> dict | None:
    """Mean of ``values`` and its percentile-bootstrap interval over them.

    Returns:
        ``{"mean", "ci95": [low, high], unit}`` (``unit``: what was counted, ``"images"`` or the
        bench's ``"rounds"``), or ``None`` for no finite value. One value gives a zero-width
        interval.
    """
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    mean = float(data.mean())
    # The percentile interval of a mean always holds it up to rounding; make that exact.
    return {"mean": mean, "ci95": [min(float(low), mean), max(float(high), mean)], unit: int(data.size)}
