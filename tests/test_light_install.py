"""The core install (no PyTorch): predict, index, search and serve run the default model, shipped as ONNX,
with the same results as the PyTorch model; the commands that need PyTorch say what to install."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import png, write_image
from emolens.identity import model_identity
from emolens.predict import Predictor
from emolens.runtime import OnnxModel, packaged_default_onnx
from emolens.weights import load_model

WITHOUT_TORCH = Path(__file__).with_name("without_torch.py")


def without_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WITHOUT_TORCH), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_packaged_onnx_model_is_the_default_model(tmp_path):
    """Same weights identity, and the same distribution, valence and arousal as the PyTorch default."""
    torch_model = load_model("default")
    onnx = OnnxModel(packaged_default_onnx())
    assert onnx.identity.digest == model_identity(torch_model).digest
    photos = [write_image(tmp_path / f"{i}.png", seed=i, size=(300, 200)) for i in range(4)]
    by_torch, _ = Predictor(torch_model, backend="torch").predict(photos)
    by_onnx, _ = Predictor().predict(photos)
    assert Predictor().backend == "onnx"
    for a, b in zip(by_torch, by_onnx):
        np.testing.assert_allclose([a.distribution[c] for c in a.distribution],
                                   [b.distribution[c] for c in a.distribution], atol=1e-4)
        assert abs(a.valence - b.valence) < 1e-4 and abs(a.arousal - b.arousal) < 1e-4


def test_predict_index_search_and_serve_run_without_pytorch(tmp_path):
    for i in range(3):
        write_image(tmp_path / "photos" / f"{i}.png", seed=i, size=(120, 90))
    demo = without_torch("predict", "--demo", "--format", "json", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    shown = json.loads(demo.stdout)["predictions"]
    here, _ = Predictor().predict([p["source"] for p in shown])  # in this process, PyTorch installed
    assert [p["distribution"] for p in shown] == pytest.approx([p.distribution for p in here], abs=1e-6)

    index = without_torch("index", "photos", "--db", "db", cwd=tmp_path)
    assert index.returncode == 0, index.stderr
    search = without_torch("search", "photos/0.png", "--db", "db", "-k", "2", "--format", "json", cwd=tmp_path)
    assert search.returncode == 0 and len(json.loads(search.stdout)["hits"]) == 2, search.stderr

    serve = without_torch("--python", f"""
import sys
from fastapi.testclient import TestClient
from emolens.server import create_app
client = TestClient(create_app(None, "db"), base_url="http://127.0.0.1")
assert client.get("/api/health").json()["index"] == 3
found = client.post("/api/predict", files=[("files", ("a.png", {png(7)!r}, "image/png"))])
assert found.status_code == 200, found.text
maps = client.post("/api/predict?heatmaps=true", files=[("files", ("a.png", {png(7)!r}, "image/png"))])
assert maps.status_code == 501 and "emolens[torch]" in maps.json()["error"], maps.text
assert "torch" not in sys.modules
print("served")
""", cwd=tmp_path)
    assert serve.returncode == 0 and "served" in serve.stdout, serve.stderr


@pytest.mark.parametrize("args", [["train", "--model", "global", "--data", "flickr_ldl=x", "--out", "run"],
                                  ["evaluate", "run"], ["benchmark", "--data", "flickr_ldl=x", "--models", "global"],
                                  ["explain", "photos", "--out", "why"], ["export", "--onnx", "m.onnx"],
                                  ["list-models"], ["datasets", "info", "flickr_ldl=x"],
                                  ["predict", "--demo", "--backend", "torch"]])
def test_commands_that_need_pytorch_say_what_to_install(tmp_path, args):
    done = without_torch(*args, cwd=tmp_path)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in said, said
    assert "pip install 'emolens[torch]'" in said and "download.pytorch.org/whl/cpu" in said, said
