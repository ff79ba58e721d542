"""Prompt adherence of ``shapes`` images: read the scene back from the pixels, compare with the prompt.

The ``shapes`` grammar is procedural (:mod:`hs_export.shapes.scenes`), so a checker can read an
image back without a learned model. Images are read at :data:`WORK_SIDE` px (area-averaged).

- **Background colour**: the pixels of a thin frame along the border (:data:`BORDER`), each
  assigned to the palette colour whose background line passes nearest (flat colour ``c`` to the
  darkest gradient end ``0.3·c + 0.04``, as the renderer draws it); the majority wins.
- **Objects**: every pixel is assigned to the nearest palette colour, or to the background when
  the background's line is nearer. Per colour, specks are opened away, the rest is closed with a
  disk (:data:`CLOSE_RADIUS`, bridging stripes and checks) and hole-filled; connected regions of at
  least :data:`MIN_AREA` of the image are objects. The near-white or near-black pixels beside a
  coloured object are its stripes or checks and complete its outline. White and black pixels
  left over form white or black objects; one about half white and half black (a striped or
  checkered white or black shape: its texture colour is near-black or near-white) reads as
  "white or black".
- **Kind** of each object from its convex hull (:func:`shape_kind`): the hull's compactness
  separates triangle, square and circle; a star alone fills little of its hull.

Scores per image, against the prompt it was made from (:func:`score_image`, each 0 or 1 or a share):

- ``background``: the background colour read equals the prompt's.
- ``first_shape_colour``: some object has the colour of the *first shape named in the prompt*
  ("red" in "a striped red circle and a blue square on a yellow gradient"; the first named is also
  the first drawn, so later shapes may overlap it).
- ``shape_colours``: the share of named shapes matched one-to-one to objects of their colour.
- ``shape_kinds``: the share of named shapes matched one-to-one to objects of their colour *and*
  kind (colour–kind binding).
- ``count``: as many objects as named shapes.
- ``score``: the mean of ``background``, ``shape_colours`` and ``shape_kinds``.

The checker is validated on the renderer's own images (``tests/test_quality.py``): on 200 random
scenes at the shipped pair's 128² it reads the background 100%, the first shape's colour 99.5%,
shape colours 96.6% and kinds 90.8% right (at 256²: 100 / 99.5 / 97.8 / 93.3%; misses are mostly
shapes the renderer drew overlapping). The same 128² scenes through the shipped pair's VAE
(encode, decode) read 100% / 89.5% / 82.8% / 62.2% (200 scenes; the VAE of 2026-12-06): the 8× VAE blurs small shapes' outlines and
shifts some colours, which bounds what a model generating through it can score.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hs_runtime.errors import ConfigError, describe

from ..shapes.scenes import COLOURS, SHAPES, TEXTURES

PALETTE = tuple(COLOURS)
NEUTRAL = ("white", "black")
MIN_AREA = 0.004  # of the image: the smallest shape half-hidden by its stripes covers ~0.011
BORDER = 1 / 32  # frame width as a share of the side (8 px at 256²)
CLOSE_RADIUS = 0.032  # of the side: bridges stripes and checks (half-period ≤ 0.045)
# Hull compactness below which a region is a triangle (0.41–0.53 as read) or a square (0.62–0.72);
# solidity below which it is a star (0.54–0.78 as read; squares, circles ≥ 0.9 at the 5th percentile).
KIND_THRESHOLDS = {"triangle": 0.58, "square": 0.76, "star_solidity": 0.78}
WORK_SIDE = 128  # px: images are read at this size (area-averaged), fast and size-independent
ADHERENCE_KEYS = ("background", "first_shape_colour", "shape_colours", "shape_kinds", "count", "score")

_ITEM = re.compile(rf"^(?:a|an) (?:({'|'.join(t for t in TEXTURES if t != 'plain')}) )?({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})$")
_BACKGROUND = re.compile(rf"^(?:a|an) ({'|'.join(PALETTE)}) (background|gradient)$")


@dataclass(frozen=True)
class NamedShape:
    kind: str
    colour: str
    texture: str  # plain | striped | checkered


@dataclass(frozen=True)
class PromptScene:
    """What a ``shapes`` prompt asks for: its shapes in the order named, and the background."""

    shapes: tuple[NamedShape, ...]
    background_colour: str
    background: str  # "background" (flat) or "gradient"


@dataclass(frozen=True)
class ObjectReading:
    """One object read from an image.

    Attributes:
        colours: the colours it reads as (one, or ``("white", "black")`` when ambiguous).
        kind: circle | square | triangle | star.
        area: share of the image it covers (holes filled).
        centre: ``(x, y)`` as shares of the side.
    """

    colours: tuple[str, ...]
    kind: str
    area: float
    centre: tuple[float, float]


@dataclass(frozen=True)
class SceneReading:
    background_colour: str
    objects: tuple[ObjectReading, ...]


def parse_prompt(prompt: str) -> PromptScene:
    """Reads a prompt of the ``shapes`` grammar.

    Raises:
        ConfigError: if ``prompt`` is not one (one line naming it).
    """
    text = " ".join(prompt.strip().lower().split())
    listed, sep, background = text.rpartition(" on ")
    match = _BACKGROUND.match(background)
    items = re.split(r", | and ", listed) if sep else []
    shapes = []
    for item in items:
        found = _ITEM.match(item.strip())
        if not found:
            break
        texture, colour, kind = found.groups()
        shapes.append(NamedShape(kind, colour, texture or "plain"))
    if not match or not items or len(shapes) != len(items):
        raise ConfigError(
            describe(
                "prompt is not of the shapes grammar, so adherence cannot be checked", got=repr(prompt),
                expected="e.g. 'a striped red circle and a blue square on a yellow gradient'",
                fix="use the shapes pair's built-in prompts (--prompts N), or --no-adherence",
            )
        )
    return PromptScene(tuple(shapes), match.group(1), match.group(2))


# ---- reading an image ---------------------------------------------------------------------------


def _palette() -> torch.Tensor:
    return torch.tensor([COLOURS[c] for c in PALETTE], dtype=torch.float32)


def _background_distances(pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` pixels → ``[N, K]`` distance to each colour's background line (flat to darkest gradient end)."""
    start = _palette()  # t = 0
    end = 0.3 * start + 0.04  # t = 1: c·(1 − 0.7) + 0.04
    direction = end - start
    t = (((pixels[:, None, :] - start) * direction).sum(-1) / (direction * direction).sum(-1)).clamp(0, 1)
    nearest = start + t[..., None] * direction
    return (pixels[:, None, :] - nearest).norm(dim=-1)


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + 0.5).float()


def _dilate(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.shape[-1]
    return F.conv2d(mask[None, None].float(), kernel[None, None], padding=k // 2)[0, 0] > 0.5


def _erode(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.shape[-1]
    # Outside the image counts as set, so objects touching the border are not eaten from it.
    padded = F.pad(mask[None, None].float(), (k // 2,) * 4, value=1.0)
    return F.conv2d(padded, kernel[None, None])[0, 0] > kernel.sum() - 0.5


def _close(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Morphological closing on a canvas padded by the kernel, so nothing grows into the border."""
    pad = kernel.shape[-1]
    canvas = F.pad(mask[None, None].float(), (pad,) * 4)[0, 0] > 0.5
    return _erode(_dilate(canvas, kernel), kernel)[pad:-pad, pad:-pad]


def _open(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return _dilate(_erode(mask, kernel), kernel) & mask


def _labels(mask: torch.Tensor) -> torch.Tensor:
    """Connected regions (8-neighbourhood) of a bool mask ``[H, W]``: ``[H, W]`` int64, 0 = none."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w)
    labels = torch.where(mask, ids, torch.zeros_like(ids))
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0]
        grown = torch.where(mask, grown, torch.zeros_like(grown))
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Sets every unset pixel that the border cannot reach through unset pixels."""
    outside = torch.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~mask[0, :], ~mask[-1, :], ~mask[:, 0], ~mask[:, -1]
    free = ~mask
    while True:
        grown = (F.max_pool2d(outside[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0) & free
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of ``[N, 2]`` points, counter-clockwise (Andrew's monotone chain)."""
    pts = np.unique(points, axis=0)  # sorted by x, then y
    if len(pts) < 3:
        return pts

    def half(sequence):
        chain: list = []
        for p in sequence:
            while len(chain) >= 2 and (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1]) - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0]) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    return np.array(half(pts)[:-1] + half(pts[::-1])[:-1])


def outline_features(region: torch.Tensor) -> tuple[float, float]:
    """``(compactness, solidity)`` of a region ``[H, W]`` (bool): its convex hull's area ÷ the disk
    through the hull's farthest corner from the hull's centroid, and its own area ÷ the hull's."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    # Over pixel corners: the region's true outline, not its pixel centres.
    corners = np.concatenate([np.stack([xs.numpy() + dx, ys.numpy() + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    hull = _convex_hull(corners)
    if len(hull) < 3:
        return 1.0, 1.0
    x, y = hull[:, 0], hull[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = 0.5 * cross.sum()
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    radius2 = ((x - cx) ** 2 + (y - cy) ** 2).max()
    return float(abs(area) / (math.pi * radius2)), float(len(xs) / abs(area))


def shape_kind(region: torch.Tensor) -> str:
    """The kind of a region ``[H, W]`` (bool) from its outline (:func:`outline_features`).

    The hull's compactness is 1 for a circle, 0.76 for a five-pointed star (its hull is a regular
    pentagon), 0.64 for a square (axis-aligned, as drawn) and 0.41 for a triangle: the hull, not
    the region, so stripes or checks in the background's colour that leave a ragged outline change
    it little. Only a star fills little of its hull (solidity 0.56; the others ≥ 0.8 even
    ragged). Thresholds: :data:`KIND_THRESHOLDS`, set on rendered scenes.
    """
    compactness, solidity = outline_features(region)
    if compactness < KIND_THRESHOLDS["triangle"]:
        return "triangle"
    if solidity < KIND_THRESHOLDS["star_solidity"]:
        return "star"
    return "square" if compactness < KIND_THRESHOLDS["square"] else "circle"


def read_background(image: torch.Tensor) -> str:
    """The background colour of ``image`` ``[3, H, W]`` (float, [0, 1]) from its border pixels."""
    _, h, w = image.shape
    band = max(2, round(BORDER * min(h, w)))
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[band:-band, band:-band] = False
    pixels = image.permute(1, 2, 0)[frame]
    votes = torch.bincount(_background_distances(pixels).argmin(1), minlength=len(PALETTE))
    return PALETTE[int(votes.argmax())]


def read_scene(image) -> SceneReading:
    """Reads background colour and objects (colours, kind, area, centre) from a ``shapes`` image.

    Args:
        image: ``[3, H, W]`` float tensor in [0, 1], a ``[H, W, 3]`` array, or a PIL image; read
            at :data:`WORK_SIDE` px (area-averaged), whatever its size.
    """
    image = _as_chw(image)
    background = read_background(image)
    image = _resize(image, WORK_SIDE)
    _, h, w = image.shape
    bg = PALETTE.index(background)
    pixels = image.permute(1, 2, 0).reshape(-1, 3)
    to_colour = torch.cdist(pixels, _palette())  # [N, K]
    to_colour[:, bg] = float("inf")  # the background colour itself is explained by its line
    to_background = _background_distances(pixels)[:, bg]
    nearest = to_colour.argmin(1)
    label = torch.where(to_background <= to_colour.min(1).values, torch.full_like(nearest, -1), nearest).view(h, w)

    kernel = _disk(max(1, round(CLOSE_RADIUS * min(h, w))))
    speck = _disk(1)
    min_pixels = MIN_AREA * h * w

    def regions(mask: torch.Tensor) -> list[torch.Tensor]:
        if mask.sum() < min_pixels / 2:
            return []
        opened = _open(mask, speck)  # drops antialiased edges between two colours
        closed = _fill_holes(_close(opened, kernel))
        ids = _labels(closed)
        found = [ids == i for i in torch.unique(ids[ids > 0]).tolist()]
        return [r for r in found if r.sum() >= min_pixels]

    objects: list[tuple[tuple[str, ...], torch.Tensor]] = []
    texture = torch.zeros(h, w, dtype=torch.bool)  # white/black pixels that belong to a coloured object
    for k, colour in enumerate(PALETTE):
        if colour in NEUTRAL or k == bg:
            continue
        second = PALETTE.index(_texture_colour(colour))
        for region in regions(label == k):
            # Its stripes or checks (the renderer's near-white or near-black) complete its outline.
            near = _dilate(region, kernel) & (label == second)
            texture |= near
            outline = _fill_holes(_close(region | near, kernel)) | region
            objects.append(((colour,), outline))
    whites, blacks = (label == PALETTE.index("white")) & ~texture, (label == PALETTE.index("black")) & ~texture
    for region in regions(whites | blacks):
        white, black = float((whites & region).sum()), float((blacks & region).sum())
        share = white / max(1.0, white + black)
        # Half white, half black: a striped or checkered white or black shape (either reading fits).
        colours = ("white",) if share > 0.75 else ("black",) if share < 0.25 else ("white", "black")
        objects.append((colours, region))

    readings = []
    for colours, region in objects:
        ys, xs = torch.nonzero(region, as_tuple=True)
        centre = (float(xs.float().mean() + 0.5) / w, float(ys.float().mean() + 0.5) / h)
        readings.append(ObjectReading(colours, shape_kind(region), float(region.sum()) / (h * w), centre))
    readings.sort(key=lambda o: -o.area)
    return SceneReading(background, tuple(readings))


def _texture_colour(colour: str) -> str:
    """The palette colour nearest the renderer's stripe/check colour for ``colour``."""
    rgb = COLOURS[colour]
    return "white" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.6 else "black"


def _resize(image: torch.Tensor, side: int) -> torch.Tensor:
    _, h, w = image.shape
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    return F.interpolate(image[None], size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")[0]


def _as_chw(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu()
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


# ---- scoring ------------------------------------------------------------------------------------


def _matched(named: list, objects: list, fits) -> int:
    """Largest one-to-one matching of named shapes to objects where ``fits(shape, object)``."""
    if not named or not objects:
        return 0
    best = 0
    objects = objects[:6]  # the largest ones: a generated image may hold specks
    for chosen in itertools.permutations(range(len(objects)), min(len(named), len(objects))):
        best = max(best, sum(fits(s, objects[j]) for s, j in zip(named, chosen)))
        if best == len(named):
            break
    return best


def score_image(image, prompt: str | PromptScene) -> dict[str, float]:
    """Adherence of one image to its prompt (keys: :data:`ADHERENCE_KEYS`, each in [0, 1])."""
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    reading = read_scene(image)
    named = list(scene.shapes)
    objects = list(reading.objects)
    background = float(reading.background_colour == scene.background_colour)
    colours = _matched(named, objects, lambda s, o: s.colour in o.colours) / len(named)
    kinds = _matched(named, objects, lambda s, o: s.colour in o.colours and s.kind == o.kind) / len(named)
    first = float(any(named[0].colour in o.colours for o in objects))
    return {
        "background": background, "first_shape_colour": first, "shape_colours": colours, "shape_kinds": kinds,
        "count": float(len(objects) == len(named)), "score": (background + colours + kinds) / 3,
    }


def summarise(rows: list[dict[str, float]]) -> dict:
    """Mean of each key over images, and the image count."""
    if not rows:
        return {k: None for k in ADHERENCE_KEYS} | {"images": 0}
    return {k: statistics.fmean(r[k] for r in rows) for k in ADHERENCE_KEYS} | {"images": len(rows)}
