"""The procedural "shapes" data set: captions in a small grammar, their scenes, and the images drawn from them.
(`shapes_score.py` reads images back and grades them against their captions.)

Every item is one or two flat-coloured shapes on a plain background, with a caption in a small grammar:

    caption := shape [" and " shape] " on " ART " " COLOR " background"
    shape   := ART [" " SIZE] " " COLOR " " SHAPE [" " POSITION]

ART is "a", or "an" before a vowel ("an orange square"); the parser takes either. A caption without a size word
means a medium shape; one without a position means the shape may be anywhere.

Sampling choices (all from the item's own `random.Random`, never the global one):
- two shapes with probability 0.4, else one: most items teach one binding, enough teach "and";
- background and shape colours uniform over the palette, a shape's colour never its background's;
- shape kind and size uniform, so a third of the shape phrases carry no size word (medium);
- each shape's position is named with probability 0.75; unnamed shapes go to a random free 3x3 cell.
Geometry, in fractions of the image side: a shape's extent (bounding-box side) is 0.16 / 0.25 / 0.36 for small /
medium / large; its area centroid lies inside its cell at least MARGIN from the cell's edges, jittered uniformly;
the whole shape lies inside the image; two shapes' boxes stay GAP apart. Triangles point up, height equal to base.
Scenes that cannot be laid out this way (two large shapes stacked in neighbouring cells, say) are never sampled.
"""

import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 170),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes the grammar can draw and read but never samples: the built-in model has not seen them, so a LoRA can teach
# one (scripts/lora_shape.py). A diamond (a square standing on a corner, its diagonals the extent) and a five-pointed
# star, apex up, inner radius STAR_INNER of the outer.
NEW_SHAPES: tuple[str, ...] = ("diamond", "star")
STAR_INNER = 0.5
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Row-major over the 3x3 grid: cell = 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)

SIZE_FRACTION = {"small": 0.16, "medium": 0.25, "large": 0.36}  # bounding-box side / image side
MARGIN = 0.04  # least distance from a shape's centroid to its cell's edges, so the cell is never ambiguous
GAP = 0.06  # least distance between two shapes' bounding boxes, so they never touch
TWO_SHAPES_PROB = 0.4
MENTION_POSITION_PROB = 0.75
SUPERSAMPLE = 4  # antialiasing: draw at 4x and box-average, which leaves uniform interiors exactly their colour


@dataclass(frozen=True)
class ShapeSpec:
    """One shape; cell None means "anywhere" (its caption names no position, and rendering picks a cell)."""

    shape: str
    color: str
    size: str = "medium"  # the unmarked size: a caption without a size word means medium
    cell: int | None = None  # 0..8, row-major over the 3x3 grid

    def __post_init__(self):
        if self.shape not in SHAPES + NEW_SHAPES:
            raise ValueError(f"shape must be one of {SHAPES + NEW_SHAPES}, got {self.shape!r}")
        if self.color not in PALETTE:
            raise ValueError(f"color must be one of {tuple(PALETTE)}, got {self.color!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.cell is not None and self.cell not in range(9):
            raise ValueError(f"cell must be 0..8 (row-major 3x3) or None, got {self.cell!r}")


@dataclass(frozen=True)
class SceneSpec:
    """A background colour and one or two shapes, each a different colour from the background, in different cells."""

    background: str
    shapes: tuple[ShapeSpec, ...]

    def __post_init__(self):
        if self.background not in PALETTE:
            raise ValueError(f"background must be one of {tuple(PALETTE)}, got {self.background!r}")
        if len(self.shapes) not in (1, 2):
            raise ValueError(f"a scene has one or two shapes, got {len(self.shapes)}")
        if any(s.color == self.background for s in self.shapes):
            raise ValueError(f"a shape cannot be the background's colour ({self.background})")
        cells = [s.cell for s in self.shapes if s.cell is not None]
        if len(cells) != len(set(cells)):
            raise ValueError(f"two shapes cannot share a cell, got cells {cells}")


# ---------------------------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_phrase(s: ShapeSpec) -> str:
    # Medium is the unmarked size: the grammar says a phrase without a size word means medium.
    words = ([s.size] if s.size in ("small", "large") else []) + [s.color, s.shape]
    if s.cell is not None:
        words.append(POSITIONS[s.cell])
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: SceneSpec) -> str:
    """The caption of a scene: sizes other than medium and the cells that are set are named."""
    shapes = " and ".join(_shape_phrase(s) for s in scene.shapes)
    return f"{shapes} on {_article(scene.background)} {scene.background} background"


def _alternatives(words: Iterable[str]) -> str:
    # Longest first, so that "at the top left" is tried before "at the top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SHAPE_PATTERN = (
    rf"an? (?:(?P<size{{i}}>small|medium|large) )?(?P<color{{i}}>{_alternatives(PALETTE)}) "
    rf"(?P<shape{{i}}>{_alternatives(SHAPES + NEW_SHAPES)})(?: (?P<position{{i}}>{_alternatives(POSITIONS)}))?"
)
_CAPTION_RE = re.compile(
    _SHAPE_PATTERN.format(i=0)
    + rf"(?: and {_SHAPE_PATTERN.format(i=1)})?"
    + rf" on an? (?P<background>{_alternatives(PALETTE)}) background"
)


def parse_caption(text: str) -> SceneSpec:
    """Read a caption of the grammar back into a scene: no size word gives "medium", no position gives cell None."""
    normal = " ".join(text.lower().replace(",", " ").split()).rstrip(".")
    match = _CAPTION_RE.fullmatch(normal)
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    shapes = []
    for i in (0, 1):
        if match[f"shape{i}"] is None:
            continue
        position = match[f"position{i}"]
        shapes.append(ShapeSpec(
            shape=match[f"shape{i}"],
            color=match[f"color{i}"],
            size=match[f"size{i}"] or "medium",
            cell=None if position is None else POSITIONS.index(position),
        ))
    return SceneSpec(background=match["background"], shapes=tuple(shapes))


# ---------------------------------------------------------------------------------------------------------------
# Layout: where each shape's centroid goes, in fractions of the image side (x to the right, y down)


def _reach(s: ShapeSpec) -> tuple[float, float, float, float]:
    """How far the shape's bounding box reaches from its area centroid: (left, top, right, bottom)."""
    e = SIZE_FRACTION[s.size]
    if s.shape == "triangle":
        # An upward triangle's centroid sits two thirds of the way down from its apex.
        return e / 2, 2 * e / 3, e / 2, e / 3
    if s.shape == "star":  # outer radius e/2 around the centroid: apex up, the two lowest points cos 36° below
        r = e / 2
        return r * math.sin(math.radians(72)), r, r * math.sin(math.radians(72)), r * math.cos(math.radians(36))
    return e / 2, e / 2, e / 2, e / 2


def star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The ten corners of the star around (cx, cy), apex up (y down): outer and inner radius in turn."""
    return [(cx + rad * math.sin(math.radians(36 * k)), cy - rad * math.cos(math.radians(36 * k)))
            for k, rad in enumerate([radius, radius * STAR_INNER] * 5)]


def _centroid_ranges(s: ShapeSpec, cell: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The x and y intervals the centroid may take: inside the cell by MARGIN, with the whole shape in the image."""
    row, col = divmod(cell, 3)
    left, top, right, bottom = _reach(s)
    x = (max(col / 3 + MARGIN, left), min((col + 1) / 3 - MARGIN, 1 - right))
    y = (max(row / 3 + MARGIN, top), min((row + 1) / 3 - MARGIN, 1 - bottom))
    return x, y


def _separations(a: ShapeSpec, cell_a: int, b: ShapeSpec, cell_b: int) -> list[tuple[int, int, float]]:
    """Ways to keep two shapes GAP apart: (axis, which comes first along it, least centroid distance) that fit."""
    ranges = (_centroid_ranges(a, cell_a), _centroid_ranges(b, cell_b))
    reaches = (_reach(a), _reach(b))
    ways = []
    for axis, first in itertools.product((0, 1), (0, 1)):
        second = 1 - first
        # Along x the first shape's right reach and the second's left reach face each other; along y, bottom and top.
        need = reaches[first][axis + 2] + reaches[second][axis] + GAP
        if ranges[second][axis][1] - ranges[first][axis][0] >= need:
            ways.append((axis, first, need))
    return ways


def _cell_choices(shapes: Sequence[ShapeSpec]) -> list[tuple[int, ...]]:
    """Every assignment of cells (the given ones kept, free ones distinct) under which the shapes fit."""
    choices = itertools.product(*[range(9) if s.cell is None else (s.cell,) for s in shapes])
    pairs = list(itertools.combinations(range(len(shapes)), 2))
    return [
        cells for cells in choices
        if len(set(cells)) == len(cells)
        and all(_separations(shapes[i], cells[i], shapes[j], cells[j]) for i, j in pairs)
    ]


def _layout(scene: SceneSpec, rng: random.Random) -> list[tuple[float, float]]:
    """The centroid (x, y) of every shape: cells for unplaced shapes drawn at random, then jitter inside the cells."""
    choices = _cell_choices(scene.shapes)
    if not choices:
        raise ValueError(f"these shapes cannot be placed apart in their cells: {scene}")
    cells = rng.choice(choices)
    ranges = [_centroid_ranges(s, c) for s, c in zip(scene.shapes, cells, strict=True)]
    centroids = [[rng.uniform(*r[0]), rng.uniform(*r[1])] for r in ranges]
    if len(scene.shapes) == 2:
        # Redraw the coordinate along one feasible separating axis so that the two are GAP apart by construction.
        axis, first, need = rng.choice(_separations(scene.shapes[0], cells[0], scene.shapes[1], cells[1]))
        second = 1 - first
        lo_first, hi_first = ranges[first][axis]
        lo_second, hi_second = ranges[second][axis]
        centroids[first][axis] = rng.uniform(lo_first, min(hi_first, hi_second - need))
        centroids[second][axis] = rng.uniform(max(lo_second, centroids[first][axis] + need), hi_second)
    return [(x, y) for x, y in centroids]


# ---------------------------------------------------------------------------------------------------------------
# Sampling and rendering


def sample_scene(
    rng: random.Random, two_shapes_prob: float = TWO_SHAPES_PROB, mention_position_prob: float = MENTION_POSITION_PROB,
    shapes_from: Sequence[str] = SHAPES,
) -> SceneSpec:
    """A random scene, drawn only from `rng` (its shapes' kinds from `shapes_from`); shapes whose position is not to
    be named get cell None."""
    colors = tuple(PALETTE)
    background = rng.choice(colors)
    count = 2 if rng.random() < two_shapes_prob else 1
    shapes: list[ShapeSpec] = []
    while len(shapes) < count:
        candidate = ShapeSpec(
            shape=rng.choice(shapes_from),
            color=rng.choice([c for c in colors if c != background]),
            size=rng.choice(SIZES),
            cell=rng.randrange(9) if rng.random() < mention_position_prob else None,
        )
        if _cell_choices(shapes + [candidate]):
            shapes.append(candidate)
    return SceneSpec(background=background, shapes=tuple(shapes))


def render(scene: SceneSpec, size: int = 64, rng: random.Random | None = None, antialias: bool = True) -> Image.Image:
    """Draw a scene as a size x size RGB image; `rng` places the shapes (None: a fixed Random(0))."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = random.Random(0) if rng is None else rng
    scale = SUPERSAMPLE if antialias else 1
    side = size * scale
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for s, (cx, cy) in zip(scene.shapes, _layout(scene, rng), strict=True):
        left, top, right, bottom = _reach(s)
        # The box covers pixels [x0, x1) x [y0, y1); PIL's corners are inclusive, hence the -1.
        x0, y0 = round((cx - left) * side), round((cy - top) * side)
        x1, y1 = round((cx + right) * side) - 1, round((cy + bottom) * side) - 1
        color = PALETTE[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif s.shape == "star":
            draw.polygon(star_points(cx * side, cy * side, SIZE_FRACTION[s.size] / 2 * side), fill=color)
        elif s.shape == "diamond":
            draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)],
                         fill=color)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=color)
    return image.reduce(scale) if scale > 1 else image


def example(seed: int, index: int, size: int = 64, two_shapes_prob: float = TWO_SHAPES_PROB) -> tuple[Image.Image, str]:
    """Item `index` of the data set with `seed`: the same image and caption every time, at any size."""
    rng = random.Random(f"sdtorch-shapes:{seed}:{index}")  # str seeds hash with SHA-512: stable across runs
    scene = sample_scene(rng, two_shapes_prob)
    return render(scene, size, rng), caption(scene)


class ShapesDataset(Dataset):
    """`length` items of the shapes data: (PIL RGB image, caption); item i depends only on (seed, i, size) and the
    share of two-shape scenes (the evaluation always draws TWO_SHAPES_PROB; a trainer may show more of the harder
    two-shape scenes). `keep` > 0 remembers up to that many rendered items: a trainer that goes over a fixed pool
    every epoch then draws each scene once (the items are shared, not copied: a caller must not draw on them)."""

    def __init__(self, length: int, seed: int = 0, size: int = 64, two_shapes_prob: float = TWO_SHAPES_PROB,
                 keep: int = 0):
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if not 0 <= two_shapes_prob <= 1:
            raise ValueError(f"the share of two-shape scenes must be in [0, 1], got {two_shapes_prob}")
        self.length, self.seed, self.size, self.two_shapes_prob = length, seed, size, two_shapes_prob
        self.keep, self.kept = keep, {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        item = self.kept.get(index)
        if item is None:
            item = example(self.seed, index, self.size, self.two_shapes_prob)
            if len(self.kept) < self.keep:
                self.kept[index] = item
        return item


def write_folder(out_dir: str | Path, count: int, seed: int = 0, size: int = 64) -> None:
    """Write items 0..count-1 as NNNNNN.png + NNNNNN.txt pairs and a metadata.jsonl (file_name, text) beside them."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for i in range(count):
            image, text = example(seed, i, size)
            name = f"{i:06d}"
            image.save(out / f"{name}.png")
            (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            metadata.write(json.dumps({"file_name": f"{name}.png", "text": text}) + "\n")
