"""Every table of results at 80 columns: one line a row, file names whole (folders shortened in the
middle), emotion names uncut, nothing past the edge."""

import io

import pytest
from rich.console import Console

from emolens.cli import prediction_table, report_bad_files, search_table
from emolens.images import ImageLoadError
from emolens.predict import Prediction
from emolens.retrieval.index import Hit
from emolens.taxonomy import MIKELS
from emolens.terminal import shortened

DEEP = "/home/someone/Pictures/2024/summer holidays in the mountains/day 3/IMG_20240717_093015.jpg"
NAMES = ["a.jpg", "IMG_20240717_093015.jpg", "Screenshot_20240717.png"]


def distribution(top: str) -> dict[str, float]:
    """``top`` at 0.44, the other seven at 0.08 each."""
    return {c: 0.44 if c == top else 0.08 for c in MIKELS.classes}


def predictions(rated: bool) -> list[Prediction]:
    out = []
    for i, name in enumerate(NAMES):
        top = MIKELS.classes[(2 + 3 * i) % 8]  # contentment, the longest name, among them
        out.append(Prediction(source=f"/home/someone/Pictures/2024/summer holidays in the mountains/{name}",
                              emotion=top, probability=0.44, polarity="positive", distribution=distribution(top),
                              positive_probability=0.6, valence=0.31 if rated else None,
                              arousal=-0.12 if rated else None))
    return out


def rendered(table, width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), width=width)
    console.print(table)
    return console.file.getvalue().splitlines()


def assert_fits(lines: list[str], names: list[str], emotions: list[str], rows: int):
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    body = lines[lines.index(next(line for line in lines if set(line) == {"─"})) + 1:]
    assert len(body) == rows, "\n".join(lines)  # one line a row
    for line, name, emotion in zip(body, names, emotions):
        assert name in line and f" {emotion} " in line, line  # file name whole, emotion uncut


@pytest.mark.parametrize("rated", [True, False])
def test_the_prediction_table_fits_80_columns(rated):
    found = predictions(rated)
    lines = rendered(prediction_table(found, MIKELS.classes, 80))
    assert_fits(lines, NAMES, [p.emotion for p in found], len(found))
    assert "…" in lines[-1]  # the folders were shortened, not the name


def test_a_wide_terminal_shows_every_class():
    lines = rendered(prediction_table(predictions(False), MIKELS.classes, 200), width=200)
    header = next(line for line in lines if line.startswith("image"))
    assert header.split()[-8:] == list(MIKELS.classes)


@pytest.mark.parametrize("rated", [True, False])
def test_the_search_table_fits_80_columns(rated):
    hits = [Hit(i, p.source, 0.9 - i / 10, p.emotion, p.probability, p.polarity, p.distribution, p.valence, p.arousal)
            for i, p in enumerate(predictions(rated))]
    lines = rendered(search_table("feels like query.jpg", hits, 80))
    assert_fits(lines, NAMES, [h.emotion for h in hits], len(hits))


def test_the_table_of_failures_fits_80_columns(monkeypatch):
    console = Console(file=io.StringIO(), width=80)
    monkeypatch.setattr("emolens.cli.err_console", console)
    report_bad_files([ImageLoadError(DEEP, "not an image file in an accepted format (JPEG, PNG, WebP, GIF, BMP, "
                                           "TIFF, HEIC/HEIF or AVIF)")])
    lines = console.file.getvalue().splitlines()
    assert max(map(len, lines)) <= 80 and "IMG_20240717_093015.jpg" in "".join(lines), "\n".join(lines)


def test_paths_are_shortened_in_the_middle():
    assert shortened("photos/a.jpg", 40) == "photos/a.jpg"
    short = shortened(DEEP, 40)
    assert len(short) == 40 and short.endswith("/IMG_20240717_093015.jpg") and short.startswith("/home/someone")
    assert shortened("a-name-longer-than-the-room.jpg", 10) == "a-name-longer-than-the-room.jpg"  # kept whole


def test_tables_without_rows_render():
    assert rendered(prediction_table([], MIKELS.classes, 80))
    assert rendered(search_table("nothing", [], 80))
