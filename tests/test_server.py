import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png, tiny_model
from emolens.predict import Predictor
from emolens.retrieval.index import AffectiveIndex, AffectiveIndexError
from emolens.runtime import export_onnx
from emolens.server import Limits, create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    export_onnx(tiny_model().eval(), folder / "m.onnx")
    for i in range(6):
        (folder / "gallery").mkdir(exist_ok=True)
        (folder / "gallery" / f"{i}.png").write_bytes(png(i))
    index = AffectiveIndex(folder / "db", create=True)
    index.update([folder / "gallery"], Predictor(folder / "m.onnx", keep=("embedding",)))
    index.close()
    app = create_app(folder / "m.onnx", folder / "db", Limits(max_upload_bytes=200_000, max_files=3,
                                                              max_pixels=1_000_000))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False), folder


def test_health_models_and_openapi(served):
    client, _ = served
    assert client.get("/api/health").json() == {"status": "ok", "model": "onnx", "index": 6}
    models = client.get("/api/models").json()
    assert len(models["classes"]) == 8 and models["backend"] == "onnx"
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_one_and_many(served):
    client, _ = served
    r = client.post("/api/predict", files=[("files", ("a.png", png(1), "image/png")),
                                           ("files", ("b.png", png(2), "image/png"))])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "b.png"]
    assert sum(results[0]["distribution"].values()) == pytest.approx(1, abs=1e-4)
    assert results[0]["emotion"] in results[0]["distribution"]


@pytest.mark.parametrize("payload, status, words", [
    (b"hello, not an image", 400, "x.png"),
    (png(3)[:60], 400, "x.png"),
    (b"", 400, "x.png"),
    (b"\x00" * 300_000, 413, "larger"),
])
def test_bad_uploads_get_json_errors(served, payload, status, words):
    client, _ = served
    r = client.post("/api/predict", files=[("files", ("x.png", payload, "image/png"))])
    assert r.status_code == status and words in r.json()["error"]
    assert client.get("/api/health").status_code == 200  # the server keeps serving


def test_too_many_files_and_too_many_pixels(served):
    client, _ = served
    r = client.post("/api/predict", files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(4)])
    assert r.status_code == 413 and "too many" in r.json()["error"]
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), (9, 9, 9)).save(big, "PNG")  # small file, 1.2 M pixels
    r = client.post("/api/predict", files=[("files", ("big.png", big.getvalue(), "image/png"))])
    assert r.status_code == 400 and "pixels" in r.json()["error"]


def test_search_by_image_and_by_emotion_and_images_by_id(served):
    client, folder = served
    r = client.post("/api/search?k=3", files={"file": ("q.png", png(4), "image/png")})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert len(hits) == 3 and "4.png" not in [h["name"] for h in hits]  # the uploaded file itself is left out
    again = io.BytesIO()
    Image.open(io.BytesIO(png(4))).save(again, "PNG", compress_level=1)  # the same pixels, other bytes
    hits = client.post("/api/search?k=3", files={"file": ("q.png", again.getvalue(), "image/png")}).json()["hits"]
    assert len(hits) == 3 and hits[0]["name"] == "4.png" and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    image = client.get(hits[0]["url"])
    assert image.status_code == 200 and image.content == (folder / "gallery" / "4.png").read_bytes()
    by_emotion = client.get("/api/search", params={"emotion": "awe", "k": 6}).json()["hits"]
    p = [h["distribution"]["awe"] for h in by_emotion]
    assert p == sorted(p, reverse=True) and len(p) == 6
    assert client.get("/api/search", params={"emotion": "joy"}).status_code == 400
    assert client.get("/api/images/999").status_code == 404
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


def test_the_api_lists_its_endpoints_and_the_collections_points(served):
    client, _ = served
    listed = client.get("/api").json()
    assert {("GET", "/api/health"), ("POST", "/api/predict"), ("GET", "/api/points"), ("POST", "/api/search")} <= {
        (e["method"], e["path"]) for e in listed["endpoints"]}
    assert client.get("/favicon.ico").headers["content-type"].startswith("image/svg+xml")
    empty = client.post("/api/predict", files=[("files", ("a.png", b"", "image/png"))])
    assert empty.status_code == 400 and empty.json()["error"] == "a.png: empty file (0 bytes)"  # the CLI's words


def test_the_page_and_its_assets_are_local(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "emolens" in page.text
    for asset in ("app.js", "style.css"):
        r = client.get(f"/{asset}")
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from the internet
    assert "https://" not in page.text and "http://" not in page.text


def test_heatmaps_need_a_pytorch_model(served, tmp_path):
    client, _ = served
    r = client.post("/api/predict?heatmaps=true", files=[("files", ("a.png", png(1), "image/png"))])
    assert r.status_code == 400 and "PyTorch" in r.json()["error"]
    from emolens.weights import save_model

    save_model(tiny_model(), tmp_path / "m.safetensors")
    torch_client = TestClient(create_app(tmp_path / "m.safetensors"), base_url="http://localhost", raise_server_exceptions=False)
    r = torch_client.post("/api/predict?heatmaps=true", files=[("files", ("a.png", png(1), "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["heatmap"].startswith("data:image/png;base64,")
    assert torch_client.get("/api/health").json()["index"] is None
    assert torch_client.get("/api/search", params={"emotion": "awe"}).status_code == 404


def test_a_server_whose_weights_file_changed_refuses_heat_maps(tmp_path):
    from emolens.weights import save_model

    save_model(tiny_model(), tmp_path / "other.safetensors")
    changed = TestClient(create_app(tmp_path / "other.safetensors"), base_url="http://localhost",
                         raise_server_exceptions=False)
    save_model(tiny_model(), tmp_path / "other.safetensors")  # new random weights under the served name
    r = changed.post("/api/predict?heatmaps=true", files=[("files", ("a.png", png(1), "image/png"))])
    assert r.status_code == 409 and "restart" in r.json()["error"]


def test_an_int8_server_draws_heat_maps_from_the_fp32_weights_beside_its_int8_numbers(tmp_path):
    from helpers import write_image

    photo = write_image(tmp_path / "a.jpg", seed=3, size=(120, 90))
    client = TestClient(create_app(None, precision="int8"), base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.post("/api/predict?heatmaps=true", files=[("files", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    answer = r.json()["results"][0]
    assert answer["heatmap"].startswith("data:image/png;base64,")
    expected = Predictor(None, precision="int8").predict([photo])[0][0]
    assert answer["distribution"] == pytest.approx(expected.distribution, abs=1e-6)


def test_concurrent_requests_share_model_calls():
    import asyncio

    from emolens.server import PredictBatcher

    class Counting:
        images_per_call = 8

        def predict_prepared(self, names, inputs):
            return [f"result for {i}" for i in inputs]

    batcher = PredictBatcher(Counting(), max_batch=32, wait=0.05)

    async def many():
        return await asyncio.gather(*(batcher.predict([f"r{k}a", f"r{k}b"]) for k in range(5)))

    results = asyncio.run(many())
    assert results == [[f"result for r{k}a", f"result for r{k}b"] for k in range(5)]  # each gets its own
    assert batcher.calls == 1


def test_emolens_serve_starts_and_answers(served):
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    _, folder = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "emolens", "serve", "--model", str(folder / "m.onnx"), "--db",
                             str(folder / "db"), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
            except OSError:
                time.sleep(0.2)
        assert body is not None and b'"index":6' in body
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_server_refuses_an_index_of_another_model(served):
    _, folder = served
    export_onnx(tiny_model("global:dropout=0.3").eval(), folder / "other.onnx")
    with pytest.raises(AffectiveIndexError, match="not with"):
        create_app(folder / "other.onnx", folder / "db")


def test_a_foreign_host_name_is_refused(served):
    client, _ = served
    assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/images/1", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200


def test_ids_outside_sqlites_range_are_not_found(served):
    client, _ = served
    for image_id in (2**63, -(2**63) - 1, 10**30):
        assert client.get(f"/api/images/{image_id}").status_code == 404


def test_an_indexed_file_swapped_for_a_link_to_a_secret_is_not_served(tmp_path):
    export_onnx(tiny_model().eval(), tmp_path / "m.onnx")
    (tmp_path / "gallery").mkdir()
    for i in range(2):
        (tmp_path / "gallery" / f"{i}.png").write_bytes(png(i))
    index = AffectiveIndex(tmp_path / "db", create=True)
    index.update([tmp_path / "gallery"], Predictor(tmp_path / "m.onnx", keep=("embedding",)))
    ids = {Path(index.image_path(i)).name: int(i) for i in index.vectors()[0]}
    index.close()
    client = TestClient(create_app(tmp_path / "m.onnx", tmp_path / "db"), base_url="http://127.0.0.1")
    assert client.get(f"/api/images/{ids['0.png']}").content == png(0)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(0))  # even the same bytes: it is not the file that was indexed
    (tmp_path / "gallery" / "0.png").unlink()
    (tmp_path / "gallery" / "0.png").symlink_to(secret)
    assert client.get(f"/api/images/{ids['0.png']}").status_code == 404
    other = tmp_path / "gallery" / "1.png"
    other.write_bytes(png(5))  # replaced in place: another file now
    assert client.get(f"/api/images/{ids['1.png']}").status_code == 404


def test_a_heic_upload_is_predicted(served):
    """An iPhone photo posted as it is (HEIC), as the page's file picker offers it."""
    client, _ = served
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png(3))).save(buffer, "HEIF")
    r = client.post("/api/predict", files=[("files", ("IMG_0001.HEIC", buffer.getvalue(), "image/heic"))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["filename"] == "IMG_0001.HEIC"
