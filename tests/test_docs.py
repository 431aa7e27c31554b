"""The tour (docs/tour/) as it is read: its figure script draws every figure it shows, every Python snippet runs as
written, and every link to the code points at a file that defines the named function or class."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour"
CHAPTERS = sorted(TOUR.glob("*.md"))
SCRIPT = ROOT / "scripts" / "make_docs_figures.py"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def links(page: Path):
    """(is an image, text, target path) of every relative link on a page."""
    for bang, text, target in LINK.findall(page.read_text()):
        if not target.startswith(("http://", "https://", "#")):
            yield bang == "!", text, (page.parent / target.split("#")[0]).resolve()


def test_the_tour_has_its_nine_chapters_and_the_readme_links_it():
    assert len([c for c in CHAPTERS if c.name[0].isdigit()]) == 9
    assert "docs/tour/README.md" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure, drawn afresh by the script into a temporary folder (about a minute on a 2-core CPU)."""
    out = tmp_path_factory.mktemp("figures")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_the_script_draws_every_figure_the_tour_shows(drawn):
    shown = {target.name for page in CHAPTERS for image, _, target in links(page)
             if image and target.parent == TOUR}
    made = {p.name for p in drawn.glob("*.png")}
    assert shown and shown <= made, shown - made
    assert made <= shown, f"figures no chapter shows: {made - shown}"
    for name in made:
        with Image.open(drawn / name) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 100


def test_every_image_and_link_of_the_tour_exists():
    for page in CHAPTERS:
        for _, text, target in links(page):
            assert target.exists(), f"{page.name}: [{text}] -> {target} does not exist"


def test_code_links_name_a_function_or_class_their_file_defines():
    """[`DiscreteSchedule.add_noise`](…/schedule.py): every dotted part is a `def` or `class` of that file."""
    checked = 0
    for page in CHAPTERS:
        for _, text, target in links(page):
            name = text.strip("`")
            if target.suffix != ".py" or not re.fullmatch(r"[A-Za-z_][\w.]*", name) or name.endswith(".py"):
                continue
            source = target.read_text()
            for part in name.split("."):
                assert re.search(rf"^\s*(def|class) {re.escape(part)}\b", source, re.M), \
                    f"{page.name}: {name} is not defined in {target.relative_to(ROOT)}"
            checked += 1
    assert checked >= 30


def snippets(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("page", [p for p in CHAPTERS if snippets(p)], ids=lambda p: p.stem)
def test_every_python_snippet_runs_as_written(page, tmp_path, monkeypatch):
    """A page's snippets run in order in one namespace, as a reader pastes them, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the built-in model is too small to gain from a second thread on a busy machine
    namespace = {"__name__": "__tour__"}
    try:
        for code in snippets(page):
            exec(compile(code, f"{page.name} snippet", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
