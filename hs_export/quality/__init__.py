"""Quality of every plan against the large model: distances, speedups, fronts (``hs-export quality``)."""

from .prompts import load_prompts
from .runner import QualityConfig, run_quality
from .sweeps import STANDARD_SWEEP, plan_variants

__all__ = ["QualityConfig", "run_quality", "load_prompts", "plan_variants", "STANDARD_SWEEP"]
