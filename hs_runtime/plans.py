"""Schedules as data: a plan is one action per denoising step plus the mask settings.

Actions:
    ``large``   the large model on all tokens.
    ``capture`` a dense large step that also keeps the K/V cache and (re)computes the mask.
    ``hybrid``  small model on all tokens (or only those outside the mask), large model on the
                complex tokens with cached context.
    ``small``   the small model on all tokens.

New schedules are new action tuples; the sampler needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ConfigError, describe
from .validation import check_int, check_number

ACTIONS = ("large", "capture", "hybrid", "small")
PLAN_NAMES = ("large", "small", "tstitch", "srdiff", "hybrid")
MASK_SIGNALS = ("disagreement", "detail")


_RATIO, _MIN_RATIO = 0.02, 0.05  # MaskConfig's defaults, named in its messages


@dataclass(frozen=True)
class MaskConfig:
    """Which tokens the large model refines in the hybrid stage.

    Attributes:
        ratio: fraction of image tokens that are complex, in (0, 1].
        signal: ``disagreement`` (‖v_large − v_small‖ per token) or ``detail`` (high-frequency
            energy of the large model's predicted clean latent).
        dilate: spread each token's score to its 8 neighbours before the top-k, so the chosen
            region grows contiguous (fewer seams) at the same token budget.
        energy: 0 (off): every prompt gets ``ceil(ratio · N)`` tokens. In (0, 1]: the *adaptive*
            mask — per prompt, the fewest tokens whose score energy holds this share of the
            step's total (the error is not equally local in every image), between
            ``min_ratio`` and ``ratio``; a batch shares its largest count. Exact at its limit:
            ``energy=1`` with ``min_ratio=ratio`` is the fixed mask.
        min_ratio: the adaptive mask's lower bound (share of image tokens); unused by a fixed mask.
        reselect_every: 0 (off): the mask of a capture step holds until the next one. k > 0:
            after every k-th hybrid step the mask is chosen again, with the same token count,
            from the ``detail`` score of that step's merged velocity (large inside the mask,
            small outside) — no extra graph call — and both models' context K/V are gathered
            again from the capture step's. Needs ``signal="detail"``; keeps the capture step's
            K/V of every token of both models (once). Exact at ratio 1.0 (the mask is every token).
    """

    # The default hybrid's mask (docs/quality.md: chosen on the paired front of the shapes pair
    # with the default PlanConfig, and confirmed on 64 fresh prompts): 2% of the tokens, so the
    # hybrid steps stay cheap enough for two refreshes within 1.72x ideal at SD3.5 1024².
    ratio: float = _RATIO
    signal: str = "detail"
    dilate: bool = False
    energy: float = 0.0
    min_ratio: float = _MIN_RATIO
    reselect_every: int = 0

    def __post_init__(self):
        for name in ("ratio", "energy", "min_ratio"):
            check_number(f"mask {name}", getattr(self, name))
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(describe("mask ratio out of range", got=self.ratio, expected="a value in (0, 1]"))
        if not 0.0 <= self.energy <= 1.0:
            raise ConfigError(describe("mask energy share out of range", got=self.energy, expected="0 (fixed mask) or a value in (0, 1]"))
        if not 0.0 < self.min_ratio <= 1.0:
            raise ConfigError(describe("mask min_ratio out of range", got=self.min_ratio, expected="a value in (0, 1]"))
        # min_ratio bounds the adaptive mask only: a fixed mask below its default is a plain setting.
        if self.energy and self.min_ratio > self.ratio:
            raise ConfigError(
                describe(
                    "mask min_ratio out of range", got=self.min_ratio, expected=f"a value in (0, ratio={self.ratio}] with the adaptive mask",
                    fix=f"the adaptive mask chooses between min_ratio (--mask-min-ratio, here {self.min_ratio:g}) and ratio (--mask-ratio, here {self.ratio:g}): raise the ratio, or lower min_ratio",
                )
            )
        if self.signal not in MASK_SIGNALS:
            raise ConfigError(describe("unknown mask signal", got=repr(self.signal), expected=" | ".join(MASK_SIGNALS)))
        check_int("mask reselect_every", self.reselect_every, minimum=0)
        if self.reselect_every and self.signal != "detail":
            raise ConfigError(
                describe(
                    "mask re-selection needs the detail signal",
                    got=f"signal={self.signal}",
                    fix="use --mask-signal detail: a hybrid step computes each token with one model only, so no disagreement is measured there",
                )
            )


@dataclass(frozen=True)
class PlanConfig:
    """Parameters of the named plans; CLI defaults come from here.

    Attributes:
        large_fraction: share of steps the large model runs first (``hybrid``, ``srdiff``).
        hybrid_end: share of steps after which the hybrid stage ends (``hybrid``).
        small_fraction: share of steps the small model runs first (``tstitch``).
        refresh_every: in the hybrid stage, every k-th step is a dense ``capture`` step that
            refreshes cache, mask and carried offset (a plain large step where no hybrid step
            follows to read them: the stage's last step, or one before another refresh); 0
            disables.
        refreshes: the same refreshes given as a count spread evenly over the hybrid stage,
            which keeps their share of the stage at any step count; a non-zero
            ``refresh_every`` (a period in steps) replaces it.
        carry_offset: in hybrid steps, the tokens outside the mask get the small model's velocity
            plus the large − small offset measured at the last capture step, instead of the small
            model's velocity alone (no extra graph call; exact at ratio 1.0, where no token is
            outside the mask).
        reuse_text_kv: in hybrid steps, the large model takes the text stream's K/V from the
            capture step instead of recomputing it (exact when the capture step is the same step).
        small_outside_mask: in hybrid steps, the small model runs only on the tokens outside the
            mask, attending to the capture step's K/V of the others (exact at ratio 1.0, where the
            small call is skipped).
    """

    # The default hybrid (docs/quality.md, 2026-12-06: the paired front of the shapes pair,
    # confirmed on 64 fresh prompts): a short large stage, a long hybrid stage whose carried
    # offset two dense large steps refresh, then a short small stage.
    large_fraction: float = 0.15
    hybrid_end: float = 0.75
    small_fraction: float = 0.4
    srdiff_large_fraction: float = 0.4
    refresh_every: int = 0
    refreshes: int = 2
    carry_offset: bool = True
    reuse_text_kv: bool = True
    small_outside_mask: bool = True
    mask: MaskConfig = field(default_factory=MaskConfig)

    def __post_init__(self):
        for name in ("large_fraction", "hybrid_end", "small_fraction", "srdiff_large_fraction"):
            value = check_number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(describe(f"{name} out of range", got=value, expected="a value in [0, 1]"))
        if self.hybrid_end < self.large_fraction:
            raise ConfigError(
                describe("hybrid_end before large_fraction", got=(self.large_fraction, self.hybrid_end), expected="large_fraction <= hybrid_end")
            )
        check_int("refresh_every", self.refresh_every, minimum=0)
        check_int("refreshes", self.refreshes, minimum=0)


@dataclass(frozen=True)
class Plan:
    """A denoising schedule: one action per step, the mask it uses and how hybrid steps run
    (:attr:`PlanConfig.carry_offset`, :attr:`PlanConfig.reuse_text_kv`,
    :attr:`PlanConfig.small_outside_mask`)."""

    name: str
    actions: tuple[str, ...]
    mask: MaskConfig = field(default_factory=MaskConfig)
    carry_offset: bool = False
    reuse_text_kv: bool = False
    small_outside_mask: bool = False

    def __post_init__(self):
        bad = [a for a in self.actions if a not in ACTIONS]
        if bad:
            raise ConfigError(describe("unknown plan action", got=bad[0], expected=" | ".join(ACTIONS)))
        if not self.actions:
            raise ConfigError(describe("a plan needs at least one step", got=0))
        for i, action in enumerate(self.actions):
            if action == "hybrid" and "capture" not in self.actions[:i]:
                raise ConfigError(
                    describe(f"plan '{self.name}': hybrid step {i} has no K/V cache before it", fix="start with at least one large step (increase steps or large_fraction)")
                )

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def small_at_capture(self) -> bool:
        """Whether capture steps also run the small model densely: for the ``disagreement``
        mask, the carried offset, or the K/V its hybrid-step calls reuse."""
        uses = self.mask.signal == "disagreement" or self.carry_offset or self.small_outside_mask
        return "capture" in self.actions and uses

    def count(self, action: str) -> int:
        return sum(a == action for a in self.actions)

    def stages(self) -> str:
        """Compact run-length form, e.g. ``large×3 capture hybrid×7 small×4``."""
        parts, i = [], 0
        while i < len(self.actions):
            j = i
            while j < len(self.actions) and self.actions[j] == self.actions[i]:
                j += 1
            parts.append(self.actions[i] + (f"×{j - i}" if j - i > 1 else ""))
            i = j
        return " ".join(parts)


def _split(steps: int, fraction: float) -> int:
    return int(round(fraction * steps))


def _refresh_steps(length: int, every: int, count: int) -> list[int]:
    """Indices into a hybrid stage of ``length`` steps that refresh: every ``every``-th, or
    ``count`` of them spread evenly (the same share of the stage at any step count)."""
    if every:
        return list(range(every, length, every))
    return sorted({round(i * length / (count + 1)) for i in range(1, count + 1)} & set(range(1, length)))


def make_plan(name: str, steps: int, config: PlanConfig | None = None) -> Plan:
    """Builds one of :data:`PLAN_NAMES` for ``steps`` denoising steps."""
    config = config or PlanConfig()
    check_int("steps", steps)
    if name == "large":
        return Plan(name, ("large",) * steps, config.mask)
    if name == "small":
        return Plan(name, ("small",) * steps, config.mask)
    if name == "tstitch":
        k = _split(steps, config.small_fraction)
        return Plan(name, ("small",) * k + ("large",) * (steps - k), config.mask)
    if name == "srdiff":
        k = _split(steps, config.srdiff_large_fraction)
        return Plan(name, ("large",) * k + ("small",) * (steps - k), config.mask)
    if name == "hybrid":
        # a large stage asked for gets at least one step (0.15 of 3 steps rounds to none)
        a = max(_split(steps, config.large_fraction), 1 if config.large_fraction > 0 else 0)
        b = max(_split(steps, config.hybrid_end), a)
        if b > a and a < 1:
            raise ConfigError(
                describe(
                    "hybrid plan needs at least one large step before the hybrid stage",
                    got=f"{steps} steps × large_fraction {config.large_fraction} = 0 large steps",
                    fix="use more steps or a larger large_fraction",
                )
            )
        actions = ["large"] * a + ["hybrid"] * (b - a) + ["small"] * (steps - b)
        if b > a:
            actions[a - 1] = "capture"
            for j in _refresh_steps(b - a, config.refresh_every, config.refreshes):
                actions[a + j] = "capture"
            # a capture no hybrid step follows (the stage's last step, or one before another
            # capture) keeps a cache nothing reads: a plain large step, the same velocity
            # without the capture's small call
            for i in range(a, b):
                if actions[i] == "capture" and (i + 1 == len(actions) or actions[i + 1] != "hybrid"):
                    actions[i] = "large"
        return Plan(
            name, tuple(actions), config.mask, carry_offset=config.carry_offset,
            reuse_text_kv=config.reuse_text_kv, small_outside_mask=config.small_outside_mask,
        )
    raise ConfigError(describe("unknown plan", got=repr(name), expected=" | ".join(PLAN_NAMES)))


def with_mask(plan: Plan, **changes) -> Plan:
    """A copy of ``plan`` with mask fields changed (e.g. ``ratio=0.5`` for a sweep)."""
    return replace(plan, mask=replace(plan.mask, **changes))
