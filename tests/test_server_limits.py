"""The server under load and abuse: bodies capped while they stream, decoding off the event loop, a pixel
budget and a bounded model queue that answer 503 + Retry-After, silent connections closed."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from helpers import png, tiny_model
from emolens.cli import MIN_CONNECTIONS
from emolens import runtime
from emolens.runtime import export_onnx
from emolens.server import HeaderTimeoutH11, Limits, create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "m.onnx"
    export_onnx(tiny_model().eval(), path)
    return path


@pytest.fixture(params=["batched", "per request"])
def model_calls(request, monkeypatch):
    """Both ways the server reaches the model: requests' images batched into shared calls, or, where the model
    runs an image per call (int8 on a CPU), each request's decode and model call in one worker thread."""
    if request.param == "per request":
        monkeypatch.setitem(runtime.RUNTIME_CHUNK, "fp32", 1)
    return request.param


@pytest.fixture
def client_for(model):
    """A client whose requests share one event loop, as a served app's do."""
    clients = []

    def make(**limits):
        client = TestClient(create_app(model, None, Limits(**limits)), base_url="http://127.0.0.1",
                            raise_server_exceptions=False)
        clients.append(client.__enter__())
        return clients[-1]

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def slow_decoding(monkeypatch, seconds):
    from emolens.preprocessing import Preprocessing

    real = Preprocessing.load

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(Preprocessing, "load", slow)


def test_decoding_runs_off_the_event_loop(client_for, monkeypatch, model_calls):
    slow_decoding(monkeypatch, 1.5)
    client = client_for()
    with ThreadPoolExecutor(2) as pool:
        upload = pool.submit(client.post, "/api/predict", files=[("files", ("a.png", png(1), "image/png"))])
        time.sleep(0.3)
        start = time.perf_counter()
        assert client.get("/api/health").status_code == 200
        health_seconds = time.perf_counter() - start
        assert upload.result().status_code == 200
    assert health_seconds < 0.8, f"/api/health waited {health_seconds:.2f} s for a decode"


def test_the_pixel_budget_makes_a_request_wait_then_503(client_for, monkeypatch):
    slow_decoding(monkeypatch, 1.5)
    client = client_for(max_pixels=60 * 40, pixel_budget=60 * 40, busy_wait=0.3)  # one upload at a time
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/api/predict", files=[("files", ("a.png", png(1), "image/png"))])
        time.sleep(0.3)
        second = client.post("/api/predict", files=[("files", ("b.png", png(2), "image/png"))])
        assert first.result().status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1" and "busy" in second.json()["error"]


def test_a_full_model_queue_answers_503_not_a_long_wait(client_for, monkeypatch, model_calls):
    from emolens.predict import Predictor

    real = Predictor.predict_prepared

    def slow_model(self, names, inputs):
        time.sleep(1.0)
        return real(self, names, inputs)

    monkeypatch.setattr(Predictor, "predict_prepared", slow_model)
    client = client_for(max_queued_images=2)
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(2)]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/api/predict", files=files)
        time.sleep(0.3)
        started = time.perf_counter()
        refused = client.post("/api/predict", files=files[:1])
        refused_after = time.perf_counter() - started
        assert first.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused_after < 0.8
    assert client.post("/api/predict", files=files[:1]).status_code == 200  # served again once the queue drains


@contextmanager
def serving(model, limits: Limits, header_timeout: float = 0.5, connections: int = 40):
    """A real uvicorn server with the protocol `emolens serve` sets (a short header timeout); yields its port."""
    import uvicorn

    class QuickHeaderTimeout(HeaderTimeoutH11):
        HEADER_TIMEOUT = header_timeout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, None, limits), host="127.0.0.1", port=port,
                                           http=QuickHeaderTimeout, limit_concurrency=connections, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live(model):
    with serving(model, Limits(max_upload_bytes=100_000, max_files=2, body_timeout=0.5)) as port:
        yield port


def request_head(port, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        return s.recv(65536)


def test_a_model_that_runs_an_image_per_call_decodes_and_predicts_in_one_thread(client_for, model, monkeypatch,
                                                                                 model_calls):
    from emolens import server
    from emolens.predict import Predictor

    offline = Predictor(model)
    expected = offline.predict_prepared(["a"], [offline.prepare(png(3))])[0]
    hand_offs = []
    real = server.run_in_threadpool

    def counted(fn, *args):
        hand_offs.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(server, "run_in_threadpool", counted)
    answer = client_for().post("/api/predict", files=[("files", ("a.png", png(3), "image/png"))])
    assert answer.status_code == 200
    # per request: header, decode and model in one call; batched: header and decode, then the model
    assert len(hand_offs) == (1 if model_calls == "per request" else 2), hand_offs
    assert answer.json()["results"][0]["distribution"] == pytest.approx(expected.distribution, abs=1e-6)


def test_a_body_over_the_cap_gets_413_before_it_is_sent(live):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 209715200\r\n\r\n")  # 200 MB announced, a few bytes sent
    started = time.perf_counter()
    answer = request_head(live, head, b"--x\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and time.perf_counter() - started < 2


def test_a_streamed_body_is_stopped_at_the_cap(live):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 65536
    with socket.create_connection(("127.0.0.1", live), timeout=5) as s:
        part = b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        s.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        sent, answer = 0, b""
        while sent < 50 * 2**20 and not answer:  # the server answers long before 50 MB
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            sent += len(chunk)
            s.settimeout(0.001)
            try:
                answer = s.recv(65536)
            except (TimeoutError, BlockingIOError, socket.timeout):
                pass
            s.settimeout(5)
        if not answer:
            answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 8 * 2**20  # what the socket buffers took meanwhile


def test_silent_connections_are_closed_and_others_still_served(live):
    silent = [socket.create_connection(("127.0.0.1", live), timeout=5) for _ in range(60)]
    try:
        time.sleep(1.0)
        closed = 0
        for s in silent:
            s.settimeout(0.2)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:  # still open
                pass
            except OSError:  # reset by the server
                closed += 1
        assert closed == len(silent)
        answer = request_head(live, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for s in silent:
            s.close()


def test_a_client_that_stops_sending_its_body_gets_408(live):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 5000\r\n\r\n")
    started = time.perf_counter()
    answer = request_head(live, head, b"--x\r\n")  # then nothing more
    assert answer.startswith(b"HTTP/1.1 408") and time.perf_counter() - started < 3


def test_slow_bodies_beyond_the_connection_limit_are_cut_and_health_is_answered(model):
    """Clients that send a body one byte at a time, each pause under the read timeout, more of them than the
    server takes connections: each is cut at the body deadline, and health is answered again after it."""
    limit, deadline = MIN_CONNECTIONS, 2.0
    with serving(model, Limits(body_timeout=1.0, body_deadline=deadline), connections=limit) as port:
        head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 100000\r\n\r\n--x\r\n")
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(limit + 6)]
        started = time.perf_counter()
        for s in slow:
            s.sendall(head)
            s.setblocking(False)
        open_since, probes = {s: started for s in slow}, []
        while time.perf_counter() - started < deadline + 3:
            for s in list(open_since):
                try:
                    s.recv(65536)  # an answer (408, or 503 beyond the limit) or a close: the server let go
                    del open_since[s]
                    continue
                except BlockingIOError:  # nothing yet: trickle on
                    pass
                except OSError:  # reset by the server
                    del open_since[s]
                    continue
                try:
                    s.send(b"a")
                except OSError:
                    del open_since[s]
            try:
                answer = request_head(port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=2)
            except OSError:
                answer = b""
            probes.append((time.perf_counter() - started, answer.startswith(b"HTTP/1.1 200")))
            time.sleep(0.3)
        held = len(open_since)
        for s in slow:
            s.close()
    assert held == 0, f"{held} slow clients still held after {deadline + 3:g} s"
    late = [ok for t, ok in probes if t > deadline + 1]
    assert late and all(late), probes


def test_serve_with_two_worker_processes_answers_as_one(tmp_path):
    """`emolens serve --workers 2`: uvicorn's worker processes, each with the model, give `predict`'s answer."""
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    from helpers import write_image
    from emolens.predict import Predictor

    photo = write_image(tmp_path / "a.jpg", seed=4, size=(80, 60))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "emolens", "serve", "--port", str(port), "--workers", "2",
                               "--precision", "int8"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=2) as r:
                    assert json.load(r)["precision"] == "int8"
                break
            except OSError:
                time.sleep(0.3)
        body = (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n" + photo.read_bytes()
                + b"\r\n--x--\r\n")
        answers = []
        for _ in range(4):  # spread over the workers
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/predict", body,
                                             {"Content-Type": "multipart/form-data; boundary=x"})
            with urllib.request.urlopen(request, timeout=30) as r:
                answers.append(json.load(r)["results"][0])
        expected = Predictor(None, precision="int8").predict([photo])[0][0]
        for answer in answers:
            assert answer["emotion"] == expected.emotion
            assert answer["distribution"] == pytest.approx(expected.distribution, abs=1e-6)
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
    assert log.count("Application startup complete") == 2 and "Traceback" not in log
