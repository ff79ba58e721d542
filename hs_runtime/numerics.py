"""Non-finite detection for one denoise, without host synchronisation in the step loop.

After every graph call the sampler hands the graph's velocity to :meth:`FiniteMonitor.record`,
which writes its min and max into a preallocated table ``[steps, graphs, 2]`` on the engines'
device (NaN and inf propagate through min/max; on CUDA it is a kernel and nothing is read back). :meth:`FiniteMonitor.check` reads the table
once — after the last step, or at stage boundaries when the run is profiled and synchronises
anyway — and raises a :class:`NumericalError` naming the first bad step, its action and graph,
and the likely cause. fp16 overflow is the usual one: SD3 activations pass fp16's 65504.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .contract import GRAPH_NAMES, VELOCITY
from .errors import NumericalError, describe

INPUTS = ("latents", "prompt embeddings", "pooled prompt embeddings")
_NUMPY_DTYPES = (torch.float32, torch.float16)


def likely_cause(precision: str | None, backend: str | None) -> str:
    """The cause and fix to suggest for a non-finite graph output, by engine precision."""
    if precision == "fp16":
        fix = "run with --dtype bf16 or fp32" if backend == "torch" else "rebuild with --precision bf16 (TensorRT) or fp32"
        return f"fp16 overflow? {fix} (if fp32 fails too, the weights hold NaN/inf)"
    return "do the model weights hold NaN/inf (a damaged or badly converted checkpoint)? use a clean checkpoint and rebuild from it"


class FiniteMonitor:
    """Record of each graph call's velocity range during one denoise, kept on the engines' device.

    Args:
        actions: the plan's per-step actions (to name the step in messages).
        device: where the engines' outputs live; the table is allocated there once.
        precision / backend: the engines' precision and backend, for the suggested fix.
        enabled: ``False`` makes every method a no-op (for overhead measurements).
    """

    def __init__(self, actions: Sequence[str], device, precision: str | None = None, backend: str | None = None, enabled: bool = True):
        self.actions = tuple(actions)
        self.enabled = enabled
        self.precision = precision
        self.backend = backend
        self.step = 0  # the step the sampler is in; set by the sampler before its graph calls
        self._checked = 0  # steps already read back (profiled runs check per stage)
        self._inputs_checked = False
        if enabled:
            self.table = torch.zeros(len(self.actions), len(GRAPH_NAMES), 2, dtype=torch.float32, device=device)
            self.inputs = torch.zeros(len(INPUTS), 2, dtype=torch.float32, device=device)
            # On CPU, write through numpy views of the same memory (cheaper than torch indexing).
            self._host = (self.table.numpy(), self.inputs.numpy()) if self.table.device.type == "cpu" else None

    @classmethod
    def disabled(cls) -> "FiniteMonitor":
        return cls((), "cpu", enabled=False)

    def record_inputs(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Records the ranges of the denoise inputs (so NaN conditioning is not blamed on step 0)."""
        if self.enabled:
            for row, tensor in enumerate((latents, embeds, pooled)):
                self._write(1, (row,), tensor)

    def record(self, graph: str, outputs: Mapping[str, torch.Tensor]) -> None:
        """Records the range of ``graph``'s velocity at the current step (no host synchronisation)."""
        if not self.enabled:
            return
        if VELOCITY in outputs:
            self._write(0, (self.step, GRAPH_NAMES.index(graph)), outputs[VELOCITY])

    def _write(self, which: int, index: tuple, tensor: torch.Tensor) -> None:
        """Stores ``(min, max)`` of ``tensor`` at ``index`` of the table (0) or the inputs (1)."""
        if tensor.numel() == 0:
            return
        tensor = tensor.detach()
        if self._host is not None and tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES:
            # On CPU, numpy reduces on this thread. torch's OpenMP reduction needs every intra-op
            # thread at once and stalls for milliseconds when ONNX Runtime or another process
            # holds a core (measured on 2 shared cores: 3 ms vs 0.1 ms per call).
            array = tensor.numpy()
            self._host[which][index] = (array.min(), array.max())
            return
        low, high = torch.aminmax(tensor)  # a kernel on the device: no host synchronisation
        row = (self.table, self.inputs)[which][index]
        row[0] = low
        row[1] = high

    def check(self, upto: int | None = None) -> None:
        """Reads the steps recorded since the last check (one host transfer) and raises on the first
        non-finite value.

        Args:
            upto: check steps before this index only (a stage boundary of a profiled run).

        Raises:
            NumericalError: naming the input, or the step, its action, the graph and the fix.
        """
        if not self.enabled:
            return
        upto = len(self.actions) if upto is None else upto
        rows = self.table[self._checked : upto].flatten()
        if not self._inputs_checked:
            rows = torch.cat([self.inputs.flatten(), rows])
        values = rows.cpu()  # the one read back (synchronises with the device)
        if not self._inputs_checked:
            inputs, values = values[: self.inputs.numel()].view(-1, 2), values[self.inputs.numel() :]
            self._inputs_checked = True
            for name, pair in zip(INPUTS, inputs):
                if not torch.isfinite(pair).all():
                    raise NumericalError(
                        describe(f"the denoise input ({name}) holds {_kind(pair)}", expected="finite values", fix="check the initial noise and the text encoders (T5 overflows in fp16: run it in fp32)")
                    )
        table = values.view(-1, len(GRAPH_NAMES), 2)
        bad = (~torch.isfinite(table)).any(dim=-1).nonzero()
        start = self._checked
        self._checked = upto
        if bad.numel():
            row, col = (int(v) for v in bad[0])
            step = start + row
            raise NumericalError(
                describe(
                    f"step {step} ({self.actions[step]}): {GRAPH_NAMES[col]} produced {_kind(table[row, col])}",
                    expected="finite velocities", fix=likely_cause(self.precision, self.backend),
                )
            )


def _kind(pair: torch.Tensor) -> str:
    """``NaN``, ``inf``, ``-inf`` (or both) for a non-finite ``(min, max)`` pair."""
    if torch.isnan(pair).any():
        return "NaN"
    low, high = float(pair[0]), float(pair[1])
    return " and ".join(k for k, hit in (("-inf", low == -math.inf), ("inf", high == math.inf)) if hit)


def check_finite(what: str, tensor: torch.Tensor, fix: str | None = None) -> None:
    """One-off check outside the step loop (e.g. latents before the VAE decodes them).

    Raises:
        NumericalError: "``what`` holds NaN | expected finite values | fix".
    """
    if tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor.detach())
    pair = torch.stack([low, high]).float().cpu()
    if not torch.isfinite(pair).all():
        raise NumericalError(describe(f"{what} holds {_kind(pair)}", expected="finite values", fix=fix))
