"""The web page in a real browser: Debian's chromium driven by Playwright (never `playwright install`)."""

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() and os.environ.get("CI") == "true":
    raise RuntimeError("CI must run the browser test, but Debian's chromium is not installed (.ci/run installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
ARTIFACTS = Path(os.environ.get("EMOLENS_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_gallery(folder, model):
    """A server in a thread over ``model`` and an index of eight photos; yields (url, folder)."""
    import uvicorn

    from emolens.predict import Predictor
    from emolens.retrieval.index import AffectiveIndex
    from emolens.server import create_app
    from emolens.weights import save_model

    save_model(model, folder / "m.safetensors")
    rng = np.random.default_rng(0)
    for i in range(8):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        (folder / "gallery").mkdir(exist_ok=True)
        Image.fromarray(small).resize((160, 120), Image.BICUBIC).save(folder / "gallery" / f"{i}.jpg")
    index = AffectiveIndex(folder / "db", create=True)
    index.update([folder / "gallery"], Predictor(folder / "m.safetensors", keep=("embedding",)))
    index.close()
    port = free_port()
    config = uvicorn.Config(create_app(folder / "m.safetensors", folder / "db"), host="127.0.0.1", port=port,
                            log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", folder
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from helpers import tiny_model

    yield from serve_gallery(tmp_path_factory.mktemp("browser"), tiny_model())


@pytest.fixture(scope="module")
def rated_server(tmp_path_factory):
    from helpers import rated_model

    yield from serve_gallery(tmp_path_factory.mktemp("browser-rated"), rated_model())


def launch(pw):
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])


@contextmanager
def page_at(url: str):
    """A desktop-sized page of chromium at ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_the_api_docs_render_offline(server):
    """/docs draws its operations with every request kept to the server itself."""
    from playwright.sync_api import sync_playwright

    url, _ = server
    foreign = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(f"{url}/docs")
            page.wait_for_selector(".opblock", timeout=15_000)
            assert page.locator(".opblock").count() >= 5 and not foreign
        finally:
            browser.close()


def test_upload_see_bars_toggle_overlay_and_search(server):
    url, folder = server
    upload = folder / "upload.png"
    Image.open(folder / "gallery" / "3.jpg").save(upload)
    with page_at(url) as page:
        page.wait_for_selector("#chips .chip")
        page.set_input_files("#picker", str(upload))
        page.wait_for_selector(".card .bars")
        assert page.locator(".card .bar").count() == 8
        widths = page.eval_on_selector_all(".card .fill", "els => els.map(e => e.getBoundingClientRect().width)")
        assert len(widths) == 8 and all(w > 0 for w in widths)  # every bar is drawn
        image = page.locator(".card img")
        before = image.get_attribute("src")
        page.click(".overlay-toggle")
        assert image.get_attribute("src").startswith("data:image/png;base64,") and before.startswith("blob:")
        page.click("#chips .chip >> text=awe")
        page.wait_for_selector("#grid figure img")
        assert page.locator("#grid figure").count() == 8
        page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.screenshot(path=str(ARTIFACTS / "web-page-phone.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_a_tall_upload_keeps_its_shape_and_a_search_by_emotion_leads_each_caption_with_that_emotion(server):
    import httpx

    url, folder = server
    strip = folder / "strip.png"
    Image.new("RGB", (30, 1500), (200, 40, 40)).save(strip)  # 1:50, as a scanned receipt or a long screenshot
    with page_at(url) as page:
        page.wait_for_selector("#chips .chip")
        page.set_input_files("#picker", str(strip))
        page.wait_for_selector(".card .bars")
        page.wait_for_function("document.querySelector('.card img').complete")
        box = page.locator(".card img").bounding_box()
        assert box["height"] <= 420 and box["width"] <= 280
        page.click("#chips .chip >> text=sadness")
        page.wait_for_selector("#grid figure")
        captions = page.locator("#grid figcaption .top").all_inner_texts()
        assert len(captions) == 8 and all(c.startswith("sadness ") for c in captions), captions
        hits = {h["name"]: h for h in httpx.get(f"{url}/api/search", params={"emotion": "sadness", "k": 8}).json()["hits"]}
        for name, caption in zip(page.locator("#grid figcaption .name").all_inner_texts(), captions):
            hit = hits[name]
            assert caption.startswith(f"sadness {hit['distribution']['sadness']:.2f}")
            assert (f"(top: {hit['emotion']} {hit['probability']:.2f})" in caption) == (hit["emotion"] != "sadness")


def test_the_page_places_the_image_on_the_valence_arousal_plane_and_searches_by_feeling(rated_server):
    import httpx

    url, folder = rated_server
    upload = folder / "gallery" / "5.jpg"
    files = {"files": ("5.jpg", upload.read_bytes(), "image/jpeg")}
    expected = httpx.post(f"{url}/api/predict", files=files).json()["results"][0]
    gallery = httpx.get(f"{url}/api/search", params={"valence": "-1:1", "k": 8}).json()["hits"]
    target = max(gallery, key=lambda h: abs(h["valence"]))  # the indexed image farthest from neutral valence
    assert abs(target["valence"]) > 0.3
    with page_at(url) as page:
        page.wait_for_selector("#feel svg.plane")
        page.set_input_files("#picker", str(upload))
        page.wait_for_selector(".card svg.plane circle.point")
        label = page.get_attribute(".card svg.plane", "aria-label")
        assert f"valence {expected['valence']:.2f}, arousal {expected['arousal']:.2f}" in label
        # The point sits where the numbers say: x grows with valence, y falls as arousal grows.
        cx, cy = (float(page.get_attribute(".card circle.point", a)) for a in ("cx", "cy"))
        assert cx == pytest.approx(16 + (expected["valence"] + 1) / 2 * 148, abs=0.1)
        assert cy == pytest.approx(180 - (16 + (expected["arousal"] + 1) / 2 * 148), abs=0.1)

        feel = page.locator("#feel svg.plane")
        feel.scroll_into_view_if_needed()  # below the result card, as a user scrolls to it
        box = feel.bounding_box()  # a click where that image lies finds it
        x = (16 + (target["valence"] + 1) / 2 * 148) / 180
        y = (180 - (16 + (target["arousal"] + 1) / 2 * 148)) / 180
        page.mouse.click(box["x"] + box["width"] * x, box["y"] + box["height"] * y)
        page.wait_for_selector("#grid-title:has-text('Feeling near')")
        page.wait_for_selector("#grid figure")
        assert target["name"] in page.eval_on_selector_all("#grid img", "els => els.map(e => e.alt)")
        captions = page.locator("#grid figcaption").all_inner_texts()
        for caption in captions:  # every hit within 0.25 of the clicked point on both axes
            valence = float(caption.split("valence ")[1].split(",")[0])
            arousal = float(caption.split("arousal ")[1])
            assert abs(valence - target["valence"]) <= 0.26 and abs(arousal - target["arousal"]) <= 0.26
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-affect.png"), full_page=True)


@contextmanager
def phone_and_desktop(url: str):
    """Pages of chromium at ``url``: a desktop and a 390-px phone (touch, its device scale)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            yield {"desktop": browser.new_page(viewport={"width": 1100, "height": 900}),
                   "phone": browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=3,
                                             is_mobile=True, has_touch=True)}
        finally:
            browser.close()


def no_horizontal_overflow(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_page_guides_on_a_desktop_and_a_phone(rated_server):
    """Long names stay inside the cards, each upload is posted once (a bad one too) and the same file can be
    picked again, errors read as the CLI's, the plane shows the collection and where one clicked, an empty
    region says so and offers the nearest images, and a tile opens its image with its analysis."""
    import httpx

    url, folder = rated_server
    long_name = folder / ("a-photo-with-a-very-long-name-that-goes-on-and-on-without-any-break" * 2 + ".jpg")
    long_name.write_bytes((folder / "gallery" / "2.jpg").read_bytes())
    (folder / "empty.png").write_bytes(b"")
    points = httpx.get(f"{url}/api/points").json()["points"]
    assert len(points) == 8
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with phone_and_desktop(url) as pages:
        for kind, page in pages.items():
            posted = []
            page.on("request", lambda r: posted.append(r.url) if "/api/predict" in r.url else None)
            page.goto(url)
            page.wait_for_selector("#feel svg.plane circle.dot")
            assert page.locator("#feel circle.dot").count() == 8 and "8 images" in page.inner_text("#feel-note")
            for _ in range(2):  # the same file twice: two cards
                page.set_input_files("#picker", str(long_name))
                page.wait_for_function(f"document.querySelectorAll('.card .bars').length >= {_ + 1}")
            page.set_input_files("#picker", str(folder / "empty.png"))
            page.wait_for_selector(".card .error")
            assert page.inner_text(".card .error") == "empty.png: empty file (0 bytes)"
            assert len(posted) == 3, posted  # one request per upload
            assert no_horizontal_overflow(page), kind
            page.screenshot(path=str(ARTIFACTS / f"web-guide-{kind}-upload.png"), full_page=True)

            plane = page.locator("#feel svg.plane")
            plane.scroll_into_view_if_needed()
            box = plane.bounding_box()
            far = max(points, key=lambda p: p[0] + p[1])  # an empty corner: beyond the highest valence + arousal
            corner = (min(1, far[0] + 0.6), min(1, far[1] + 0.6)) if far[0] + far[1] < 0.8 else (-1, -1)
            x = (16 + (corner[0] + 1) / 2 * 148) / 180
            y = (180 - (16 + (corner[1] + 1) / 2 * 148)) / 180
            page.mouse.click(box["x"] + box["width"] * x, box["y"] + box["height"] * y)
            page.wait_for_selector("#feel circle.marker")
            page.wait_for_selector("#grid-title:has-text('No image lies within')")
            page.wait_for_selector("#grid figure")
            assert page.locator("#grid figure").count() == 8  # the nearest ones, offered instead
            names = page.locator("#grid figcaption .name").all_inner_texts()
            assert all(n.endswith(".jpg") for n in names) and page.locator("#grid figcaption .top").count() == 8
            assert no_horizontal_overflow(page), kind
            page.screenshot(path=str(ARTIFACTS / f"web-guide-{kind}-plane.png"), full_page=True)

            first = page.locator("#grid figure").first
            src = first.locator("img").get_attribute("src")
            first.click()
            page.wait_for_selector("dialog#viewer[open] img")
            assert page.locator("dialog#viewer img").get_attribute("src") == src
            assert page.locator("dialog#viewer .bar").count() == 8 and page.locator("dialog#viewer circle.point").count() == 1
            page.wait_for_function("document.querySelector('dialog#viewer img').naturalWidth > 0")
            assert no_horizontal_overflow(page), kind
            page.screenshot(path=str(ARTIFACTS / f"web-guide-{kind}-viewer.png"))
            page.click("#viewer-close")
            assert page.locator("dialog#viewer[open]").count() == 0
        assert httpx.get(f"{url}/favicon.ico").status_code == 200
