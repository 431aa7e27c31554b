"""The shapes data set: deterministic items, the caption grammar, rendering (the analyzer: test_shapes_score.py)."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from sdtorch.train.shapes import (
    PALETTE,
    POSITIONS,
    SHAPES,
    SceneSpec,
    ShapesDataset,
    ShapeSpec,
    caption,
    example,
    parse_caption,
    render,
    sample_scene,
    write_folder,
)
from sdtorch.train.shapes_score import analyze

# The grammar of the issue, written out independently of the module: one or two shape phrases joined by "and".
_COLOR = "(red|green|blue|yellow|purple|orange|white|black)"
_POSITION = (
    "(at the top left|at the top|at the top right|on the left|in the center|on the right"
    "|at the bottom left|at the bottom|at the bottom right)"
)
_PHRASE = rf"an? ((small|large) )?{_COLOR} (circle|square|triangle)( {_POSITION})?"
GRAMMAR = re.compile(rf"{_PHRASE}( and {_PHRASE})? on an? {_COLOR} background")


def _scenes(count: int, seed: int = 0) -> list[SceneSpec]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def test_constants_are_the_spec():
    assert PALETTE == {
        "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 210, 30),
        "purple": (130, 50, 170), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == (
        "at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
        "at the bottom left", "at the bottom", "at the bottom right",
    )


def test_items_depend_only_on_seed_and_index():
    state = random.getstate()
    first = [example(0, i) for i in range(20)]
    random.seed(12345)  # the global RNG must play no part
    again = [example(0, i) for i in range(20)]
    other_seed = [example(1, i) for i in range(20)]
    random.setstate(state)
    for (image, text), (image2, text2), (image3, _) in zip(first, again, other_seed, strict=True):
        assert text == text2 and image.tobytes() == image2.tobytes()
        assert image.tobytes() != image3.tobytes()
    assert len({text for _, text in first}) > 15  # different indexes give different items

    # The data set's length and access order do not matter: item i is item i.
    short, long = ShapesDataset(5, seed=3), ShapesDataset(10_000, seed=3)
    for i in reversed(range(5)):
        assert short[i][1] == long[i][1] and short[i][0].tobytes() == long[i][0].tobytes()
    assert len(long) == 10_000
    with pytest.raises(IndexError):
        short[5]
    # The image size changes the pixels, not the scene.
    assert example(7, 4, size=32)[1] == example(7, 4, size=256)[1]
    # A data set that keeps what it drew gives the same items, drawn once: up to `keep` of them.
    kept = ShapesDataset(10, seed=3, keep=2)
    assert [kept[i][1] for i in (4, 1, 4, 7)] == [short[4][1], short[1][1], short[4][1], long[7][1]]
    assert kept[4][0].tobytes() == short[4][0].tobytes() and kept[4] is kept[4] and kept[7] is not kept[7]
    assert sorted(kept.kept) == [1, 4]


def test_two_shapes_share_is_a_training_knob_the_default_of_which_is_the_evaluations():
    def two_shape_share(dataset):
        return sum(" and a" in dataset[i][1] for i in range(len(dataset))) / len(dataset)

    assert two_shape_share(ShapesDataset(400, seed=2, two_shapes_prob=1.0)) == 1.0
    assert two_shape_share(ShapesDataset(400, seed=2, two_shapes_prob=0.0)) == 0.0
    assert 0.6 < two_shape_share(ShapesDataset(400, seed=2, two_shapes_prob=0.7)) < 0.8  # 0.7 ± 4.4 s.d.
    default = ShapesDataset(50, seed=2)
    assert all(default[i][1] == example(2, i)[1] for i in range(50))  # what `sdtorch eval shapes` draws
    # the share decides only how many shapes: a scene drawn with one shape under both shares is the same scene
    more = ShapesDataset(50, seed=2, two_shapes_prob=0.7)
    same = [i for i in range(50) if " and a" not in more[i][1] and " and a" not in default[i][1]]
    assert same and all(more[i][1] == default[i][1] for i in same)
    with pytest.raises(ValueError, match="two-shape"):
        ShapesDataset(5, two_shapes_prob=1.5)


def test_shape_colour_never_equals_background():
    scenes = _scenes(2000)
    assert all(s.color != scene.background for scene in scenes for s in scene.shapes)
    assert {scene.background for scene in scenes} == set(PALETTE)
    with pytest.raises(ValueError, match="background's colour"):
        SceneSpec("red", (ShapeSpec("circle", "red"),))


def test_captions_follow_the_grammar_and_parse_back():
    scenes = _scenes(2000)
    for scene in scenes:
        text = caption(scene)
        assert GRAMMAR.fullmatch(text), text
        assert parse_caption(text) == scene  # every attribute the caption names comes back, and nothing else
    shapes = [s for scene in scenes for s in scene.shapes]
    # Every word of the grammar is used, and every optional part is both used and left out.
    assert {s.color for s in shapes} == set(PALETTE)
    assert {s.shape for s in shapes} == set(SHAPES)
    assert {s.size for s in shapes} == {"small", "medium", "large"}
    assert {s.cell for s in shapes} == set(range(9)) | {None}
    two = sum(len(scene.shapes) == 2 for scene in scenes) / len(scenes)
    assert 0.35 < two < 0.45  # the documented 0.4
    unplaced = sum(s.cell is None for s in shapes) / len(shapes)
    assert 0.2 < unplaced < 0.3  # the documented 1 - 0.75
    # Two shapes never share a cell.
    assert all(scene.shapes[0].cell != scene.shapes[1].cell for scene in scenes
               if len(scene.shapes) == 2 and scene.shapes[0].cell is not None)


def test_parse_caption_examples():
    text = "a small red circle at the top left and a large blue square at the bottom right on a white background"
    assert parse_caption(text) == SceneSpec(
        "white", (ShapeSpec("circle", "red", "small", 0), ShapeSpec("square", "blue", "large", 8))
    )
    # No size word means medium, no position means anywhere; "a"/"an", case, spacing and a full stop are forgiven.
    assert parse_caption("A orange  Triangle on an black background.") == SceneSpec(
        "black", (ShapeSpec("triangle", "orange", "medium", None),)
    )
    assert parse_caption("a green square on the left on a yellow background").shapes[0].cell == 3
    for bad in ("", "a pink circle on a white background", "a red hexagon on a white background",
                "a red circle", "a red circle on a red background",
                "a red circle at the top and a blue circle at the top on a white background"):
        with pytest.raises(ValueError):
            parse_caption(bad)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_render_draws_exact_palette_colours(size):
    for scene in _scenes(10, seed=size):
        image = render(scene, size, random.Random(1))
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image).reshape(-1, 3)
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        present = {tuple(int(v) for v in value) for value in values}
        # Supersampling blends only the rims: the background and every shape's interior keep their exact colours.
        assert tuple(int(v) for v in values[counts.argmax()]) == PALETTE[scene.background]
        assert all(PALETTE[s.color] in present for s in scene.shapes)


def test_render_rejects_bad_input():
    scene = SceneSpec("white", (ShapeSpec("circle", "red"),))
    with pytest.raises(ValueError, match="at least 16"):
        render(scene, size=8)
    # Two large triangles stacked in the top and center cells cannot be kept apart inside their cells.
    stacked = SceneSpec("white", (ShapeSpec("triangle", "red", "large", 1), ShapeSpec("triangle", "blue", "large", 4)))
    with pytest.raises(ValueError, match="cannot be placed"):
        render(stacked)
    for bad in (dict(shape="hexagon", color="red"), dict(shape="circle", color="pink"),
                dict(shape="circle", color="red", size="huge"), dict(shape="circle", color="red", cell=9)):
        with pytest.raises(ValueError):
            ShapeSpec(**bad)
    with pytest.raises(ValueError, match="one or two"):
        SceneSpec("white", (ShapeSpec("circle", "red"),) * 3)
    with pytest.raises(ValueError, match="share a cell"):
        SceneSpec("white", (ShapeSpec("circle", "red", cell=4), ShapeSpec("square", "blue", cell=4)))


def test_two_shapes_never_touch():
    two = [scene for scene in _scenes(200, seed=5) if len(scene.shapes) == 2]
    assert len(two) > 50
    for scene in two:
        # Without antialiasing every pixel is a palette colour; touching shapes would form one non-background region.
        found = analyze(render(scene, 64, random.Random(2), antialias=False))
        assert len(found["shapes"]) == 2, caption(scene)


def test_write_folder(tmp_path):
    write_folder(tmp_path / "data", count=4, seed=2, size=32)
    out = tmp_path / "data"
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in rows] == [f"{i:06d}.png" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metadata.jsonl"] + [f"{i:06d}.{ext}" for i in range(4) for ext in ("png", "txt")]
    )
    for i, row in enumerate(rows):
        image, text = example(2, i, 32)
        assert row["text"] == text == (out / f"{i:06d}.txt").read_text().strip()
        with Image.open(out / row["file_name"]) as saved:
            assert saved.mode == "RGB" and saved.tobytes() == image.tobytes()
