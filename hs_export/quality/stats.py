"""Paired statistics: each plan against the ``srdiff`` front at the same FLOP-ideal speed.

Every plan renders the same images (prompt × seed), so a plan and the front can be compared
image by image, which cancels most of the spread between images (±7 dB in PSNR to large on the
``shapes`` pair) that makes unpaired means hard to tell apart.

- **The front**: the plans that run the large model for the first ``k`` steps and the small one
  for the rest (``srdiff`` at any fraction, and ``small``, which is ``k = 0``), each at its
  FLOP-ideal speedup at SD3.5-large + SD3.5-medium 1024² (``ideal_speedup_sd35``, the column the
  decisions use).
- **Per image**: the front's value at a plan's speedup is interpolated linearly between the two
  front points that bracket it, per image; the plan's value minus that is the image's
  difference. Outside the front points' speed range nothing is extrapolated: the plan gets no
  comparison (``null``) and the reason.
- **Interval**: the mean difference over images with a percentile bootstrap over images
  (:data:`RESAMPLES` resamples, fixed seed, so a rerun gives the same numbers).
- **Verdict**: ``above`` (better than the front) when the whole 95% interval is on the better
  side of 0, ``below`` when it is on the worse side, else ``level``; ``front`` for the points
  that make the front; ``too few images`` under :data:`MIN_VERDICT_IMAGES` images. "Better" is
  higher for PSNR, SSIM, MS-SSIM and CLIP score, lower for LPIPS.
"""

from __future__ import annotations

import math

from ..bootstrap import LEVEL, RESAMPLES, SEED, bootstrap_mean  # the quality report reads stats.LEVEL

LOWER_IS_BETTER = frozenset({"lpips"})
# A percentile bootstrap over fewer images says little: one image gives a zero-width interval, two
# their [min, max], so any two differences of one sign would read "above". Below this: no verdict.
MIN_VERDICT_IMAGES = 10
FEW_IMAGES = "too few images"


def verdict(interval: dict | None, metric: str) -> str | None:
    """``above`` / ``level`` / ``below`` the front for a difference's interval (plan − front);
    :data:`FEW_IMAGES` under :data:`MIN_VERDICT_IMAGES` images."""
    if interval is None:
        return None
    if interval.get("images", MIN_VERDICT_IMAGES) < MIN_VERDICT_IMAGES:
        return FEW_IMAGES
    low, high = interval["ci95"]
    if metric in LOWER_IS_BETTER:
        low, high = -high, -low
    return "above" if low > 0 else "below" if high < 0 else "level"


def is_front_plan(actions) -> bool:
    """Whether a plan is on the ``srdiff`` front: ``large`` × k then ``small`` × (T − k), k < T."""
    actions = tuple(actions)
    k = 0
    while k < len(actions) and actions[k] == "large":
        k += 1
    return k < len(actions) and all(a == "small" for a in actions[k:])


def paired_vs_front(plans: list[dict], per_image: dict[str, dict[str, list]], metrics, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """Per plan and metric: the difference to the ``srdiff`` front, its mean and interval.

    Args:
        plans: dicts with ``name``, ``actions`` and ``ideal_speedup_sd35``.
        per_image: plan name → metric → one value per image (the same image order for every
            plan; ``None`` or non-finite values drop that image for that metric).
        metrics: the metric names to compare.

    Returns:
        plan name → ``{"match": {...}, metric: {"mean", "ci95", "images", "verdict"} | None}``;
        ``match`` says where the front was read (``at``, ``between``) or why not (``why``).
    """
    front = sorted(((p["ideal_speedup_sd35"], p["name"]) for p in plans if is_front_plan(p["actions"])))
    results = {}
    for plan in plans:
        x, name = plan["ideal_speedup_sd35"], plan["name"]
        entry: dict = {"match": {"at": x}}
        if is_front_plan(plan["actions"]):
            entry["match"]["between"] = [name, name]
            for metric in metrics:
                values = per_image[name].get(metric)
                entry[metric] = None if not _has_values(values) else {"mean": 0.0, "ci95": [0.0, 0.0], "images": len(_finite(values)), "verdict": "front"}
            results[name] = entry
            continue
        bracket = _bracket(front, x)
        if bracket is None:
            span = f"{front[0][0]:.2f}×–{front[-1][0]:.2f}×" if front else "none"
            why = "the srdiff front needs two points" if len(front) < 2 else f"outside the srdiff points' range {span}"
            entry["match"]["why"] = why
            entry.update({metric: None for metric in metrics})
            results[name] = entry
            continue
        (xa, a), (xb, b) = bracket
        weight = 0.0 if xb == xa else (x - xa) / (xb - xa)
        entry["match"]["between"] = [a, b]
        for metric in metrics:
            mine, low, high = (per_image[n].get(metric) for n in (name, a, b))
            if not (_has_values(mine) and _has_values(low) and _has_values(high)):
                entry[metric] = None
                continue
            diffs = [_diff(m, lo, hi, weight) for m, lo, hi in zip(mine, low, high)]
            interval = bootstrap_mean(diffs, resamples, seed)
            entry[metric] = None if interval is None else {**interval, "verdict": verdict(interval, metric)}
        results[name] = entry
    return results


def front_band(points, resamples: int = RESAMPLES, seed: int = SEED) -> list[tuple[float, float, float, float]]:
    """``(speedup, per-image values)`` of the front's points → ``(speedup, mean, low, high)``
    sorted by speedup: the front with its 95% band, for plots."""
    band = []
    for x, values in sorted(points, key=lambda p: p[0]):
        interval = bootstrap_mean(values, resamples, seed)
        if interval is not None:
            band.append((x, interval["mean"], *interval["ci95"]))
    return band


def _bracket(front: list[tuple[float, str]], x: float, tolerance: float = 1e-9):
    for (xa, a), (xb, b) in zip(front, front[1:]):
        if xa - tolerance <= x <= xb + tolerance:
            return (xa, a), (xb, b)
    return None


def _diff(mine, low, high, weight: float):
    if any(v is None or not math.isfinite(v) for v in (mine, low, high)):
        return None
    return mine - ((1 - weight) * low + weight * high)


def _finite(values) -> list[float]:
    return [v for v in values or () if v is not None and math.isfinite(v)]


def _has_values(values) -> bool:
    return bool(_finite(values))
