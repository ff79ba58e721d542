"""Procedural ``shapes`` scenes and their prompts, made offline from a seed.

A scene is one to three coloured shapes (circle, square, triangle, star), each plain, striped or
checkered, on a flat or gradient background; its prompt names them in drawing order, e.g.
"a striped red circle and a blue square on a yellow gradient". Detail is local (edges,
stripes, checks), which is what HybridStitch's token mask exploits. Rendering is 2×
supersampled so edges are antialiased, like real images.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.96, 0.88, 0.12),
    "green": (0.12, 0.68, 0.22),
    "blue": (0.12, 0.30, 0.90),
    "purple": (0.55, 0.18, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = ("background", "gradient")
# Every word a prompt can hold: the tokenizers make each one a single token.
VOCABULARY = ("a", "an", "and", "on", ",", *TEXTURES, *COLOURS, *SHAPES, *BACKGROUNDS)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    texture: str
    cx: float  # centre and size as fractions of the image side
    cy: float
    size: float
    angle: float  # radians
    period: float  # stripe / check period as a fraction of the side
    stripe_angle: float

    def words(self) -> str:
        texture = "" if self.texture == "plain" else self.texture + " "
        return f"{_article(texture + self.colour)} {texture}{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    background_colour: str
    gradient_angle: float

    @property
    def prompt(self) -> str:
        names = [s.words() for s in self.shapes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on {_article(self.background_colour)} {self.background_colour} {self.background}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: np.random.Generator) -> Scene:
    """One random scene: 1–3 shapes that overlap little, colours distinct from the background."""
    background_colour = str(rng.choice(list(COLOURS)))
    count = int(rng.integers(1, 4))
    shapes: list[Shape] = []
    for _ in range(count):
        for _attempt in range(20):
            size = float(rng.uniform(0.13, 0.26))
            cx, cy = (float(v) for v in rng.uniform(size, 1 - size, 2))
            if all(math.hypot(cx - s.cx, cy - s.cy) > 0.8 * (size + s.size) for s in shapes):
                break
        colour = str(rng.choice([c for c in COLOURS if c != background_colour]))
        shapes.append(
            Shape(
                kind=str(rng.choice(SHAPES)), colour=colour, texture=str(rng.choice(TEXTURES)), cx=cx, cy=cy, size=size,
                angle=float(rng.uniform(0, 2 * math.pi)), period=float(rng.uniform(0.045, 0.09)),
                stripe_angle=float(rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi),
            )
        )
    return Scene(tuple(shapes), str(rng.choice(BACKGROUNDS)), background_colour, float(rng.uniform(0, 2 * math.pi)))


def _shape_mask(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - shape.cx, y - shape.cy
    r = shape.size
    if shape.kind == "circle":
        return dx * dx + dy * dy <= r * r
    if shape.kind == "square":  # axis-aligned, so a square always reads as one
        half = r * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    theta = np.arctan2(dy, dx) - shape.angle
    rho = np.hypot(dx, dy)
    if shape.kind == "triangle":
        # Regular triangle with circumradius r: inside when every edge's half-plane holds.
        inside = np.ones_like(rho, dtype=bool)
        for k in range(3):
            normal = shape.angle + math.pi / 3 + k * 2 * math.pi / 3
            inside &= dx * math.cos(normal) + dy * math.sin(normal) <= r / 2
        return inside
    # Five-pointed star: boundary radius along each ray, between outer and inner vertices.
    sector = 2 * math.pi / 5
    a = np.mod(theta, sector)
    a = np.minimum(a, sector - a)  # mirror into [0, π/5]
    outer, inner = r, r * 0.45
    p1 = np.array([outer, 0.0])
    p2 = np.array([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    normal = np.array([p2[1] - p1[1], p1[0] - p2[0]])
    c = normal @ p1
    boundary = c / (normal[0] * np.cos(a) + normal[1] * np.sin(a))
    return rho <= boundary


def _secondary(colour: str) -> np.ndarray:
    rgb = np.array(COLOURS[colour])
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    return np.array((0.97, 0.97, 0.97)) if luminance < 0.6 else np.array((0.1, 0.1, 0.1))


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def render(scene: Scene, size: int = 256) -> np.ndarray:
    """The scene as ``[size, size, 3]`` float32 RGB in [0, 1] (2× supersampled)."""
    n = 2 * size
    x, y = _grid(n)
    base = np.array(COLOURS[scene.background_colour], dtype=np.float32)
    if scene.background == "gradient":
        t = (x - 0.5) * math.cos(scene.gradient_angle) + (y - 0.5) * math.sin(scene.gradient_angle)
        t = np.clip(t / math.sqrt(0.5) + 0.5, 0, 1)[..., None]
        image = base * (1 - 0.7 * t) + 0.04 * t
    else:
        image = np.broadcast_to(base, (n, n, 3)).copy()
    for shape in scene.shapes:
        # Work inside the shape's bounding box only: shapes cover a small part of the image.
        x0, x1 = max(0, int((shape.cx - shape.size) * n) - 2), min(n, int((shape.cx + shape.size) * n) + 3)
        y0, y1 = max(0, int((shape.cy - shape.size) * n) - 2), min(n, int((shape.cy + shape.size) * n) + 3)
        _draw(shape, x[y0:y1, x0:x1], y[y0:y1, x0:x1], image[y0:y1, x0:x1])
    # 2×2 box filter by strided adds (numpy's mean over axes is several times slower here).
    return ((image[0::2, 0::2] + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]) * 0.25).astype(np.float32)


def _draw(shape: Shape, x: np.ndarray, y: np.ndarray, image: np.ndarray) -> None:
    """Paints ``shape`` into ``image`` (a view) at coordinates ``x``, ``y``."""
    mask = _shape_mask(shape, x, y)
    colour = np.array(COLOURS[shape.colour], dtype=np.float32)
    if shape.texture == "plain":
        fill = colour
    else:
        u = x * math.cos(shape.stripe_angle) + y * math.sin(shape.stripe_angle)
        if shape.texture == "striped":
            pattern = np.floor(u / (shape.period / 2)) % 2
        else:
            v = -x * math.sin(shape.stripe_angle) + y * math.cos(shape.stripe_angle)
            pattern = (np.floor(u / (shape.period / 2)) + np.floor(v / (shape.period / 2))) % 2
        fill = np.where(pattern[..., None] > 0, _secondary(shape.colour), colour)
    image[...] = np.where(mask[..., None], fill, image)


def make_scenes(count: int, seed: int, size: int = 256) -> tuple[np.ndarray, list[str]]:
    """``count`` scenes from ``seed``: images ``[count, 3, size, size]`` in [-1, 1] and prompts."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    prompts = []
    for i in range(count):
        scene = sample_scene(rng)
        images[i] = render(scene, size).transpose(2, 0, 1) * 2 - 1
        prompts.append(scene.prompt)
    return images, prompts
