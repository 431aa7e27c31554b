"""The procedural "shapes" data set, and the pixel analysis that grades images generated from its captions.

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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
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

# Area / bounding-box area of each kind: what the analyzer divides by to turn an area into an extent.
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape; cell None means "anywhere" (its caption names no position, and rendering picks a cell)."""

    shape: str
    color: str
    size: str = "medium"  # the unmarked size: a caption without a size word means medium
    cell: int | None = None  # 0..8, row-major over the 3x3 grid

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
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
    rf"(?P<shape{{i}}>{_alternatives(SHAPES)})(?: (?P<position{{i}}>{_alternatives(POSITIONS)}))?"
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
    return e / 2, e / 2, e / 2, e / 2


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
    ranges = [_centroid_ranges(s, c) for s, c in zip(scene.shapes, cells)]
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
    rng: random.Random, two_shapes_prob: float = TWO_SHAPES_PROB, mention_position_prob: float = MENTION_POSITION_PROB
) -> SceneSpec:
    """A random scene, drawn only from `rng`; shapes whose position is not to be named get cell None."""
    colors = tuple(PALETTE)
    background = rng.choice(colors)
    count = 2 if rng.random() < two_shapes_prob else 1
    shapes: list[ShapeSpec] = []
    while len(shapes) < count:
        candidate = ShapeSpec(
            shape=rng.choice(SHAPES),
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
    for s, (cx, cy) in zip(scene.shapes, _layout(scene, rng)):
        left, top, right, bottom = _reach(s)
        # The box covers pixels [x0, x1) x [y0, y1); PIL's corners are inclusive, hence the -1.
        x0, y0 = round((cx - left) * side), round((cy - top) * side)
        x1, y1 = round((cx + right) * side) - 1, round((cy + bottom) * side) - 1
        color = PALETTE[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
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
    two-shape scenes)."""

    def __init__(self, length: int, seed: int = 0, size: int = 64, two_shapes_prob: float = TWO_SHAPES_PROB):
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if not 0 <= two_shapes_prob <= 1:
            raise ValueError(f"the share of two-shape scenes must be in [0, 1], got {two_shapes_prob}")
        self.length, self.seed, self.size, self.two_shapes_prob = length, seed, size, two_shapes_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return example(self.seed, index, self.size, self.two_shapes_prob)


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


# ---------------------------------------------------------------------------------------------------------------
# Pixel analysis


_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # (8, 3)
_COLOR_NAMES = tuple(PALETTE)
# A measured extent is classed by the geometric means between neighbouring nominal extents.
_SIZE_BOUNDS = (
    math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["medium"]),
    math.sqrt(SIZE_FRACTION["medium"] * SIZE_FRACTION["large"]),
)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of a boolean (H, W) mask by flood fill: an (H, W) map of region ids (-1 off the mask)."""
    height, width = mask.shape
    owner = np.full(mask.shape, -1)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if owner[start] >= 0:
            continue
        owner[start] = count
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and owner[nr, nc] < 0:
                    owner[nr, nc] = count
                    queue.append((nr, nc))
        count += 1
    return owner, count


def _coverage(kind: str, cx: float, cy: float, extent: float, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The fraction of each pixel (rows x cols) an ideal shape covers, from 4x4 samples a pixel; units are pixels."""
    offsets = (np.arange(4) + 0.5) / 4
    dy = rows[:, None, None, None] + offsets[None, None, :, None] - cy  # (R, 1, 4, 1)
    dx = cols[None, :, None, None] + offsets[None, None, None, :] - cx  # (1, C, 1, 4)
    half = extent / 2
    if kind == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif kind == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:
        depth = dy + 2 * extent / 3  # below the apex, which is 2/3 of the height above the centroid
        inside = (depth >= 0) & (depth <= extent) & (np.abs(dx) <= depth / 2)
    return inside.mean(axis=(2, 3))  # (R, C, 4, 4) -> (R, C)


_BLURS = (0.0, 1.0, 2.0)  # Gaussian blurs (pixels) the kind fit tries, as generated images are rarely sharp


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D array (zero outside it), separable: weighted sums of shifted copies along each axis."""
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = image.shape
    padded = np.pad(image, radius)  # (h + 2r, w + 2r)
    along_rows = sum(t * padded[i:i + h, :] for i, t in enumerate(taps))  # (h, w + 2r)
    return sum(t * along_rows[:, i:i + w] for i, t in enumerate(taps))  # (h, w)


def _fit(
    pixels: np.ndarray, ours: np.ndarray, background_rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[int, str, float, float, float] | None:
    """The opaque, possibly blurred, palette-coloured ideal shape that best redraws a window of pixels.

    For each colour, every pixel is read as a blend of background and that colour; the weight alpha is a coverage
    map that antialiasing, blur and zero-mean noise leave unbiased, so its sum is the area and its mean position the
    centroid. Each kind of that area and centroid, under each blur in _BLURS, is redrawn, and the least squared RGB
    error wins. Trying the colours through the redraw is what makes the shapes opaque: orange lies close to the
    yellow-red line, and only the interior alpha (1 versus about 0.56) tells orange from a faint red on yellow.
    Returns (palette index, kind, area, cx, cy) with area and centroid in pixels; None if no colour reads as there.
    """
    offsets = pixels - background_rgb  # (h, w, 3)
    best, best_error = None, math.inf
    for index, rgb in enumerate(_PALETTE_RGB):
        direction = rgb - background_rgb
        if not direction.any():
            continue
        # (h, w, 3) @ (3,) -> (h, w): each pixel's position on the background-to-colour line
        alpha = np.where(ours, offsets @ direction / float(direction @ direction), 0.0)
        area = float(alpha.sum())
        if area <= 0:
            continue
        cy = float(alpha.sum(1) @ (rows + 0.5)) / area
        cx = float(alpha.sum(0) @ (cols + 0.5)) / area
        for kind, fill in _FILL.items():
            ideal = _coverage(kind, cx, cy, math.sqrt(area / fill), rows, cols)
            for sigma in _BLURS:
                redrawn = _blur(ideal, sigma)[:, :, None] * direction  # (h, w, 3)
                error = float(((offsets - redrawn)[ours] ** 2).sum())
                if error < best_error:
                    best, best_error = (index, kind, area, cx, cy), error
    return best


def analyze(image: Image.Image | np.ndarray, min_area: float = 0.004) -> dict:
    """Read a shapes image back: background colour, and each shape's colour, kind, cell and size class.

    Every pixel takes its nearest palette colour; the background is the commonest colour on the border; a shape is
    a 4-connected region of other colours covering at least `min_area` of the image (smaller ones are noise). The
    shape's colour, kind, area and centroid come from the ideal shape that best redraws a window around the region
    (see `_fit`); the size class comes from the area, the cell from the centroid.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    # (H, W, 1, 3) - (8, 3) -> (H, W, 8) squared distances -> (H, W) palette index
    labels = ((pixels[:, :, None, :] - _PALETTE_RGB) ** 2).sum(-1).argmin(-1)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = np.bincount(border, minlength=len(_COLOR_NAMES)).argmax()
    # Measured rather than nominal, so that a generated image's drifted background still reads as alpha 0.
    background_rgb = np.median(pixels[labels == background], axis=0)

    owner, count = _components(labels != background)
    sizes = np.bincount(owner.ravel() + 1, minlength=count + 1)[1:]
    kept = np.flatnonzero(sizes >= min_area * height * width)
    shapes = []
    for k in kept:
        rows, cols = np.nonzero(owner == k)
        pad = 4  # wide enough for a blurred rim
        r0, c0 = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
        window = np.s_[r0:rows.max() + pad + 1, c0:cols.max() + pad + 1]
        ours = ~np.isin(owner[window], kept[kept != k])  # (h, w): not another shape's pixel
        window_rows = np.arange(r0, r0 + ours.shape[0], dtype=np.float64)
        window_cols = np.arange(c0, c0 + ours.shape[1], dtype=np.float64)
        fit = _fit(pixels[window], ours, background_rgb, window_rows, window_cols)
        if fit is None:
            continue
        color, kind, area, cx, cy = fit
        extent = math.sqrt(area / _FILL[kind] / (height * width))  # as a fraction of the (geometric mean) side
        shapes.append({
            "color": _COLOR_NAMES[color],
            "shape": kind,
            "cell": 3 * min(max(int(cy / height * 3), 0), 2) + min(max(int(cx / width * 3), 0), 2),
            "size": SIZES[int(np.searchsorted(_SIZE_BOUNDS, extent))],
            "area": area / (height * width),
            "centroid": (cx / width, cy / height),
        })
    shapes.sort(key=lambda s: s["area"], reverse=True)
    return {"background": _COLOR_NAMES[background], "shapes": shapes}


_ATTRIBUTES = {"color": "color", "shape": "shape", "position": "cell", "size": "size"}  # score key -> ShapeSpec field


def score(caption_text: str, image: Image.Image | np.ndarray) -> dict[str, bool | None]:
    """Per-attribute correctness of an image against its caption: background, count, color, shape, position, size.

    Described shapes are paired with found ones (or with nothing) the way that gets the most attributes right; an
    attribute is True when every described shape that names it gets it right, None when no shape names it.
    """
    target = parse_caption(caption_text)
    found = analyze(image)
    wanted = target.shapes

    def named(s: ShapeSpec, field: str) -> bool:
        return getattr(s, field) is not None

    def right(s: ShapeSpec, f: dict | None, field: str) -> bool:
        return f is not None and f[field] == getattr(s, field)

    def hits(pairing: tuple) -> int:
        return sum(
            right(s, f, field) for s, f in zip(wanted, pairing) for field in _ATTRIBUTES.values() if named(s, field)
        )

    # Padding with None lets a described shape go unmatched when too few were found.
    best = max(itertools.permutations(found["shapes"] + [None] * len(wanted), len(wanted)), key=hits)
    result: dict[str, bool | None] = {
        "background": found["background"] == target.background,
        "count": len(found["shapes"]) == len(wanted),
    }
    for key, field in _ATTRIBUTES.items():
        checks = [right(s, f, field) for s, f in zip(wanted, best) if named(s, field)]
        result[key] = all(checks) if checks else None
    return result


def accuracy(scores: Iterable[dict[str, bool | None]]) -> dict[str, float]:
    """Mean of each attribute over many `score` results, skipping None (attribute not named)."""
    totals: dict[str, list[bool]] = {}
    for s in scores:
        for key, value in s.items():
            if value is not None:
                totals.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in totals.items()}
