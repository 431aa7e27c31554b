"""Grade an image against its shapes caption by pixel analysis alone: what `sdtorch eval shapes` scores with.

`analyze` reads a shapes image back (background colour; each shape's colour, kind, 3x3 cell and size class) and
`score` compares that with what the caption asks for; `accuracy` averages scores. The data set itself (grammar,
layout, rendering) is `shapes.py`.
"""

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from .shapes import PALETTE, SHAPES, SIZE_FRACTION, SIZES, STAR_INNER, ShapeSpec, parse_caption

# Area / extent² of each kind (extent: the side of its bounding box, a star's outer diameter): what the analyzer
# divides by to turn an area into an extent. A star's ten triangles: 5·R·r·sin 36° over (2R)².
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
         "star": 5 * STAR_INNER * math.sin(math.pi / 5) / 4}
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
    for start in zip(*np.nonzero(mask), strict=True):
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
    elif kind == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= half
    elif kind == "triangle":
        depth = dy + 2 * extent / 3  # below the apex, which is 2/3 of the height above the centroid
        inside = (depth >= 0) & (depth <= extent) & (np.abs(dx) <= depth / 2)
    else:  # star: within the edge from an outer corner (angle 0 of its 72° sector) to the next inner one (36°)
        outer, inner, tip = half, half * STAR_INNER, math.pi / 5
        a = np.abs((np.arctan2(dx, -dy) + tip) % (2 * tip) - tip)  # angle from the nearest outer corner
        edge = outer * inner * math.sin(tip) / (inner * math.sin(tip) * np.cos(a) + np.sin(a) * (outer - inner
                                                                                               * math.cos(tip)))
        inside = dx**2 + dy**2 <= edge**2
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
    pixels: np.ndarray, ours: np.ndarray, background_rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray,
    kinds: Sequence[str] = SHAPES,
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
        for kind in kinds:
            ideal = _coverage(kind, cx, cy, math.sqrt(area / _FILL[kind]), rows, cols)
            for sigma in _BLURS:
                redrawn = _blur(ideal, sigma)[:, :, None] * direction  # (h, w, 3)
                error = float(((offsets - redrawn)[ours] ** 2).sum())
                if error < best_error:
                    best, best_error = (index, kind, area, cx, cy), error
    return best


def analyze(image: Image.Image | np.ndarray, min_area: float = 0.004, kinds: Sequence[str] = SHAPES) -> dict:
    """Read a shapes image back: background colour, and each shape's colour, kind, cell and size class.

    Every pixel takes its nearest palette colour; the background is the commonest colour on the border; a shape is
    a 4-connected region of other colours covering at least `min_area` of the image (smaller ones are noise). The
    shape's colour, kind, area and centroid come from the ideal shape that best redraws a window around the region
    (see `_fit`, which tries the `kinds`: by default the grammar's three); the size class comes from the area, the
    cell from the centroid.
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
        fit = _fit(pixels[window], ours, background_rgb, window_rows, window_cols, kinds)
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


def score(caption_text: str, image: Image.Image | np.ndarray, kinds: Sequence[str] = SHAPES
          ) -> dict[str, bool | None]:
    """Per-attribute correctness of an image against its caption: background, count, color, shape, position, size.

    Described shapes are paired with found ones (or with nothing) the way that gets the most attributes right; an
    attribute is True when every described shape that names it gets it right, None when no shape names it.
    """
    target = parse_caption(caption_text)
    found = analyze(image, kinds=kinds)
    wanted = target.shapes

    def named(s: ShapeSpec, field: str) -> bool:
        return getattr(s, field) is not None

    def right(s: ShapeSpec, f: dict | None, field: str) -> bool:
        return f is not None and f[field] == getattr(s, field)

    def hits(pairing: tuple) -> int:
        return sum(
            right(s, f, field) for s, f in zip(wanted, pairing, strict=True) for field in _ATTRIBUTES.values()
            if named(s, field)
        )

    # Padding with None lets a described shape go unmatched when too few were found.
    best = max(itertools.permutations(found["shapes"] + [None] * len(wanted), len(wanted)), key=hits)
    result: dict[str, bool | None] = {
        "background": found["background"] == target.background,
        "count": len(found["shapes"]) == len(wanted),
    }
    for key, field in _ATTRIBUTES.items():
        checks = [right(s, f, field) for s, f in zip(wanted, best, strict=True) if named(s, field)]
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
