import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import write_image
from helpers import tiny_model
from emolens.cli import app
from emolens.predict import Predictor
from emolens.runtime import OnnxModel, cached_onnx_path, export_onnx, onnx_model_for
from emolens.storage import CheckpointError
from emolens.weights import save_model

runner = CliRunner()


def test_export_keeps_outputs_and_meaning(tmp_path):
    model = tiny_model(task="polarity").eval()
    _, meta = export_onnx(model, tmp_path / "m.onnx")
    onnx = OnnxModel(tmp_path / "m.onnx")
    assert onnx.taxonomy == model.taxonomy and onnx.preprocessing == model.preprocessing
    assert set(meta["outputs"]) == {"logits", "distribution", "embedding"}
    size = model.preprocessing.size
    x = torch.randn(11, 3, size, size)  # more than one runtime chunk, and a batch size never exported
    with torch.inference_mode():
        ref = model(x)
    out = onnx(x.numpy())
    for name in meta["outputs"]:
        np.testing.assert_allclose(out[name], ref[name].numpy(), atol=1e-4)


def test_onnx_and_torch_backends_agree_on_the_default_model(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", seed=i, size=(60, 45)) for i in range(3)]
    fast = Predictor(backend="onnx", workers=2)
    slow = Predictor(backend="torch", workers=0)
    assert (fast.backend, slow.backend) == ("onnx", "torch")
    for a, b in zip(fast.predict(paths)[0], slow.predict(paths)[0]):
        assert a.source == b.source and a.emotion == b.emotion
        for c, p in a.distribution.items():
            assert p == pytest.approx(b.distribution[c], abs=1e-4)


def test_export_is_cached_and_keyed_by_the_weights(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "a.safetensors")
    first = onnx_model_for(tmp_path / "a.safetensors")
    path = cached_onnx_path(tmp_path / "a.safetensors")
    stamp = path.stat().st_mtime_ns
    onnx_model_for(tmp_path / "a.safetensors")
    assert path.stat().st_mtime_ns == stamp, "a cached export must be reused, not redone"
    with torch.no_grad():
        model.classifier.bias += 1
    save_model(model, tmp_path / "a.safetensors")
    assert cached_onnx_path(tmp_path / "a.safetensors") != path
    assert first.taxonomy == model.taxonomy


def test_export_is_keyed_by_the_code(tmp_path, monkeypatch):
    """An edit to emolens's source (a model's forward, say) must not keep serving the old export."""
    import shutil

    import emolens
    import emolens.runtime
    from emolens.identity import source_digest

    package = tmp_path / "emolens"
    shutil.copytree(os.path.dirname(emolens.__file__), package, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    before = source_digest(package)
    model_code = package / "models" / "global_model.py"
    model_code.write_text(model_code.read_text() + "\n# an edit\n")
    source_digest.cache_clear()  # a process reads its source once
    assert source_digest(package) != before
    save_model(tiny_model(), tmp_path / "a.safetensors")
    path = cached_onnx_path(tmp_path / "a.safetensors")
    monkeypatch.setattr(emolens.runtime, "source_digest", lambda: "edited")
    assert cached_onnx_path(tmp_path / "a.safetensors") != path


def test_exported_model_predicts_without_pytorch(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    result = runner.invoke(app, ["export", "--model", str(tmp_path / "m.safetensors"), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    image = write_image(tmp_path / "x.png", seed=1, size=(40, 30))
    script = ("import sys, json\nfrom emolens.predict import Predictor\n"
              f"good, bad = Predictor({str(tmp_path / 'm.onnx')!r}).predict([{str(image)!r}, 'missing.jpg'])\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'good': len(good), 'bad': len(bad),"
              " 'sum': sum(good[0].distribution.values())}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    report = json.loads(out.stdout)
    assert report == {"torch": False, "good": 1, "bad": 1, "sum": pytest.approx(1.0, abs=1e-5)}


def test_broken_onnx_files_give_clear_errors(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="metadata"):
        OnnxModel(tmp_path / "bad.onnx")
    (tmp_path / "bad.json").write_text(json.dumps({"taxonomy": {"name": "x", "classes": ["a", "b"], "polarity": [1, 0]},
                                                   "preprocessing": {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
                                                   "outputs": ["logits"]}))
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load"):
        OnnxModel(tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="onnx backend"):
        Predictor(tmp_path / "bad.onnx", backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor(backend="tensorrt")


def test_threaded_decoding_keeps_input_order_and_reports_bad_files(tmp_path):
    paths = []
    for i in range(7):
        if i in (2, 5):
            (tmp_path / f"{i}.jpg").write_bytes(b"broken")
            paths.append(tmp_path / f"{i}.jpg")
        else:
            paths.append(write_image(tmp_path / f"{i}.png", seed=i, size=(30, 20)))
    predictor = Predictor(tiny_model(), batch_size=3, workers=3)
    seen = [r.source for batch in predictor.predict_iter(paths) for r in batch]
    assert seen == [str(p) for p in paths]
    good, bad = predictor.predict(paths)
    assert len(good) == 5 and sorted(e.source for e in bad) == [str(paths[2]), str(paths[5])]


def test_on_a_gpu_onnx_runtime_takes_its_cuda_provider_where_it_has_one(tmp_path, monkeypatch):
    import onnxruntime as ort

    from emolens import predict as predict_module
    from emolens.engine import placement
    from emolens.runtime import onnx_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers("cpu") == ["CPUExecutionProvider"] and onnx_providers("cuda:1") is None
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]

    asked, real_session = [], ort.InferenceSession

    def session(model, options, providers):  # this machine has no GPU: record the request, run on the CPU
        asked.append(providers)
        return real_session(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(placement, "resolve_device", lambda name: torch.device("cuda", 0))
    save_model(tiny_model(), tmp_path / "m.safetensors")
    backend, _ = predict_module.make_runner(str(tmp_path / "m.safetensors"), device="cuda")
    assert backend == "onnx" and asked[-1][0] == ("CUDAExecutionProvider", {"device_id": 0})
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(predict_module, "TorchRunner", lambda model, device: device)
    backend, runner = predict_module.make_runner(str(tmp_path / "m.safetensors"), device="cuda", backend="auto")
    assert (backend, runner) == ("torch", "cuda")  # no CUDA provider: PyTorch runs it on the GPU


def test_two_calls_at_once_give_what_one_call_at_a_time_gives(monkeypatch):
    """Without a thread count, a model runs two chunks at once on a multi-core CPU; the outputs are the same."""
    import os

    from emolens.runtime import OnnxModel, packaged_default_int8, packaged_default_onnx

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    images = np.random.default_rng(0).uniform(-1, 1, (20, 3, 224, 224)).astype(np.float32)
    for path in (packaged_default_onnx(), packaged_default_int8()):
        lanes, alone = OnnxModel(path), OnnxModel(path, threads=1)
        assert (lanes.lanes, alone.lanes) == (2, 1)
        together, one_by_one = lanes(images), alone(images)
        for name in together:
            np.testing.assert_allclose(together[name], one_by_one[name], rtol=0, atol=1e-5)
