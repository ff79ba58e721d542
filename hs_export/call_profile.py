"""``hs-export bench --calls``: a plan's time graph call by graph call, next to the FLOP model.

The plan table says how far a plan is from its FLOP ideal; this says which call makes the gap.
Each kind of call (:class:`~hs_runtime.sampler.CallShape`: graph, tokens recomputed and cached,
K/V outputs or not) gets its count per denoise, its median time, and its time and FLOPs as
multiples of one dense large call timed in the same run (the ``large`` plan's): a call whose
time multiple is above its FLOP multiple costs more than its FLOPs say (``efficiency`` < 1):
weights read for few rows, the cached context copied, per-node costs.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Mapping

from hs_runtime.contract import LARGE, ModelDims
from hs_runtime.sampler import CallShape


def dense_large_reference(rounds: list[Mapping[CallShape, list[float]]], dims: Mapping[str, ModelDims]) -> tuple[float, float] | None:
    """Median seconds and FLOPs of a dense large call (every image token, text recomputed, no
    K/V outputs) in ``rounds`` (the ``large`` plan's), or ``None`` if it made none."""
    for shape in dict.fromkeys(s for r in rounds for s in r):
        if shape.graph == LARGE and not shape.image_context and not shape.text_context and not shape.kv_outputs:
            return statistics.median(t for r in rounds for t in r[shape]), shape.flops(dims[LARGE])
    return None


def call_rows(rounds: list[Mapping[CallShape, list[float]]], dims: Mapping[str, ModelDims], reference: tuple[float, float] | None) -> list[dict]:
    """One row per kind of call of a plan's timed ``rounds`` (each: shape → seconds of each
    call), the costliest per denoise first."""
    rows = []
    for shape in dict.fromkeys(s for r in rounds for s in r):
        times = [t for r in rounds for t in r.get(shape, ())]
        per_denoise = statistics.median(len(r.get(shape, ())) for r in rounds)
        median = statistics.median(times)
        flops = shape.flops(dims[shape.graph])
        row = {"call": shape.label(), **asdict(shape), "per_denoise": per_denoise, "median_s": median, "seconds_per_denoise": median * per_denoise, "gflops": flops / 1e9}
        if reference is not None:
            seconds, reference_flops = reference
            time_ratio, flop_ratio = median / seconds, flops / reference_flops
            row.update(time_vs_dense_large=time_ratio, flops_vs_dense_large=flop_ratio, efficiency=flop_ratio / time_ratio)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["seconds_per_denoise"])


def _ratio(row: dict, key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "n/a"


def _plans_with_calls(report: dict) -> list[dict]:
    return [p for p in report["plans"] if p.get("calls")]


def _cells(plan: dict, row: dict) -> list[str]:
    """One call's row as text: plan, backend, call, per denoise, median ms, share of the denoise,
    time ×, FLOPs ×, efficiency (the rich table and the Markdown share them)."""
    return [
        plan["name"], plan["backend"], row["call"], f"{row['per_denoise']:g}", f"{1e3 * row['median_s']:.2f}",
        f"{100 * row['seconds_per_denoise'] / plan['latency_s_median']:.0f}%",
        _ratio(row, "time_vs_dense_large"), _ratio(row, "flops_vs_dense_large"), _ratio(row, "efficiency", 2),
    ]


def calls_table(report: dict):
    """The rich table of every plan's calls (``None`` when the run did not time calls)."""
    from rich.table import Table

    plans = _plans_with_calls(report)
    if not plans:
        return None
    several = len(report["backends"]) > 1
    table = Table(title="graph calls per denoise — median ms; time and FLOPs as multiples of one dense large call of the same run; eff. = FLOPs ÷ time")
    for column in ("plan", *(("backend",) if several else ()), "call", "per denoise", "median ms", "share of denoise", "time ×", "FLOPs ×", "eff."):
        table.add_column(column, justify="left" if column in ("plan", "backend", "call") else "right")
    for plan in plans:
        for row in plan["calls"]:
            cells = _cells(plan, row)
            table.add_row(*(cells if several else cells[:1] + cells[2:]))
    return table


def markdown_calls(report: dict) -> str:
    """The same table as Markdown ("" when the run did not time calls)."""
    plans = _plans_with_calls(report)
    if not plans:
        return ""
    head = "| plan | backend | call | per denoise | median ms | share of denoise | time × dense large | FLOPs × dense large | efficiency |\n|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join("| " + " | ".join(_cells(plan, row)) + " |\n" for plan in plans for row in plan["calls"])
