"""Readers for the published layouts of visual-emotion datasets.

A dataset is named ``KIND=ROOT[:option=value,...]``; :func:`load_dataset` parses that and
calls the reader registered for ``KIND``. Each reader returns an :class:`EmotionDataset`
whose class order comes from an explicit taxonomy (or the label file's own header).
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from ..images import IMAGE_EXTENSIONS
from ..taxonomy import (AFFECT_DIMENSIONS, EMOTION6, EMOTIONROI, MIKELS, NEGATIVE, OASIS_SCALE, POLARITY, POSITIVE, SAM9_SCALE,
                        TAXONOMIES, AffectScale, Taxonomy, dominant_label, get_taxonomy)
from .samples import EmotionDataset, LabelFileError, Sample
from .side import SIDE_FEATURES, read_side_features

Reader = Callable[..., EmotionDataset]
READERS: dict[str, Reader] = {}

#: Other spellings of class names met in published label files and folder names.
CLASS_ALIASES = {"content": "contentment", "sad": "sadness", "amused": "amusement", "excited": "excitement",
                 "happiness": "joy", "happy": "joy", "angry": "anger", "scared": "fear", "neg": "negative", "pos": "positive"}


def register_reader(kind: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        READERS[kind] = fn
        return fn

    return deco


def canonical_class(name: str) -> str:
    key = name.strip().strip("'\"").strip().lower()
    if key.startswith("[prob.") and key.endswith("]"):  # Emotion6's header: "[prob. anger]"
        key = key[len("[prob."):-1].strip()
    return CLASS_ALIASES.get(key, key)


# --- spec parsing -----------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``KIND=ROOT[:k=v,...]`` -> (kind, root, options)."""
    if "=" not in spec:
        raise ValueError(f"dataset spec {spec!r} is not KIND=ROOT[:option=value,...]; kinds: {', '.join(sorted(READERS))}")
    kind, rest = spec.split("=", 1)
    options: dict[str, str] = {}
    head, sep, tail = rest.rpartition(":")
    if sep and all(re.fullmatch(r"\s*\w+\s*=.*", item) for item in tail.split(",")):
        rest = head
        for item in tail.split(","):
            if "=" not in item:
                raise ValueError(f"dataset option {item!r} in {spec!r} is not key=value")
            k, v = item.split("=", 1)
            options[k.strip()] = v.strip()
    return kind.strip().lower(), Path(rest).expanduser(), options


def load_dataset(spec: str) -> EmotionDataset:
    """Read the dataset named by ``KIND=ROOT[:option=value,...]``."""
    kind, root, options = parse_spec(spec)
    side_files = {key: options.pop(key) for key in SIDE_FEATURES if key in options}
    limit = options.pop("limit", None)
    if kind not in READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    try:
        ds = READERS[kind](root, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"dataset kind {kind!r} does not take option(s) {', '.join(options)}") from e
        raise
    for key, file in side_files.items():
        path = Path(file) if Path(file).is_absolute() else root / file
        ds.extras[key] = read_side_features(path, ds)
    if limit is not None:
        if not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"dataset option limit={limit!r} in {spec!r} is not a positive number of images")
        ds = ds.subset(interleaved_by_class(ds.labels)[:int(limit)])
    ds.spec = spec
    return ds


def interleaved_by_class(labels: np.ndarray) -> list[int]:
    """Sample positions taking one image of each class in turn (in file order within a class), so that any
    prefix covers the classes as evenly as it can: the images a ``limit`` keeps."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)  # each image's place within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank)).tolist()  # by place, then class


# --- shared parsing helpers ---------------------------------------------------------------


def _text_lines(file: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; BOM and CRLF tolerated."""
    if not file.is_file():
        raise LabelFileError(file, None, "label file not found")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelFileError(file, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _inside(root: Path, rel: str, file: Path, line: int | None) -> Path:
    """``root/rel``, refusing names that escape the dataset root."""
    if not rel:
        raise LabelFileError(file, line, "empty image name")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise LabelFileError(file, line, f"image path {rel!r} escapes the dataset root")
    return root / p


def _under(image_dir: Path, file: Path) -> Callable[[str, int], Path]:
    return lambda name, line: _inside(image_dir, name, file, line)


def _numbers(fields: list[str], file: Path, line: int) -> np.ndarray:
    try:
        v = np.array([float(x) for x in fields], dtype=np.float64)
    except ValueError:
        raise LabelFileError(file, line, f"non-numeric value in {fields}") from None
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise LabelFileError(file, line, f"votes must be finite and non-negative, got {fields}")
    return v


def _ratings(fields: list[str], scale: AffectScale, file: Path, line: int) -> np.ndarray:
    """Valence and arousal ratings as given, checked against their scale."""
    try:
        v = np.array([float(x) for x in fields], dtype=np.float64)
    except ValueError:
        raise LabelFileError(file, line, f"non-numeric rating in {fields}") from None
    if not np.all(np.isfinite(v)) or np.any(v < scale.low) or np.any(v > scale.high):
        raise LabelFileError(file, line, f"ratings must lie in {scale.low:g}-{scale.high:g}, got {fields}")
    return v


def _header_order(names: list[str], taxonomy: Taxonomy, file: Path) -> np.ndarray:
    """Column position of each taxonomy class, from a header that names the classes."""
    canon = [canonical_class(n) for n in names]
    unknown = [n for n, c in zip(names, canon) if c not in taxonomy]
    if unknown:
        raise LabelFileError(file, 1, f"unknown class name(s) {unknown} for taxonomy {taxonomy.name!r} ({', '.join(taxonomy.classes)})")
    if len(set(canon)) != len(canon) or len(canon) != taxonomy.num_classes:
        raise LabelFileError(file, 1, f"header must name each of the {taxonomy.num_classes} classes once, got {names}")
    return np.array([canon.index(c) for c in taxonomy.classes])


def _distribution_dataset(
    kind: str,
    root: Path,
    taxonomy: Taxonomy,
    rows: list[tuple[int, str, np.ndarray]],
    file: Path,
    locate: Callable[[str, int], Path],
    ratings: dict[str, np.ndarray] | None = None,
    affect_scale: AffectScale | None = None,
) -> EmotionDataset:
    """Samples from (line, image name, class weights in taxonomy order) rows; ``locate`` finds an image;
    ``ratings`` (valence, arousal on ``affect_scale``) by image name, where the dataset has them."""
    samples, missing, skipped, seen = [], [], Counter(), {}
    weights, names = [], []
    for line, name, w in rows:
        if name in seen:
            raise LabelFileError(file, line, f"image {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        if w.sum() == 0:
            skipped["all-zero votes"] += 1
            continue
        path = locate(name, line)
        if not path.is_file():
            missing.append(name)
            continue
        samples.append(path)
        names.append(name)
        weights.append(w / w.sum())
    dist = np.array(weights).reshape(-1, taxonomy.num_classes)
    dom = dominant_label(dist) if len(dist) else None
    out = [
        Sample(path, int(lbl), d.astype(np.float32), taxonomy.polarity[int(lbl)],
               affect=None if ratings is None else affect_scale.to_common(ratings[name]).astype(np.float32))
        for path, name, lbl, d in zip(samples, names, dom.labels if dom else [], dist)
    ]
    return EmotionDataset(kind, root, taxonomy, out, missing, skipped, dom.ties if dom else 0,
                          affect_scale=affect_scale if ratings is not None else None)


# --- readers ------------------------------------------------------------------------------


def _ldl(kind: str, root: Path, labels: str) -> EmotionDataset:
    file = root / labels
    lines = _text_lines(file)
    if not lines:
        raise LabelFileError(file, None, "label file is empty")
    header = lines[0][1].split()
    order = _header_order(header[1:], MIKELS, file)
    rows = []
    for line, text in lines[1:]:
        fields = text.split()
        if len(fields) != len(header):
            raise LabelFileError(file, line, f"expected {len(header)} fields (name and {len(header) - 1} votes), got {len(fields)}")
        rows.append((line, fields[0], _numbers(fields[1:], file, line)[order]))
    return _distribution_dataset(kind, root, MIKELS, rows, file, _under(root / "images", file))


@register_reader("flickr_ldl")
def read_flickr_ldl(root: Path, labels: str = "ground_truth.txt") -> EmotionDataset:
    """Flickr_LDL: ``ground_truth.txt`` (header, then ``NAME v1..v8``) and ``images/NAME``."""
    return _ldl("flickr_ldl", root, labels)


@register_reader("twitter_ldl")
def read_twitter_ldl(root: Path, labels: str = "ground_truth.txt") -> EmotionDataset:
    """Twitter_LDL: the same layout as Flickr_LDL."""
    return _ldl("twitter_ldl", root, labels)


@register_reader("emotion6")
def read_emotion6(root: Path, labels: str = "ground_truth.txt") -> EmotionDataset:
    """Emotion6: tab-separated ``ground_truth.txt`` with a 7-way distribution; images under ``images/``.

    The folder is the search keyword, not the label: the label is the dominant emotion.
    """
    file = root / labels
    lines = _text_lines(file)
    if not lines:
        raise LabelFileError(file, None, "label file is empty")
    header = lines[0][1].split("\t")
    prob_cols = [i for i, h in enumerate(header) if h.strip().lower().startswith("[prob.")]
    order = _header_order([header[i] for i in prob_cols], EMOTION6, file)
    named = {h.strip().strip("[]").lower(): i for i, h in enumerate(header)}
    affect_cols = [named[d] for d in AFFECT_DIMENSIONS if d in named]
    rows, ratings = [], {} if len(affect_cols) == 2 else None
    for line, text in lines[1:]:
        fields = text.split("\t")
        if len(fields) != len(header):
            raise LabelFileError(file, line, f"expected {len(header)} tab-separated fields, got {len(fields)}")
        name = fields[0].strip()
        rows.append((line, name, _numbers([fields[i] for i in prob_cols], file, line)[order]))
        if ratings is not None:
            ratings[name] = _ratings([fields[i] for i in affect_cols], SAM9_SCALE, file, line)
    return _distribution_dataset("emotion6", root, EMOTION6, rows, file, _under(root / "images", file), ratings,
                                 SAM9_SCALE)


@register_reader("oasis")
def read_oasis(root: Path, labels: str = "OASIS.csv") -> EmotionDataset:
    """OASIS: ``OASIS.csv`` (old-Mac CR line endings, as released) with mean valence and arousal on a 1-7 scale
    per theme; images at ``images/<Theme>.jpg`` (themes stripped: two carry a trailing space in the file).

    OASIS has no emotion classes: its label is the valence side of the scale's midpoint (above 4 positive,
    else negative), a convention for stratified splits and polarity figures."""
    file = root / labels
    lines = _text_lines(file)  # splitlines() ends lines at CR, LF or CRLF alike
    if not lines:
        raise LabelFileError(file, None, "label file is empty")
    records = list(csv.reader(text for _, text in lines))
    header = [h.strip() for h in records[0]]
    wanted = ("Theme", "Valence_mean", "Arousal_mean")
    absent = [h for h in wanted if h not in header]
    if absent:
        raise LabelFileError(file, lines[0][0], f"no column(s) {', '.join(absent)} in the header {header}")
    theme, valence, arousal = (header.index(h) for h in wanted)
    samples, missing, seen = [], [], {}
    for (line, _), fields in zip(lines[1:], records[1:]):
        if len(fields) != len(header):
            raise LabelFileError(file, line, f"expected {len(header)} comma-separated fields, got {len(fields)}")
        name = fields[theme].strip()
        if name in seen:
            raise LabelFileError(file, line, f"theme {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = line
        path = _inside(root / "images", f"{name}.jpg", file, line)
        if not path.is_file():
            missing.append(name)
            continue
        rating = _ratings([fields[valence], fields[arousal]], OASIS_SCALE, file, line)
        label = POSITIVE if rating[0] > (OASIS_SCALE.low + OASIS_SCALE.high) / 2 else NEGATIVE
        samples.append(Sample(path, label, None, label, affect=OASIS_SCALE.to_common(rating).astype(np.float32)))
    return EmotionDataset("oasis", root, POLARITY, samples, missing, affect_scale=OASIS_SCALE)


@register_reader("twitter1")
def read_twitter1(root: Path, agree: str = "three") -> EmotionDataset:
    """Twitter I: ``images/`` and ``ground_truth/twitter_{three,four,five}_agrees.txt`` (``NAME 0|1``)."""
    if agree not in ("three", "four", "five"):
        raise ValueError(f"twitter1 option agree must be three, four or five, got {agree!r}")
    file = root / "ground_truth" / f"twitter_{agree}_agrees.txt"
    samples, missing, seen = [], [], {}
    for line, text in _text_lines(file):
        fields = text.split()
        if len(fields) != 2 or fields[1] not in ("0", "1"):
            raise LabelFileError(file, line, f"expected 'NAME 0|1', got {text!r}")
        if fields[0] in seen:
            raise LabelFileError(file, line, f"image {fields[0]!r} is listed twice (first on line {seen[fields[0]]})")
        seen[fields[0]] = line
        path = _inside(root / "images", fields[0], file, line)
        if not path.is_file():
            missing.append(fields[0])
            continue
        label = int(fields[1])  # 0 negative, 1 positive: POLARITY's own order
        samples.append(Sample(path, label, None, label))
    return EmotionDataset("twitter1", root, POLARITY, samples, missing)


def _class_folders(root: Path, taxonomy: Taxonomy) -> dict[int, Path]:
    folders = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        name = canonical_class(d.name)
        if name in taxonomy:
            folders[taxonomy.index(name)] = d
    return folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _vote_lookup(file: Path, taxonomy: Taxonomy) -> dict[str, tuple[int, np.ndarray]]:
    """A ``NAME v1..vC`` table with a header naming the classes: image name -> (line, votes in taxonomy order)."""
    lines = _text_lines(file)
    if not lines:
        raise LabelFileError(file, None, "vote file is empty")
    split = (lambda s: next(csv.reader([s]))) if "," in lines[0][1] else str.split
    header = [h.strip() for h in split(lines[0][1])]
    order = _header_order(header[1:], taxonomy, file)
    table = {}
    for line, text in lines[1:]:
        fields = [f.strip() for f in split(text)]
        if len(fields) != len(header):
            raise LabelFileError(file, line, f"expected {len(header)} fields, got {len(fields)}")
        name = fields[0].strip("'\"")
        if name in table:
            raise LabelFileError(file, line, f"image {name!r} is listed twice (first on line {table[name][0]})")
        table[name] = (line, _numbers(fields[1:], file, line)[order])
    return table


@register_reader("fi")
def read_fi(root: Path, votes: str | None = None) -> EmotionDataset:
    """FI: one folder per Mikels emotion; ``votes=FILE`` (header of class names, ``NAME v1..v8``) adds distributions."""
    folders = _class_folders(root, MIKELS)
    if not folders:
        raise LabelFileError(root, None, f"no folders named after {', '.join(MIKELS.classes)}")
    table = _vote_lookup(root / votes, MIKELS) if votes else None
    samples, skipped = [], Counter()
    for label, folder in sorted(folders.items()):
        for p in _images_in(folder):
            dist = None
            if table is not None:
                key = p.relative_to(root).as_posix()
                entry = table.get(key, table.get(p.name))
                w = None if entry is None else entry[1]
                if w is None or w.sum() == 0:
                    skipped["no votes" if w is None else "all-zero votes"] += 1
                    continue
                dist = (w / w.sum()).astype(np.float32)
            samples.append(Sample(p, label, dist, MIKELS.polarity[label]))
    return EmotionDataset("fi", root, MIKELS, samples, skipped=skipped)


@register_reader("emotionroi")
def read_emotionroi(root: Path) -> EmotionDataset:
    """EmotionROI: ``images/<emotion>/<n>.jpg``, stimuli maps in ``ground_truth/``, official split lists."""
    folders = _class_folders(root / "images", EMOTIONROI)
    if not folders:
        raise LabelFileError(root / "images", None, f"no folders named after {', '.join(EMOTIONROI.classes)}")
    samples, index = [], {}
    for label, folder in sorted(folders.items()):
        for p in _images_in(folder):
            rel = p.relative_to(root / "images").as_posix()
            region = root / "ground_truth" / rel
            index[rel] = len(samples)
            samples.append(Sample(p, label, None, EMOTIONROI.polarity[label], region if region.is_file() else None))
    split, missing = {}, []
    for part, fname in (("train", "training.txt"), ("test", "testing.txt")):
        file = root / "training_testing_split" / fname
        if not file.is_file():
            continue
        ids = []
        for line, text in _text_lines(file):
            rel = text.split()[0].removeprefix("images/")
            _inside(root / "images", rel, file, line)
            if rel in index:
                ids.append(index[rel])
            else:
                missing.append(rel)
        split[part] = ids
    return EmotionDataset("emotionroi", root, EMOTIONROI, samples, missing, official_split=split or None,
                          optional_parts={
                              "stimuli maps": ("ground_truth/", "mlrcnn learns its regions from class-activation boxes "
                                               "(regions=cam)"),
                              "official split": ("training_testing_split/", "the protocols are kfold and split")})


@register_reader("artphoto")
def read_artphoto(root: Path) -> EmotionDataset:
    """ArtPhoto: files named ``<emotion>_<id>.jpg`` anywhere under the root."""
    samples, skipped = [], Counter()
    for p in _images_in(root):
        name = canonical_class(p.stem.rsplit("_", 1)[0]) if "_" in p.stem else ""
        if name not in MIKELS:
            skipped["file name has no emotion prefix"] += 1
            continue
        label = MIKELS.index(name)
        samples.append(Sample(p, label, None, MIKELS.polarity[label]))
    return EmotionDataset("artphoto", root, MIKELS, samples, skipped=skipped)


@register_reader("abstract")
def read_abstract(root: Path, labels: str = "ABSTRACT_groundTruth.csv") -> EmotionDataset:
    """Abstract paintings: ``ABSTRACT_groundTruth.csv`` (quoted image name, eight vote counts); images anywhere below."""
    file = root / labels
    table = _vote_lookup(file, MIKELS)
    by_name = {p.name: p for p in _images_in(root)}
    rows = [(line, name, w) for name, (line, w) in table.items()]

    def locate(name: str, line: int) -> Path:
        _inside(root, name, file, line)
        return by_name.get(Path(name).name, root / name)

    return _distribution_dataset("abstract", root, MIKELS, rows, file, locate)


def _taxonomy_for(names: list[str], option: str | None, kind: str) -> Taxonomy:
    """The taxonomy named by ``option``, a known one holding exactly ``names``, or a new one."""
    if option:
        return get_taxonomy(option)
    canon = sorted({canonical_class(n) for n in names})
    for tax in TAXONOMIES.values():
        if sorted(tax.classes) == canon:
            return tax
    return Taxonomy(kind, tuple(canon), tuple(None for _ in canon), f"classes found in a {kind} dataset")


@register_reader("folder")
def read_folder(root: Path, taxonomy: str | None = None) -> EmotionDataset:
    """One sub-folder per class; the taxonomy is named, recognised from the folder names, or made from them."""
    names = [d.name for d in sorted(root.iterdir()) if d.is_dir()]
    if not names:
        raise LabelFileError(root, None, "no class folders")
    tax = _taxonomy_for(names, taxonomy, "folder")
    samples, skipped = [], Counter()
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        if canonical_class(d.name) not in tax:
            skipped[f"folder {d.name!r} is not a class of {tax.name}"] += 1
            continue
        label = tax.index(canonical_class(d.name))
        samples.extend(Sample(p, label, None, tax.polarity[label]) for p in _images_in(d))
    return EmotionDataset("folder", root, tax, samples, skipped=skipped)


@register_reader("csv")
def read_csv(root: Path, file: str = "labels.csv", taxonomy: str | None = None) -> EmotionDataset:
    """``path,label`` rows, or ``path`` plus one column per class holding a distribution or votes."""
    labels_file = root / file
    lines = _text_lines(labels_file)
    if not lines:
        raise LabelFileError(labels_file, None, "label file is empty")
    rows = list(csv.reader(io.StringIO("\n".join(t for _, t in lines))))
    header = [h.strip() for h in rows[0]]
    if len(header) < 2 or header[0].lower() != "path":
        raise LabelFileError(labels_file, lines[0][0], f"header must start with 'path', got {header}")
    body = list(zip((ln for ln, _ in lines[1:]), rows[1:]))
    for line, fields in body:
        if len(fields) != len(header):
            raise LabelFileError(labels_file, line, f"expected {len(header)} fields, got {len(fields)}")
    if [h.lower() for h in header] == ["path", "label"]:
        tax = _taxonomy_for([f[1] for _, f in body], taxonomy, "csv")
        samples, missing, seen = [], [], {}
        for line, (rel, name) in body:
            if rel in seen:
                raise LabelFileError(labels_file, line, f"image {rel!r} is listed twice (first on line {seen[rel]})")
            seen[rel] = line
            if canonical_class(name) not in tax:
                raise LabelFileError(labels_file, line, f"unknown class {name!r} for taxonomy {tax.name!r}")
            path = _inside(root, rel, labels_file, line)
            if not path.is_file():
                missing.append(rel)
                continue
            label = tax.index(canonical_class(name))
            samples.append(Sample(path, label, None, tax.polarity[label]))
        return EmotionDataset("csv", root, tax, samples, missing)
    tax = _taxonomy_for(header[1:], taxonomy, "csv")
    order = _header_order(header[1:], tax, labels_file)
    rows_w = [(line, f[0].strip(), _numbers(f[1:], labels_file, line)[order]) for line, f in body]
    return _distribution_dataset("csv", root, tax, rows_w, labels_file, _under(root, labels_file))
