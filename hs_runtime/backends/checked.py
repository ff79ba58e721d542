"""Input validation in front of any engine: the contract's static sizes, then the built profiles."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..errors import out_of_memory
from ..profiles import select_profile


_REMEMBERED = 256  # accepted shape sets kept per engine (a denoise uses a handful)


class ProfileCheckedEngine:
    """Wraps an engine; refuses feeds outside the contract or the profiles the folder was built for
    (``profiles=None``: the contract only, for models that have no build).

    Both checks depend on the input shapes alone, and a denoise repeats a few shape sets every
    step: a shape set that passed once is not checked again (0.2 ms of Python per call, which is
    a twentieth of a hybrid step's large call on the ``shapes`` engines).
    """

    def __init__(self, engine, profiles: list[dict] | None, rebuild_hint: str | None = None):
        self.engine = engine
        self.spec = engine.spec
        self.dims = engine.dims
        self.profiles = profiles
        self.rebuild_hint = f"rebuild with: {rebuild_hint} (adjusting the sizes)"
        self._accepted: set[tuple] = set()

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = self.spec.input_names
        key = tuple(tuple(feeds[n].shape) if n in feeds else None for n in names)
        if key not in self._accepted:
            self.spec.check_feeds(feeds)
            if self.profiles is not None:
                select_profile(self.profiles, dict(zip(names, key)), self.spec.name, self.rebuild_hint)
            if len(self._accepted) < _REMEMBERED:
                self._accepted.add(key)
        try:
            return self.engine(feeds, outputs)
        except Exception as exc:  # an allocation failure is the caller's sizing, said in one line; the rest as raised
            oom = out_of_memory(exc, f"the {self.spec.name} engine ({getattr(self.engine, 'device', 'its device')})")
            if oom is None:
                raise
            raise oom from exc
