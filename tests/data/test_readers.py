import numpy as np
import pytest

from helpers import write_image
from emolens.data import LabelFileError, load_dataset, parse_spec
from emolens.taxonomy import EMOTION6, EMOTIONROI, MIKELS, POLARITY


def test_parse_spec():
    assert parse_spec("flickr_ldl=../data/f") == ("flickr_ldl", __import__("pathlib").Path("../data/f"), {})
    kind, root, opts = parse_spec("twitter1=/x/y:agree=four,foo=1")
    assert kind == "twitter1" and str(root) == "/x/y" and opts == {"agree": "four", "foo": "1"}
    with pytest.raises(ValueError, match="KIND=ROOT"):
        parse_spec("no-kind")


def test_unknown_kind_option_and_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset(f"nope={tmp_path}")
    with pytest.raises(FileNotFoundError):
        load_dataset(f"flickr_ldl={tmp_path / 'absent'}")
    (tmp_path / "images").mkdir()
    (tmp_path / "ground_truth.txt").write_text("images-name " + " ".join(MIKELS.classes) + "\n")
    with pytest.raises(ValueError, match="does not take"):
        load_dataset(f"flickr_ldl={tmp_path}:bogus=1")


def ldl_fixture(root, header_order):
    """A Flickr_LDL-style folder; the header lists the classes in ``header_order``."""
    votes = {  # in Mikels order
        "1.jpg": [0, 0, 0, 0, 0, 0, 2, 9],  # sadness
        "2.jpg": [3, 0, 1, 0, 0, 2, 1, 4],  # sadness
        "3.jpg": [5, 5, 1, 0, 0, 0, 0, 0],  # tie amusement/awe -> amusement
        "4.jpg": [0, 0, 11, 0, 0, 0, 0, 0],  # contentment
        "5.jpg": [1, 0, 0, 0, 0, 0, 0, 0],  # listed, image missing
    }
    lines = ["images-name " + " ".join(c.capitalize() for c in header_order) + " "]
    cols = [MIKELS.index(c) for c in header_order]
    for name, v in votes.items():
        lines.append(name + " " + " ".join(str(v[c]) for c in cols))
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, 5):
        write_image(root / "images" / f"{i}.jpg")
    return votes


@pytest.mark.parametrize("kind", ["flickr_ldl", "twitter_ldl"])
def test_ldl_reader(tmp_path, kind):
    votes = ldl_fixture(tmp_path, MIKELS.classes)
    ds = load_dataset(f"{kind}={tmp_path}")
    assert ds.taxonomy is MIKELS and len(ds) == 4
    assert ds.missing == ["5.jpg"] and ds.ties == 1
    assert ds.labels.tolist() == [7, 7, 0, 2]
    np.testing.assert_allclose(ds.samples[1].distribution, np.array(votes["2.jpg"]) / 11, rtol=1e-6)
    assert ds.polarities.tolist() == [0, 0, 1, 1]


def test_ldl_reader_follows_the_header_order(tmp_path):
    shuffled = ("sadness", "awe", "fear", "amusement", "excitement", "contentment", "anger", "disgust")
    ldl_fixture(tmp_path, shuffled)
    ds = load_dataset(f"flickr_ldl={tmp_path}")
    assert ds.labels.tolist() == [7, 7, 0, 2]
    assert ds.samples[0].distribution[MIKELS.index("fear")] == pytest.approx(2 / 11)


@pytest.mark.parametrize("bad_line, message", [
    ("6.jpg 1 2 3", "expected 9 fields"),
    ("6.jpg 1 2 3 4 5 6 7 x", "non-numeric"),
    ("6.jpg 1 2 3 4 5 6 7 -1", "non-negative"),
    ("1.jpg 1 2 3 4 5 6 7 8", "listed twice"),
    ("../escape.jpg 1 2 3 4 5 6 7 8", "escapes"),
    ("/etc/passwd 1 2 3 4 5 6 7 8", "escapes"),
])
def test_ldl_reader_names_file_and_line_of_a_bad_row(tmp_path, bad_line, message):
    ldl_fixture(tmp_path, MIKELS.classes)
    gt = tmp_path / "ground_truth.txt"
    gt.write_text(gt.read_text() + bad_line + "\n")
    with pytest.raises(LabelFileError, match=message) as info:
        load_dataset(f"flickr_ldl={tmp_path}")
    assert info.value.line == 7 and info.value.file == str(gt)


def test_ldl_reader_tolerates_bom_crlf_blank_lines_and_skips_zero_votes(tmp_path):
    ldl_fixture(tmp_path, MIKELS.classes)
    gt = tmp_path / "ground_truth.txt"
    text = gt.read_text().replace("\n", "\r\n\r\n") + "7.jpg 0 0 0 0 0 0 0 0\r\n"
    gt.write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = load_dataset(f"flickr_ldl={tmp_path}")
    assert len(ds) == 4 and ds.skipped["all-zero votes"] == 1


def test_ldl_reader_rejects_unknown_class_in_header(tmp_path):
    ldl_fixture(tmp_path, MIKELS.classes)
    gt = tmp_path / "ground_truth.txt"
    gt.write_text(gt.read_text().replace("Awe", "Joy", 1))
    with pytest.raises(LabelFileError, match="unknown class"):
        load_dataset(f"flickr_ldl={tmp_path}")


def test_emotion6_reader(tmp_path):
    header = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[prob. {c}]" for c in EMOTION6.classes)
    rows = ["disgust/1.jpg\t2.5\t3.8\t0.133333\t0.7\t0\t0.0666667\t0.1\t0\t0",
            "joy/2.jpg\t7\t5\t0\t0\t0\t0.3\t0\t0.3\t0.4",
            "joy/3.jpg\t7\t5\t0\t0\t0\t0.5\t0\t0.5\t0"]
    (tmp_path / "ground_truth.txt").write_text("\n".join([header] + rows) + "\n")
    for r in rows:
        write_image(tmp_path / "images" / r.split("\t")[0])
    ds = load_dataset(f"emotion6={tmp_path}")
    assert ds.taxonomy is EMOTION6
    assert ds.labels.tolist() == [EMOTION6.index("disgust"), EMOTION6.index("neutral"), EMOTION6.index("joy")]
    assert ds.ties == 1  # joy/surprise tie goes to joy, listed first
    assert ds.samples[0].distribution.sum() == pytest.approx(1.0)
    assert ds.polarities.tolist() == [0, -1, 1]


def test_twitter1_reader_agreement_levels(tmp_path):
    (tmp_path / "ground_truth").mkdir()
    (tmp_path / "ground_truth" / "twitter_three_agrees.txt").write_text("a.jpg 1\nb.jpg 0\nc.jpg 1\n")
    (tmp_path / "ground_truth" / "twitter_five_agrees.txt").write_text("a.jpg 1\n")
    for n in "ab":
        write_image(tmp_path / "images" / f"{n}.jpg")
    ds = load_dataset(f"twitter1={tmp_path}")
    assert ds.taxonomy is POLARITY and ds.labels.tolist() == [1, 0] and ds.missing == ["c.jpg"]
    assert len(load_dataset(f"twitter1={tmp_path}:agree=five")) == 1
    with pytest.raises(ValueError, match="agree"):
        load_dataset(f"twitter1={tmp_path}:agree=two")


def test_fi_reader_with_votes(tmp_path):
    for emotion in ("amusement", "Fear", "sadness"):
        for i in range(2):
            write_image(tmp_path / emotion / f"{emotion.lower()}_{i}.jpg")
    (tmp_path / "other").mkdir()
    ds = load_dataset(f"fi={tmp_path}")
    assert len(ds) == 6 and sorted(set(ds.labels.tolist())) == [0, 6, 7]
    assert not ds.has_distribution
    (tmp_path / "votes.txt").write_text(
        "name " + " ".join(MIKELS.classes) + "\n"
        + "amusement_0.jpg 3 0 1 0 0 0 0 1\nfear_0.jpg 0 0 0 0 0 0 5 0\nfear_1.jpg 0 0 0 0 0 0 4 1\n"
        + "sadness_0.jpg 0 0 0 0 0 0 0 5\nsadness_1.jpg 0 0 0 0 0 0 0 0\n")
    ds = load_dataset(f"fi={tmp_path}:votes=votes.txt")
    assert len(ds) == 4 and ds.skipped == {"no votes": 1, "all-zero votes": 1}
    assert ds.samples[0].distribution[0] == pytest.approx(0.6)


def test_emotionroi_reader_with_maps_and_official_split(tmp_path):
    for emotion in EMOTIONROI.classes:
        for i in (1, 2):
            write_image(tmp_path / "images" / emotion / f"{i}.jpg")
    write_image(tmp_path / "ground_truth" / "joy" / "1.jpg", color=(255, 255, 255))
    split = tmp_path / "training_testing_split"
    split.mkdir()
    (split / "training.txt").write_text("\n".join(f"{e}/1.jpg" for e in EMOTIONROI.classes) + "\n")
    (split / "testing.txt").write_text("\n".join(f"images/{e}/2.jpg" for e in EMOTIONROI.classes) + "\nanger/9.jpg\n")
    ds = load_dataset(f"emotionroi={tmp_path}")
    assert len(ds) == 12 and ds.taxonomy is EMOTIONROI
    joy1 = next(s for s in ds.samples if s.path.parent.name == "joy" and s.path.name == "1.jpg")
    assert joy1.region_map == tmp_path / "ground_truth" / "joy" / "1.jpg" and joy1.polarity == 1
    assert sum(s.region_map is not None for s in ds.samples) == 1
    assert len(ds.official_split["train"]) == 6 and len(ds.official_split["test"]) == 6
    assert ds.missing == ["anger/9.jpg"]
    assert all(ds.samples[i].path.name == "2.jpg" for i in ds.official_split["test"])
    assert ds.parts_found() == {"stimuli maps": "1 of 12 images", "official split": "train 6, test 6"}


def test_emotionroi_from_emotion6s_folders_says_what_it_lacks_and_runs_its_protocols(tmp_path):
    """EmotionROI's images are Emotion6's six folders: without stimuli maps and the official split, `datasets
    info` says so, and 5-fold polarity with retrieval runs on it."""
    import json

    from typer.testing import CliRunner

    from helpers import TINY_BACKBONE
    from emolens.cli import app

    for k, emotion in enumerate(EMOTIONROI.classes):
        for i in range(10):
            write_image(tmp_path / "emotion6" / "images" / emotion / f"{i}.jpg", seed=10 * k + i)
    spec = f"emotionroi={tmp_path / 'emotion6'}"
    assert load_dataset(spec).parts_found() == {"stimuli maps": "none (ground_truth/ absent)",
                                                 "official split": "none (training_testing_split/ absent)"}
    runner = CliRunner(env={"COLUMNS": "200"})
    info = runner.invoke(app, ["datasets", "info", spec])
    assert info.exit_code == 0 and "stimuli maps: none" in info.output and "official split: none" in info.output
    assert "polarity: 20 positive, 40 negative" in info.output
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "--data", spec, "--task", "polarity", "--folds", "5", "--epochs", "1",
                                 "--freeze-backbone", "--retrieval", "--models", "global", "--out", str(out),
                                 "--backbone", TINY_BACKBONE, "--backbone-weights", "none", "--workers", "0"])
    assert result.exit_code == 0, result.output
    folds = json.loads((out / "results.json").read_text())["models"]["global"]["folds"]
    assert len(folds) == 5 and sum(f["n"] for f in folds) == 60 and all(0 <= f["map2"] <= 1 for f in folds)


def test_artphoto_reader(tmp_path):
    for name in ("amusement_1.jpg", "sad_22.jpg", "Anger_3.JPG", "readme.jpg"):
        write_image(tmp_path / "sub" / name)
    ds = load_dataset(f"artphoto={tmp_path}")
    assert sorted(ds.labels.tolist()) == [0, 4, 7]
    assert ds.skipped["file name has no emotion prefix"] == 1


def test_abstract_reader(tmp_path):
    header = "'ImageName','Amusement','Anger','Awe','Content','Disgust','Excitement','Fear','Sad'"
    rows = ["'abstr_1.jpg',1,0,0,5,0,0,0,0", "'abstr_2.jpg',0,0,0,0,0,0,3,1", "'abstr_3.jpg',0,0,0,0,0,0,0,0",
            "'abstr_4.jpg',1,1,1,1,1,1,1,1"]
    (tmp_path / "ABSTRACT_groundTruth.csv").write_text("\n".join([header] + rows) + "\n")
    for i in (1, 2, 3):
        write_image(tmp_path / "testImages_abstract" / f"abstr_{i}.jpg")
    ds = load_dataset(f"abstract={tmp_path}")
    assert ds.labels.tolist() == [MIKELS.index("contentment"), MIKELS.index("fear")]
    assert ds.skipped["all-zero votes"] == 1 and ds.missing == ["abstr_4.jpg"]
    assert ds.samples[1].distribution[MIKELS.index("sadness")] == pytest.approx(0.25)


def test_folder_reader_recognises_or_makes_a_taxonomy(tmp_path):
    for c in ("negative", "positive"):
        write_image(tmp_path / "pol" / c / "x.png")
    assert load_dataset(f"folder={tmp_path / 'pol'}").taxonomy is POLARITY
    for c in ("cats", "dogs"):
        write_image(tmp_path / "pets" / c / "x.png")
    ds = load_dataset(f"folder={tmp_path / 'pets'}")
    assert ds.taxonomy.classes == ("cats", "dogs") and ds.polarities.tolist() == [-1, -1]
    for c in ("awe", "fear"):
        write_image(tmp_path / "m" / c / "x.png")
    ds = load_dataset(f"folder={tmp_path / 'm'}:taxonomy=mikels")
    assert ds.taxonomy is MIKELS and ds.labels.tolist() == [1, 6]


def test_csv_reader_labels_and_distributions(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,awe\nb.png,Sad\nc.png,fear\n")
    ds = load_dataset(f"csv={tmp_path}:taxonomy=mikels")
    assert ds.labels.tolist() == [1, 7] and ds.missing == ["c.png"]
    (tmp_path / "d.csv").write_text("path,positive,negative\na.png,0.2,0.8\nb.png,3,1\n")
    ds = load_dataset(f"csv={tmp_path}:file=d.csv")
    assert ds.taxonomy is POLARITY and ds.labels.tolist() == [0, 1]
    np.testing.assert_allclose(ds.samples[1].distribution, [0.25, 0.75])
    (tmp_path / "e.csv").write_text("path,label\na.png,joy\n")
    with pytest.raises(LabelFileError, match="unknown class"):
        load_dataset(f"csv={tmp_path}:file=e.csv,taxonomy=mikels")
    (tmp_path / "f.csv").write_text("file,label\na.png,awe\n")
    with pytest.raises(LabelFileError, match="path"):
        load_dataset(f"csv={tmp_path}:file=f.csv")


@pytest.mark.shared_data
def test_real_flickr_ldl(shared_data):
    ds = load_dataset(f"flickr_ldl={shared_data / 'flickr_ldl'}")
    assert len(ds) == 1050 and len(ds.missing) == 10100
    assert ds.class_counts() == {"amusement": 126, "awe": 172, "contentment": 488, "excitement": 81,
                                 "anger": 12, "disgust": 44, "fear": 59, "sadness": 68}
    assert (ds.polarities == 1).sum() == 867 and (ds.polarities == 0).sum() == 183
    np.testing.assert_allclose(ds.distributions.sum(1), 1.0, rtol=1e-5)


@pytest.mark.shared_data
def test_real_emotion6(shared_data):
    ds = load_dataset(f"emotion6={shared_data / 'emotion6'}")
    assert len(ds) == 1980 and not ds.missing and ds.taxonomy.num_classes == 7
    np.testing.assert_allclose(ds.distributions.sum(1), 1.0, rtol=1e-5)


def test_a_limit_keeps_the_first_images_of_each_class_in_turn(tmp_path):
    from helpers import make_ldl_dataset

    spec = make_ldl_dataset(tmp_path, per_class=5)  # 4 classes, 5 images each, class by class in the file
    full = load_dataset(spec)
    small = load_dataset(spec + ":limit=6")
    assert len(small) == 6 and small.spec == spec + ":limit=6"
    assert sorted(small.class_counts().values()) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert [s.path.name for s in small.samples] == [full.samples[i].path.name for i in (0, 5, 10, 15, 1, 6)]
    np.testing.assert_allclose(small.distributions, full.distributions[[0, 5, 10, 15, 1, 6]])
    with pytest.raises(ValueError, match="limit"):
        load_dataset(spec + ":limit=zero")


def test_train_with_limit_uses_that_many_images_and_evaluate_reads_the_same(tmp_path):
    import json

    from typer.testing import CliRunner

    from helpers import TINY_BACKBONE, make_ldl_dataset
    from emolens.cli import app

    spec = make_ldl_dataset(tmp_path / "data", per_class=10)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--model", "global", "--data", spec, "--out", str(tmp_path / "run"), "--limit",
                                 "20", "--epochs", "1", "--backbone", TINY_BACKBONE, "--backbone-weights", "none",
                                 "--workers", "0", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    protocol = json.loads((tmp_path / "run" / "protocol.json").read_text())
    fold = protocol["folds"][0]
    assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == 20
    assert runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--workers", "0"]).exit_code == 0


def test_emotion6_valence_and_arousal_on_the_common_scale(tmp_path):
    header = "[image_filename]\t[arousal]\t[valence]\t" + "\t".join(f"[prob. {c}]" for c in EMOTION6.classes)
    rows = ["a/1.jpg\t1\t9\t0\t0\t0\t1\t0\t0\t0", "a/2.jpg\t5\t3\t1\t0\t0\t0\t0\t0\t0"]  # arousal before valence
    (tmp_path / "ground_truth.txt").write_text("\n".join([header] + rows) + "\n")
    for r in rows:
        write_image(tmp_path / "images" / r.split("\t")[0])
    ds = load_dataset(f"emotion6={tmp_path}")
    np.testing.assert_allclose(ds.affect, [[1.0, -1.0], [-0.5, 0.0]])  # (valence, arousal): 9 -> 1, 1 -> -1, 5 -> 0
    np.testing.assert_allclose(ds.affect_scale.from_common(ds.affect), [[9, 1], [3, 5]])
    (tmp_path / "ground_truth.txt").write_text("\n".join([header, rows[0].replace("\t9\t", "\t9.5\t", 1)]) + "\n")
    with pytest.raises(LabelFileError, match="1-9"):
        load_dataset(f"emotion6={tmp_path}")


def write_oasis(root, themes, ratings):
    """OASIS.csv as released: CR line endings, no final line break, an empty first header."""
    lines = [",Theme,Category,Source,Valence_mean,Valence_SD,Valence_N,Arousal_mean,Arousal_SD,Arousal_N"]
    lines += [f"I{i + 1},{theme},Object,Pixabay,{v},1.0,100,{a},1.0,100" for i, (theme, (v, a)) in enumerate(zip(themes, ratings))]
    (root / "OASIS.csv").write_bytes("\r".join(lines).encode())


def test_oasis_reader_reads_cr_lines_strips_themes_and_counts_missing_images(tmp_path):
    write_oasis(tmp_path, ["Acorns 1", "Crosswalk 1 ", "Lake 2", "Dog 3"], [(4.5, 2.0), (1.0, 7.0), (7.0, 4.0), (4.0, 3.0)])
    for name in ("Acorns 1", "Crosswalk 1", "Dog 3"):  # Lake 2 is listed but absent
        write_image(tmp_path / "images" / f"{name}.jpg")
    ds = load_dataset(f"oasis={tmp_path}")
    assert [s.path.name for s in ds.samples] == ["Acorns 1.jpg", "Crosswalk 1.jpg", "Dog 3.jpg"]
    assert ds.missing == ["Lake 2"]
    assert ds.taxonomy is POLARITY and ds.labels.tolist() == [1, 0, 0]  # valence above the midpoint 4: positive
    np.testing.assert_allclose(ds.affect_scale.from_common(ds.affect), [[4.5, 2.0], [1.0, 7.0], [4.0, 3.0]], atol=1e-6)
    np.testing.assert_allclose(ds.affect[1], [-1.0, 1.0])


def test_oasis_reader_refuses_ratings_off_the_scale_naming_the_line(tmp_path):
    write_oasis(tmp_path, ["A", "B"], [(4.0, 3.0), (7.5, 3.0)])
    for name in "AB":
        write_image(tmp_path / "images" / f"{name}.jpg")
    with pytest.raises(LabelFileError, match=r"OASIS.csv:3: ratings must lie in 1-7"):
        load_dataset(f"oasis={tmp_path}")


@pytest.mark.shared_data
def test_real_oasis(shared_data):
    ds = load_dataset(f"oasis={shared_data / 'oasis'}")
    assert len(ds) == 900 and not ds.missing
    ratings = ds.affect_scale.from_common(ds.affect)
    assert ratings[:, 0].mean() == pytest.approx(4.33, abs=0.01) and ratings[:, 1].mean() == pytest.approx(3.67, abs=0.01)
    assert ratings[:, 0].min() == pytest.approx(1.11, abs=0.01) and ratings[:, 1].max() == pytest.approx(5.72, abs=0.01)
