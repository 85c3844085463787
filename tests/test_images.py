from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import bomb_png, make_bad_images, make_good_images, make_odd_paths
from emolens.images import ImageLoadError, load_image, scan_images


def test_every_bad_file_raises_the_one_error_type_with_path_and_reason(tmp_path):
    cases = make_bad_images(tmp_path)
    for name, word in cases.items():
        with pytest.raises(ImageLoadError) as info:
            load_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
        assert word in info.value.reason, (name, info.value.reason)
        assert str(tmp_path / name) in str(info.value)


def test_awkward_modes_load_as_rgb_with_the_right_size(tmp_path):
    sizes = make_good_images(tmp_path)
    for name, size in sizes.items():
        img = load_image(tmp_path / name)
        assert img.mode == "RGB", name
        assert img.size == size, name


def test_pixel_values_survive_mode_conversion(tmp_path):
    make_good_images(tmp_path)
    assert np.asarray(load_image(tmp_path / "gray16.png"))[0, 0].tolist() == [255, 255, 255]  # 65535 -> white, not clipped noise
    assert np.asarray(load_image(tmp_path / "palette_transparent.png"))[0, 0].tolist() == [255, 255, 255]  # transparent on white
    assert np.asarray(load_image(tmp_path / "animated.gif"))[0, 0].tolist() == [255, 0, 0]  # first frame
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=255 is red


def test_sixteen_bit_mid_grey_is_rescaled(tmp_path):
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0, 0] == 128


def test_bytes_and_pil_inputs(tmp_path):
    make_good_images(tmp_path)
    data = (tmp_path / "rgb.jpg").read_bytes()
    assert load_image(data).size == (32, 24)
    assert load_image(Image.new("LA", (3, 3))).mode == "RGB"
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(bomb_png())


def test_pixel_limit_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "a.png", max_pixels=9_999)
    assert load_image(tmp_path / "a.png", max_pixels=10_000).size == (100, 100)


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot access"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_scan_reports_bad_files_and_goes_on(tmp_path):
    good = make_good_images(tmp_path / "good")
    bad = make_bad_images(tmp_path / "bad")
    odd = make_odd_paths(tmp_path / "odd")
    (tmp_path / "notes.txt").write_text("not an image extension, not scanned")
    scan = scan_images([tmp_path, tmp_path / "missing-folder"])
    assert [e.path for e in scan.errors] == [str(tmp_path / "missing-folder")]
    names = {p.name for p in scan.files}
    assert names == set(good) | set(bad) | set(odd)
    loaded, errors = 0, []
    for p in scan.files:
        try:
            load_image(p)
            loaded += 1
        except ImageLoadError as e:
            errors.append(e)
    assert loaded == len(good)
    reasons = {Path(e.path).name: e.reason for e in errors}
    assert set(reasons) == set(bad) | set(odd)
    for name, word in {**bad, **odd}.items():
        assert word in reasons[name]


def test_scan_order_is_stable_and_deduplicated(tmp_path):
    for n in ("b.png", "a.png", "sub/c.png"):
        p = tmp_path / n
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (2, 2)).save(p)
    scan = scan_images([tmp_path, tmp_path / "a.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in scan.files] == ["a.png", "b.png", "sub/c.png"]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("name,payload", [("photo.jpg", EPS), ("scan.png", b"%!PS-Adobe-3.0\n/x 1 def\nshowpage\n"),
                                          ("doc.jpg", b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")])
def test_postscript_and_pdf_are_refused_before_any_delegate_runs(tmp_path, monkeypatch, name, payload):
    """Whether or not Ghostscript is installed: the file never reaches Pillow's EPS plugin."""
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("Ghostscript was asked to render an uploaded file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)  # as on a machine that has it
    (tmp_path / name).write_bytes(payload)
    for source in (tmp_path / name, payload):
        with pytest.raises(ImageLoadError, match="accepted format"):
            load_image(source)


def test_an_opened_image_of_another_format_is_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.ppm")
    with Image.open(tmp_path / "x.ppm") as opened:
        with pytest.raises(ImageLoadError, match="PPM images are not accepted"):
            load_image(opened)
    assert load_image(Image.new("RGB", (8, 8))).size == (8, 8)  # an image made in memory has no format


def test_files_that_would_stall_a_read_are_reported_not_read(tmp_path):
    """A FIFO or a link to a device named like a photo would block or never end; each is a reported failure."""
    import os
    import threading

    from emolens.predict import Predictor
    from helpers import tiny_model

    os.mkfifo(tmp_path / "stall.jpg")
    (tmp_path / "endless.png").symlink_to("/dev/zero")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "fine.png")
    outcome = {}

    def run():
        outcome["result"] = Predictor(tiny_model(), workers=2).predict(scan_images([tmp_path]).files)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "prediction hung on a file that never ends"
    good, bad = outcome["result"]
    assert [Path(p.source).name for p in good] == ["fine.png"]
    assert {Path(e.source).name: e.reason for e in bad} == {"stall.jpg": "not a regular file",
                                                          "endless.png": "not a regular file"}


def smooth_photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_the_view(tmp_path):
    smooth_photo(2048, 1536).save(tmp_path / "big.jpg", quality=92)
    smooth_photo(2048, 1536).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg").size == (2048, 1536)  # no side asked for: every pixel
    assert load_image(tmp_path / "big.jpg", min_side=256).size == (512, 384)  # 1/4 scale; 1/8 would be 192 < 256
    assert load_image(tmp_path / "big.jpg", min_side=768).size == (1024, 768)  # exactly half
    assert load_image(tmp_path / "big.jpg", min_side=769).size == (2048, 1536)  # half would be too short
    assert load_image(tmp_path / "big.png", min_side=256).size == (2048, 1536)  # only JPEG decoders scale
    data = (tmp_path / "big.jpg").read_bytes()
    assert load_image(data, min_side=256).size == (512, 384)
    with pytest.raises(ImageLoadError, match="truncated"):  # a reduced decode still reads every byte
        load_image(data[: len(data) // 2], min_side=256)


def test_a_reduced_jpeg_gives_the_models_view_of_the_full_decode(tmp_path):
    from emolens.preprocessing import Preprocessing

    pre = Preprocessing(size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    smooth_photo(3000, 2000).save(tmp_path / "big.jpg", quality=92)
    reduced, full = pre(pre.load(tmp_path / "big.jpg")), pre(load_image(tmp_path / "big.jpg"))
    assert pre.load(tmp_path / "big.jpg").size == (750, 500)  # 1/4 scale: 1/8 would be 250 < 256
    assert np.abs(reduced - full).mean() < 0.005 and np.abs(reduced - full).max() < 0.05  # on a [-1, 1] scale


def test_a_reduced_jpeg_still_takes_its_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    smooth_photo(2048, 1024).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg", min_side=256).size == (256, 512)


def mpo_bytes(first: Image.Image, second: Image.Image) -> bytes:
    """A multi-picture JPEG (MPO) as phones and cameras write them: the photo, then another JPEG after it."""
    import io

    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


def test_an_mpo_jpeg_is_read_as_its_first_frame(tmp_path):
    from emolens.predict import Predictor
    from helpers import tiny_model

    small = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((800, 600), Image.BICUBIC)  # smooth, as photos are
    data = mpo_bytes(photo, Image.new("RGB", (160, 120), (0, 0, 255)))
    assert Image.open(__import__("io").BytesIO(data)).format == "MPO"
    (tmp_path / "phone.jpg").write_bytes(data)
    photo.save(tmp_path / "plain.jpg", quality=75)  # the same photo as a plain JPEG
    for source in (tmp_path / "phone.jpg", data):
        img = load_image(source)
        assert img.size == (800, 600)
        assert np.abs(np.asarray(img, float) - np.asarray(photo, float)).mean() < 5  # the photo, not the preview
    assert load_image(tmp_path / "phone.jpg", min_side=200).size == (400, 300)  # reduced decode, as for JPEG
    good, bad = Predictor(tiny_model()).predict([tmp_path / "phone.jpg"])
    assert not bad and good[0].source == str(tmp_path / "phone.jpg")


def test_phone_and_camera_formats_are_read_and_scanned(tmp_path):
    """HEIC (an iPhone's default, its orientation applied by the decoder), AVIF, and JPEGs named .jfif/.jpe."""
    import io

    from PIL import ImageOps

    from emolens.cli import app
    from typer.testing import CliRunner

    small = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((80, 60), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    photo.save(tmp_path / "iphone.heic", "HEIF", quality=95, exif=exif.tobytes())
    photo.save(tmp_path / "pixel.avif", "AVIF", quality=95, exif=exif.tobytes())
    photo.save(tmp_path / "old.jfif", "JPEG", quality=95)
    photo.save(tmp_path / "older.jpe", "JPEG", quality=95)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "clip.mov").write_bytes(b"\0" * 64)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_jpeg(photo, exif))))).astype(float)
    for name in ("iphone.heic", "pixel.avif"):
        img = load_image(tmp_path / name)
        assert img.size == (60, 80), name  # turned upright, once
        assert np.abs(np.asarray(img, float) - upright).mean() < 8, name
        assert load_image((tmp_path / name).read_bytes()).size == (60, 80)  # an upload
    scan = scan_images([tmp_path])
    assert sorted(p.name for p in scan.files) == ["iphone.heic", "old.jfif", "older.jpe", "pixel.avif"]
    assert {Path(e.path).name: e.reason for e in scan.skipped} == {
        "clip.mov": "not an image file name (.mov); name the file itself to read it anyway",
        "notes.txt": "not an image file name (.txt); name the file itself to read it anyway"}
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["predict", str(tmp_path), "--format", "json",
                                                           "--workers", "0"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "skipped 2 file(s)" in said and "clip.mov" in said and "notes.txt" in said
    import json

    payload = json.loads(result.stdout)
    assert len(payload["predictions"]) == 4 and {Path(e["source"]).name for e in payload["skipped"]} == {
        "clip.mov", "notes.txt"}


def _jpeg(img: Image.Image, exif: Image.Exif) -> bytes:
    import io

    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()
