"""Quality of every plan against the large model: distances, speedups, fronts (``hs-export quality``)."""

from .adherence import read_scene, score_image
from .prompts import load_prompts
from .runner import QualityConfig, run_quality
from .stats import bootstrap_mean, paired_vs_front
from .sweeps import STANDARD_SWEEP, plan_variants

__all__ = ["QualityConfig", "run_quality", "load_prompts", "plan_variants", "STANDARD_SWEEP", "score_image", "read_scene", "bootstrap_mean", "paired_vs_front"]
