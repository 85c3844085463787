"""Malformed label files, fuzzed: a reader returns a sound dataset or raises LabelFileError naming the
file (and the line where one is to blame) - never another exception, never a silently wrong sample."""

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from emolens.data import load_dataset
from emolens.data.samples import LabelFileError
from emolens.taxonomy import EMOTION6, MIKELS

NAMES = ["a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "../escape.jpg", "/etc/passwd", "missing.jpg", "a.jpg"]
VOTES = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["", "x", "1e3", "nan", "inf", "-0", "2.5", "٣"]))


def cell_rows(columns: int):
    """Mostly well-formed rows (so reads succeed too), some with any number of junk cells."""
    good = st.tuples(st.sampled_from(NAMES[:4]), st.lists(st.integers(0, 9).map(str), min_size=columns - 1,
                                                          max_size=columns - 1))
    junk = st.tuples(st.sampled_from(NAMES), st.lists(VOTES, min_size=max(0, columns - 3), max_size=columns + 2))
    return st.lists(st.one_of(good, good, good, good, good, good, good, junk), min_size=0, max_size=7, unique_by=lambda r: r[0]).flatmap(
        lambda rows: st.sampled_from([rows, rows + rows[:1]]))  # sometimes a duplicated row


def layout(draw_header: str, rows, sep: str, bom: bool, crlf: bool, blanks: bool) -> bytes:
    lines = [draw_header] + [sep.join([name, *votes]) for name, votes in rows]
    if blanks:
        lines = [x for line in lines for x in (line, "")]
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


_roots = itertools.count()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A fresh folder per example, under pytest's own temporary directory (which it cleans up)."""
    base = tmp_path_factory.mktemp("fuzz")
    return lambda: base / str(next(_roots))


def make_root(new_folder, label_file: str, data: bytes, image_folder: str = "images") -> Path:
    root = new_folder()
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"):
        path = root / image_folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    (root / label_file).write_bytes(data)
    return root


def vote_table(header_cells: list[str], rows, class_of) -> dict[str, dict[str, float]]:
    """What the file says, read independently of the reader: image name -> {class: votes} for every
    column whose header ``class_of`` names a class (rows whose cells are not all numbers are left out)."""
    columns = {i: class_of(h) for i, h in enumerate(header_cells) if class_of(h)}
    table = {}
    for name, cells in rows:
        fields = [name, *cells]
        try:
            table[name] = {c: float(fields[i]) for i, c in columns.items()}
        except (IndexError, ValueError):
            continue
    return table


def check(spec: str, root: Path, label_file: str, classes: int, votes=None, image_folder="images") -> None:
    """``votes``: the table :func:`vote_table` read from the file, each sample's distribution must match."""
    try:
        ds = load_dataset(spec)
    except LabelFileError as e:
        event("rejected with LabelFileError")
        assert label_file in str(e) and e.reason
        assert e.line is None or e.line >= 1
        return
    event("read" if ds.samples else "read, no usable sample")
    for s in ds.samples:
        assert s.path.resolve().is_relative_to(root.resolve()) and s.path.is_file()
        assert 0 <= s.label < classes
        if s.distribution is not None:
            assert np.isfinite(s.distribution).all() and (s.distribution >= 0).all()
            assert abs(s.distribution.sum() - 1) < 1e-6
            assert s.distribution[s.label] == s.distribution.max()
    if votes is not None:
        tax = ds.taxonomy
        for s in ds.samples:
            written = votes[s.path.relative_to(root / image_folder).as_posix()]
            expected = np.array([written[c] for c in tax.classes])
            np.testing.assert_allclose(s.distribution, expected / expected.sum(), atol=1e-6)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(header=st.sampled_from(["images-name " + " ".join(c.capitalize() for c in MIKELS.classes),
                               "images-name " + " ".join(reversed(MIKELS.classes)),
                               "images-name Amusement Awe Joy", "", "just words"]),
       rows=cell_rows(9), sep=st.sampled_from([" ", "\t", ","]), bom=st.booleans(), crlf=st.booleans(),
       blanks=st.booleans())
@example(header="images-name " + " ".join(reversed(MIKELS.classes)), rows=[("a.jpg", ["9", "0", "1", "0", "2", "0", "0", "0"])],
         sep=" ", bom=False, crlf=False, blanks=False)
def test_flickr_ldl_label_files(folders, header, rows, sep, bom, crlf, blanks):
    root = make_root(folders, "ground_truth.txt", layout(header, rows, sep, bom, crlf, blanks))
    votes = vote_table(header.split(), rows, lambda h: h.lower() if h.lower() in MIKELS.classes else None)
    check(f"flickr_ldl={root}", root, "ground_truth.txt", MIKELS.num_classes, votes)


@FUZZ
@given(header=st.sampled_from(["[image_filename]\t[valence]\t[arousal]\t"
                               + "\t".join(f"[prob. {c}]" for c in EMOTION6.classes),
                               "[image_filename]\t[valence]\t[arousal]\t"
                               + "\t".join(f"[prob. {c}]" for c in reversed(EMOTION6.classes)),
                               "[image_filename]", ""]),
       rows=cell_rows(10), bom=st.booleans(), crlf=st.booleans(), blanks=st.booleans())
@example(header="[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[prob. {c}]" for c in reversed(EMOTION6.classes)),
         rows=[("a.jpg", ["5", "5", "9", "0", "1", "0", "2", "0", "0"])], bom=False, crlf=False, blanks=False)
def test_emotion6_label_files(folders, header, rows, bom, crlf, blanks):
    root = make_root(folders, "ground_truth.txt", layout(header, rows, "\t", bom, crlf, blanks))
    votes = vote_table(header.split("\t"), rows,
                       lambda h: h[len("[prob. "):-1] if h.startswith("[prob. ") and h.endswith("]") else None)
    check(f"emotion6={root}", root, "ground_truth.txt", EMOTION6.num_classes, votes)


@FUZZ
@given(header=st.sampled_from(["path,label", "path,positive,negative", "file,label", "path"]),
       rows=st.lists(st.one_of(
           st.tuples(st.sampled_from(NAMES[:4]), st.sampled_from(["awe", "Sad", "fear"]).map(lambda c: [c])),
           st.tuples(st.sampled_from(NAMES[:4]), st.lists(st.integers(0, 5).map(str), min_size=2, max_size=2)),
           st.tuples(st.sampled_from(NAMES), st.lists(
               st.sampled_from(["awe", "Sad", "joy", "", "0.5", "-1", "3", "x"]), min_size=0, max_size=3))),
           max_size=6, unique_by=lambda r: r[0]),
       bom=st.booleans(), crlf=st.booleans())
def test_csv_label_files(folders, header, rows, bom, crlf):
    root = make_root(folders, "labels.csv", layout(header, rows, ",", bom, crlf, False), image_folder=".")
    check(f"csv={root}:taxonomy=mikels" if "label" in header else f"csv={root}", root, "labels.csv",
          MIKELS.num_classes)
