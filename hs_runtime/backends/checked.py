"""Input validation in front of any engine: the contract's static sizes, then the built profiles."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..profiles import select_profile


class ProfileCheckedEngine:
    """Wraps an engine; refuses feeds outside the contract or the profiles the folder was built for."""

    def __init__(self, engine, profiles: list[dict], rebuild_hint: str):
        self.engine = engine
        self.spec = engine.spec
        self.dims = engine.dims
        self.profiles = profiles
        self.rebuild_hint = f"rebuild with: {rebuild_hint} (adjusting the sizes)"

    def __call__(self, feeds: Mapping[str, torch.Tensor], outputs: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        self.spec.check_feeds(feeds)
        shapes = {name: tuple(feeds[name].shape) for name in self.spec.input_names}
        select_profile(self.profiles, shapes, self.spec.name, self.rebuild_hint)
        return self.engine(feeds, outputs)
