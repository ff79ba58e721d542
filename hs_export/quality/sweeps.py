"""Plan variants for a quality run: the named plans plus sweeps of each family's knobs.

A sweep is written ``FAMILY:KNOB=V1,V2[:KNOB=V1,V2…]``; knobs of one sweep are crossed, e.g.
``hybrid:ratio=0.2,0.3,0.5:large_fraction=0.15,0.3`` is six hybrid plans. Knobs are the fields
of :class:`~hs_runtime.plans.PlanConfig` and :class:`~hs_runtime.plans.MaskConfig` a family
uses (``srdiff:large_fraction`` is ``srdiff_large_fraction``), so a new plan setting is
sweepable as soon as it exists.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from hs_runtime.errors import ConfigError, describe
from hs_runtime.plans import PLAN_NAMES, MaskConfig, Plan, PlanConfig, make_plan

# Family → knob name → (which config, field name).
_MASK_FIELDS = tuple(f.name for f in dataclasses.fields(MaskConfig))
_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(PlanConfig) if f.name != "mask")
_HYBRID_PLAN_FIELDS = tuple(f for f in _PLAN_FIELDS if f not in ("small_fraction", "srdiff_large_fraction"))
KNOBS: dict[str, dict[str, tuple[str, str]]] = {
    "tstitch": {"small_fraction": ("plan", "small_fraction")},
    "srdiff": {"large_fraction": ("plan", "srdiff_large_fraction")},
    "hybrid": {**{f: ("plan", f) for f in _HYBRID_PLAN_FIELDS}, **{f: ("mask", f) for f in _MASK_FIELDS}},
}

# The sweep docs/quality.md is made with: each family's knob over the 1.3×–2.2× range, the hybrid
# stage boundaries and refreshes with and without the carried offset, each other mechanism once
# around the default, and the former defaults spelled out in full.
STANDARD_SWEEP = (
    "tstitch:small_fraction=0.2,0.4,0.6",
    "srdiff:large_fraction=0.25,0.3,0.35,0.4,0.45,0.5,0.6",
    "hybrid:large_fraction=0.1,0.15,0.2:hybrid_end=0.7,0.75,0.8",
    "hybrid:refreshes=0,1,3",
    "hybrid:ratio=0.05,0.1,0.3,1.0",
    "hybrid:carry_offset=false:refreshes=0,2",
    "hybrid:dilate=true",
    "hybrid:signal=disagreement",
    "hybrid:energy=0.5:ratio=0.4",
    "hybrid:reuse_text_kv=false:small_outside_mask=false,true",
    "hybrid:reselect_every=1",
    "hybrid:large_fraction=0.25:hybrid_end=0.5:refreshes=0:reuse_text_kv=false:small_outside_mask=false:signal=disagreement:ratio=0.3",  # the default until 2026-12-04
    "hybrid:large_fraction=0.25:hybrid_end=0.5:refreshes=0:ratio=0.2",  # the default 2026-12-04 … 06
    "hybrid:large_fraction=0.3:hybrid_end=0.5:refreshes=0:ratio=0.1",  # the default on 2026-12-06
)


@dataclass(frozen=True)
class PlanVariant:
    """One plan of a quality run and how it came about."""

    name: str
    family: str
    plan: Plan
    knobs: dict = field(default_factory=dict)  # the values that differ from the base config


def parse_sweep(text: str) -> tuple[str, dict[str, list]]:
    """``"hybrid:ratio=0.2,0.3:signal=detail"`` → ``("hybrid", {"ratio": [0.2, 0.3], "signal": ["detail"]})``."""
    family, *parts = [p.strip() for p in text.split(":")]
    if family not in KNOBS:
        raise ConfigError(describe("unknown family in --sweep", got=repr(family), expected=" | ".join(KNOBS), fix="write FAMILY:KNOB=V1,V2, e.g. srdiff:large_fraction=0.3,0.4"))
    if not parts:
        raise ConfigError(describe(f"--sweep {text!r} names no knob", expected=f"{family}:KNOB=V1,V2 with KNOB in {' | '.join(KNOBS[family])}"))
    knobs: dict[str, list] = {}
    for part in parts:
        name, sep, values = part.partition("=")
        name = name.strip()
        if not sep or name not in KNOBS[family]:
            raise ConfigError(describe(f"unknown {family} knob in --sweep", got=repr(part), expected=" | ".join(KNOBS[family])))
        if name in knobs:  # the earlier values would be dropped without a word
            raise ConfigError(describe(f"--sweep names {family}:{name} twice", got=repr(text), fix=f"give every value once: {family}:{name}=V1,V2"))
        parsed = [_parse_value(family, name, v.strip()) for v in values.split(",") if v.strip()]
        if not parsed:
            raise ConfigError(describe(f"--sweep {family}:{name} has no values", fix=f"write {family}:{name}=V1,V2"))
        knobs[name] = parsed
    return family, knobs


def _parse_value(family: str, knob: str, text: str):
    kind, field_name = KNOBS[family][knob]
    owner = MaskConfig if kind == "mask" else PlanConfig
    default = getattr(owner(), field_name)
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes", "on")
        return type(default)(text)
    except ValueError:
        raise ConfigError(describe(f"--sweep {family}:{knob} value is not a {type(default).__name__}", got=repr(text))) from None


def configure(base: PlanConfig, family: str, knobs: dict) -> PlanConfig:
    """``base`` with ``knobs`` (family names) applied; validated by the config classes."""
    plan_changes, mask_changes = {}, {}
    for knob, value in knobs.items():
        kind, field_name = KNOBS[family][knob]
        (mask_changes if kind == "mask" else plan_changes)[field_name] = value
    return dataclasses.replace(base, mask=dataclasses.replace(base.mask, **mask_changes), **plan_changes)


def sweep_points(plan_names, sweeps, base: PlanConfig) -> list[tuple[str, dict, PlanConfig]]:
    """Checks ``--plans`` and ``--sweep`` (names, knobs, values: all that needs no step count, so a
    typo is refused before any model loads); every sweep point as ``(family, knobs, config)``."""
    unknown = [p for p in plan_names if p not in PLAN_NAMES]
    if unknown:
        raise ConfigError(describe("unknown plan in --plans", got=unknown, expected=" | ".join(PLAN_NAMES)))
    points = []
    expanded = [s for text in sweeps for s in (STANDARD_SWEEP if text.strip() == "standard" else (text,))]
    for text in expanded:
        family, knobs = parse_sweep(text)
        for values in itertools.product(*knobs.values()):
            point = dict(zip(knobs, values))
            points.append((family, point, configure(base, family, point)))
    return points


def plan_variants(plan_names, sweeps, steps: int, base: PlanConfig, log=print) -> list[PlanVariant]:
    """The named plans (``large`` first, always) then every sweep point, without duplicates.

    Args:
        plan_names: names from :data:`~hs_runtime.plans.PLAN_NAMES`.
        sweeps: ``--sweep`` strings (``"standard"`` expands to :data:`STANDARD_SWEEP`).
    """
    points = sweep_points(plan_names, sweeps, base)
    names = list(dict.fromkeys(plan_names))
    if "large" not in names:
        log("note: added 'large' to the plans: every image is compared with the large plan's image")
    names = ["large"] + [n for n in names if n != "large"]
    variants = [PlanVariant(n, n, make_plan(n, steps, base)) for n in names]
    for family, point, config in points:
        label = ",".join(f"{k}={_show(v)}" for k, v in point.items())
        variants.append(PlanVariant(f"{family}[{label}]", family, make_plan(family, steps, config), point))
    unique, seen = [], {}
    for v in variants:
        key = (v.plan.actions, v.plan.mask if v.plan.count("hybrid") else None, _plan_extras(v.plan))
        if key in seen:  # rendered once, under its first name (said, so a missing row is explained)
            log(f"note: {v.name} is the same schedule as {seen[key]} at {steps} steps: rendered once, as {seen[key]}")
            continue
        seen[key] = v.name
        unique.append(v)
    return unique


def _plan_extras(plan: Plan) -> tuple:
    """Settings of a plan beyond actions and mask that change its result (hashable)."""
    return tuple((f.name, getattr(plan, f.name)) for f in dataclasses.fields(plan) if f.name not in ("name", "actions", "mask"))


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
