"""Malformed label files, fuzzed: a reader returns a sound dataset or raises LabelFileError naming the
file (and the line where one is to blame) - never another exception, never a silently wrong sample."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
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


def make_root(label_file: str, data: bytes, image_folder: str = "images") -> Path:
    root = Path(tempfile.mkdtemp())
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"):
        path = root / image_folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    (root / label_file).write_bytes(data)
    return root


def check(spec: str, root: Path, label_file: str, classes: int) -> None:
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


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(header=st.sampled_from(["images-name " + " ".join(c.capitalize() for c in MIKELS.classes),
                               "images-name " + " ".join(reversed(MIKELS.classes)),
                               "images-name Amusement Awe Joy", "", "just words"]),
       rows=cell_rows(9), sep=st.sampled_from([" ", "\t", ","]), bom=st.booleans(), crlf=st.booleans(),
       blanks=st.booleans())
def test_flickr_ldl_label_files(header, rows, sep, bom, crlf, blanks):
    root = make_root("ground_truth.txt", layout(header, rows, sep, bom, crlf, blanks))
    check(f"flickr_ldl={root}", root, "ground_truth.txt", MIKELS.num_classes)


@FUZZ
@given(header=st.sampled_from(["[image_filename]\t[valence]\t[arousal]\t"
                               + "\t".join(f"[prob. {c}]" for c in EMOTION6.classes), "[image_filename]", ""]),
       rows=cell_rows(10), bom=st.booleans(), crlf=st.booleans(), blanks=st.booleans())
def test_emotion6_label_files(header, rows, bom, crlf, blanks):
    root = make_root("ground_truth.txt", layout(header, rows, "\t", bom, crlf, blanks))
    check(f"emotion6={root}", root, "ground_truth.txt", EMOTION6.num_classes)


@FUZZ
@given(header=st.sampled_from(["path,label", "path,positive,negative", "file,label", "path"]),
       rows=st.lists(st.one_of(
           st.tuples(st.sampled_from(NAMES[:4]), st.sampled_from(["awe", "Sad", "fear"]).map(lambda c: [c])),
           st.tuples(st.sampled_from(NAMES[:4]), st.lists(st.integers(0, 5).map(str), min_size=2, max_size=2)),
           st.tuples(st.sampled_from(NAMES), st.lists(
               st.sampled_from(["awe", "Sad", "joy", "", "0.5", "-1", "3", "x"]), min_size=0, max_size=3))),
           max_size=6, unique_by=lambda r: r[0]),
       bom=st.booleans(), crlf=st.booleans())
def test_csv_label_files(header, rows, bom, crlf):
    root = make_root("labels.csv", layout(header, rows, ",", bom, crlf, False), image_folder=".")
    check(f"csv={root}:taxonomy=mikels" if "label" in header else f"csv={root}", root, "labels.csv",
          MIKELS.num_classes)
