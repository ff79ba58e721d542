"""HybridStitch runtime: run stitched SD3 denoising schedules on exported engines.

``import hs_runtime`` needs only torch and numpy; engine libraries (onnxruntime, tensorrt) and
diffusers are imported when a backend or the prompt-to-image pipeline is first used.
"""

from .contract import GRAPH_NAMES, ModelDims, graph_spec
from .errors import HybridStitchError
from .plans import PLAN_NAMES, MaskConfig, Plan, PlanConfig, make_plan
from .runtime import HybridStitchRuntime
from .sampler import Conditioning, DenoiseResult, StitchedSampler

__version__ = "0.1.0"

__all__ = [
    "GRAPH_NAMES", "ModelDims", "graph_spec", "HybridStitchError", "PLAN_NAMES", "MaskConfig", "Plan",
    "PlanConfig", "make_plan", "HybridStitchRuntime", "Conditioning", "DenoiseResult", "StitchedSampler",
]
