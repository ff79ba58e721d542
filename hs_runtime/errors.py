"""One family of errors, so hosts can catch ``HybridStitchError`` and CLIs print one clear line.

Messages read "what | got | expected | how to fix" where those parts apply.
"""


class HybridStitchError(Exception):
    """Base of every error this toolkit raises for bad input or an unservable setup."""


class ConfigError(HybridStitchError, ValueError):
    """A parameter is out of range (plan, ratio, resolution, steps)."""


class ModelLoadError(HybridStitchError):
    """A model folder or hub id cannot be loaded."""


class IncompatibleModelsError(HybridStitchError):
    """The small and large models do not share latent space or text conditioning."""


class ShapeError(HybridStitchError, ValueError):
    """A tensor fed to an engine does not match the engine's contract or built profiles."""


class ManifestError(HybridStitchError):
    """An engine folder is missing, foreign, incomplete, damaged or of another schema version."""


class ExportError(HybridStitchError):
    """ONNX export or its checks failed."""


class BuildError(HybridStitchError):
    """An engine build failed or its backend is not installed."""


class ConcurrencyError(HybridStitchError, RuntimeError):
    """A runtime was used from two threads at once."""


class ToleranceError(HybridStitchError):
    """An engine disagrees with its PyTorch reference beyond tolerance."""


class EngineLoadError(HybridStitchError):
    """An engine library (ONNX Runtime, TensorRT) refused an engine file: damaged, foreign or too new."""


class EngineRunError(HybridStitchError, RuntimeError):
    """An engine library (ONNX Runtime, TensorRT) failed a call whose inputs passed the contract and
    profile checks: the host's or the engine's fault, not the request's; the library's reason."""


class NumericalError(HybridStitchError, ArithmeticError):
    """A graph produced NaN or inf (fp16 overflow, non-finite weights or inputs)."""


class OutOfMemoryError(HybridStitchError, MemoryError):
    """A run needed more device or host memory than was free (an engine call, the text encoders
    or the VAE); the library's own message says how much."""


#: What a run's memory can be cut with, for the out-of-memory message.
OUT_OF_MEMORY_FIX = "fewer prompts per call, a smaller image, fewer served --instances or --models, or --text-dtype bf16; hs-export inspect DIR shows what one run holds"

# ONNX Runtime's allocators ("Failed to allocate memory for requested buffer of size N", its BFC
# arena on CUDA) and its CUDA provider ("CUDA failure 2: out of memory") raise plain runtime errors.
_OUT_OF_MEMORY_TEXT = ("failed to allocate memory", "out of memory")


def out_of_memory(exc: BaseException, where: str) -> "OutOfMemoryError | None":
    """``exc`` as an :class:`OutOfMemoryError` naming ``where``, if it is one: Python's
    ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA), or an ONNX Runtime allocation failure;
    ``None`` for anything else."""
    if isinstance(exc, OutOfMemoryError):
        return exc
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or any(t in text for t in _OUT_OF_MEMORY_TEXT):
        return OutOfMemoryError(describe(f"{where} ran out of memory", got=first_line(exc), fix=OUT_OF_MEMORY_FIX))
    return None


class CancelledError(HybridStitchError):
    """A denoise stopped between steps because its caller's ``should_stop`` said so (e.g. every
    client of a served batch went away)."""


def describe(what: str, got: object = None, expected: object = None, fix: str | None = None) -> str:
    """Formats the one-line "what | got | expected | fix" message used across the toolkit."""
    parts = [what]
    if got is not None:
        parts.append(f"got {got}")
    if expected is not None:
        parts.append(f"expected {expected}")
    if fix:
        parts.append(fix)
    return " | ".join(parts)


def first_line(exc: BaseException) -> str:
    """The library's own one-line reason for ``exc``: its first non-empty line, else its type."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
