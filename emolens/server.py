"""``emolens serve``: the JSON API (FastAPI) over one loaded model and, optionally, an affective index.

The model is loaded once; inference runs in a worker thread, off the event loop, and the images of
concurrent requests share model calls (:class:`PredictBatcher`). Limits on upload
size, file count and pixels give a JSON 4xx, never a stack trace; images are served by index id
only, never by a client-named path; CORS stays off.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import importlib.util
import io
import json
import mimetypes
import os
import threading
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastapi import File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.middleware.trustedhost import TrustedHostMiddleware
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .identity import model_identity
from .retrieval.index import is_indexed_file_stat
from .images import ImageLoadError, declared_pixels
from .predict import Prediction, Predictor


@dataclass(frozen=True)
class Limits:
    """What one server accepts at once. Above the budgets a request waits up to ``busy_wait`` seconds,
    then gets 503 with ``Retry-After``: latency and memory stay bounded under overload."""

    max_upload_bytes: int = 20 * 2**20  # per file
    max_files: int = 16  # per request
    max_request_bytes: int = 64 * 2**20  # a whole request body
    max_pixels: int = 40_000_000  # per image
    pixel_budget: int = 80_000_000  # decoded pixels in flight, all requests together
    max_queued_images: int = 64  # images waiting for the model: about a second of work on 2 cores
    busy_wait: float = 5.0
    model_lanes: int = 2  # model calls at once on a CPU (see PredictBatcher)
    body_timeout: float = 30.0  # seconds a client may pause while sending a body
    body_deadline: float = 60.0  # seconds from a request's head to the end of its body


class Busy(HTTPException):
    """The server is at a limit; the client should come back (503 with Retry-After)."""

    def __init__(self, what: str):
        super().__init__(503, f"busy: {what}; try again shortly", headers={"Retry-After": "1"})


class PixelBudget:
    """Decoded pixels in flight: a request's worker thread holds its largest image's pixels while decoding
    (its images decode one after another) and waits, up to ``wait`` seconds, while others hold the budget."""

    def __init__(self, pixels: int, wait: float):
        self.total = self.free = pixels
        self.wait = wait
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        """Holds ``pixels`` of the budget (at most all of it); :class:`Busy` after ``wait`` seconds short."""
        pixels = min(pixels, self.total)
        with self._changed:
            if not self._changed.wait_for(lambda: self.free >= pixels, self.wait):
                raise Busy("too many pixels being decoded")
            self.free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self.free += pixels
                self._changed.notify_all()


class PredictBatcher:
    """Gathers the images of concurrent requests into shared model calls: a call takes every request
    waiting when it starts (up to ``max_batch`` images; after waiting ``wait`` seconds for more), so requests
    that arrive while the model runs share the next call and a lone request never waits. Up to ``lanes``
    calls run at once (on a CPU, each on ``CPUs / lanes`` threads of one ONNX Runtime session): two
    single-threaded calls keep two cores busier than one call on two threads while requests decode."""

    def __init__(self, predictor: Predictor, max_batch: int = 32, wait: float = 0.0, max_queued: int = 64,
                 lanes: int = 1):
        self.predictor, self.max_batch, self.wait, self.max_queued = predictor, max_batch, wait, max_queued
        self.lanes = lanes
        #: Where the model runs one image per call (int8 on a CPU) batching cannot help: each request makes its
        #: own call (:meth:`run`) in the thread that decoded it, sparing the event loop a hand-off and the queue
        #: (about 1.1x the requests/s).
        self.per_request = predictor.images_per_call == 1
        self.calls = 0  # model calls made: fewer than requests when batching helped
        self.queued = 0  # images waiting for or in a model call
        self._loop = self._queue = self._task = None

    @contextmanager
    def admitted(self, count: int):
        """Holds ``count`` images' places in the queue; :class:`Busy` when it is full."""
        if self.queued + count > self.max_queued:
            raise Busy(f"{self.queued} images are waiting for the model")
        self.queued += count
        try:
            yield
        finally:
            self.queued -= count

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test client without lifespan, a restart)
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._serve())

    async def predict(self, inputs: list[np.ndarray]) -> list[Prediction]:
        """Predictions for model inputs made by ``Predictor.prepare``; :class:`Busy` when the queue is full."""
        self._start()
        with self.admitted(len(inputs)):
            future = self._loop.create_future()
            await self._queue.put((inputs, future))
            return await future

    def run(self, inputs: list[np.ndarray]) -> list[Prediction]:
        """One model call on ``inputs``, in the calling thread (within :meth:`admitted`)."""
        self.calls += 1
        return self.predictor.predict_prepared([f"<upload {i}>" for i in range(len(inputs))], inputs)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.lanes)
        while True:
            await free.acquire()  # a batch is formed when a lane can run it, so it takes all that waited
            waiting = [await self._queue.get()]
            deadline = loop.time() + self.wait
            while sum(len(images) for images, _ in waiting) < self.max_batch:
                try:
                    if self._queue.empty() and loop.time() < deadline:
                        waiting.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                    else:
                        waiting.append(self._queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            loop.create_task(self._answer(waiting, free))

    async def _answer(self, waiting: list, free: asyncio.Semaphore) -> None:
        try:
            results = await run_in_threadpool(self.run, [img for images, _ in waiting for img in images])
        except Exception as e:  # the failure belongs to every request in the batch
            for _, future in waiting:
                future.set_exception(e)
            return
        finally:
            free.release()
        start = 0
        for images, future in waiting:
            future.set_result(results[start:start + len(images)])
            start += len(images)


def _prediction(p: Prediction) -> dict:
    return {k: v for k, v in p.to_dict().items() if k != "source"}


#: Host names a browser may use for a server on this machine; others are refused (DNS rebinding).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
SQLITE_IDS = range(-(2**63), 2**63)


def create_app(model: str | os.PathLike | None = None, db: str | os.PathLike | None = None,
               limits: Limits = Limits(), allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS, device: str = "cpu",
               precision: str = "fp32", workers: int = 1):
    """The app; ``model`` and ``precision`` as for :class:`Predictor`, ``db`` an index folder made by
    ``emolens index``; requests whose ``Host`` is not one of ``allowed_hosts`` are refused (``"*"`` allows any).
    ``workers``: how many processes serve the app, which share the CPUs between their model calls."""
    from .retrieval.index import AffectFilter, AffectiveIndex, AffectiveIndexError

    cpus = os.cpu_count() or 1
    lanes = max(1, limits.model_lanes // workers) if device == "cpu" else 1
    predictor = Predictor(model, keep=("embedding",), max_pixels=limits.max_pixels, device=device, precision=precision,
                          threads=max(1, cpus // (lanes * workers)))
    batcher = PredictBatcher(predictor, max_queued=limits.max_queued_images, lanes=lanes)
    budget = PixelBudget(max(limits.pixel_budget, limits.max_pixels), limits.busy_wait)
    index = AffectiveIndex(db) if db is not None else None
    if index is not None:
        index.check_model(predictor)  # its hits and the queries' embeddings must come from one model
    # FastAPIOffline serves Swagger UI's assets from the package: the stock /docs loads them from a CDN
    app = FastAPIOffline(title="emolens", description="Which emotions an image evokes, and images that feel alike.")
    explainers: list = []  # built on the first heat-map request: Grad-CAM needs the PyTorch model
    heatmaps_possible = not str(model).endswith(".onnx") and importlib.util.find_spec("torch") is not None
    explainer_lock = threading.Lock()

    def heatmap(view) -> str:
        if str(model).endswith(".onnx"):
            raise HTTPException(400, "heat maps need a PyTorch model; this server runs an ONNX export")
        with explainer_lock:  # concurrent first requests build one explainer
            if not explainers:
                try:
                    from .explain import Explainer
                    from .weights import load_model
                except ImportError as e:
                    raise HTTPException(501, f"heat maps need PyTorch, which this install leaves out ({e.name} is "
                                             "missing): pip install 'emolens[torch]'") from None

                explaining = load_model(model or "default")  # for int8 too: the maps come from its fp32 weights
                if model_identity(explaining).digest != predictor.identity.fp32_digest:
                    raise HTTPException(409, "the weights changed on disk since the server started; restart it")
                explainers.append(Explainer(explaining, max_pixels=limits.max_pixels, device=device))
        return overlay_data_url(explainers[0].explain_view(view))  # Explainer serialises calls on its model

    # A page on a foreign site that rebinds its own name to this address would otherwise read the index
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(BodyLimit, max_bytes=min(limits.max_request_bytes, limits.max_files * limits.max_upload_bytes
                                                + 2**16), timeout=limits.body_timeout, deadline=limits.body_deadline)

    @app.exception_handler(StarletteHTTPException)  # also the framework's own (e.g. malformed multipart)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return JSONResponse({"error": "internal error"}, status_code=500)

    def decode(data: list[bytes]) -> list[tuple[np.ndarray, Image.Image] | ImageLoadError]:
        """Each upload as (model input, model's view); the decoded full image is dropped at once."""
        out = []
        for blob in data:
            try:
                view = predictor.preprocessing.crop(predictor.preprocessing.load(blob, limits.max_pixels))
                out.append((predictor.preprocessing.normalise(view), view))
            except ImageLoadError as e:
                out.append(e)
        return out

    def decode_and_predict(names: list[str], data: list[bytes]) -> tuple[list, list[Prediction] | None]:
        """Each upload's header checked, then, within the pixel budget, the uploads decoded (:func:`decode`)
        and, where the model runs an image per call, its call on them, all in one worker thread: every hand-off
        between the event loop and a thread costs about 0.2 ms of CPU a request. The predictions are None
        where the batcher is to make them or an upload failed to decode."""
        pixels = []
        for name, blob in zip(names, data):
            try:
                pixels.append(declared_pixels(blob, limits.max_pixels))
            except ImageLoadError as e:
                raise HTTPException(400, f"{name}: {e.reason}") from None
        found = None
        with budget.hold(max(pixels)):
            decoded = decode(data)
            if batcher.per_request and not any(isinstance(d, ImageLoadError) for d in decoded):
                found = batcher.run([array for array, _ in decoded])
        if max(pixels) >= LARGE_IMAGE_PIXELS:
            release_memory()
        return decoded, found

    async def read_and_predict(files: list[UploadFile]
                               ) -> tuple[list[tuple[np.ndarray, Image.Image]], list[Prediction]]:
        """Uploads as (model input, model's view), decoded in a worker thread (never on the event loop) within
        the pixel budget, and their predictions."""
        if not files:
            raise HTTPException(400, "no image given")
        if len(files) > limits.max_files:
            raise HTTPException(413, f"too many files: {len(files)} (at most {limits.max_files})")
        data = []
        for f in files:
            blob = await f.read(limits.max_upload_bytes + 1)
            if len(blob) > limits.max_upload_bytes:
                raise HTTPException(413, f"{f.filename}: larger than {limits.max_upload_bytes} bytes")
            data.append(blob)
        names = [f.filename for f in files]
        with batcher.admitted(len(data)) if batcher.per_request else nullcontext():  # else the batcher admits
            decoded, found = await run_in_threadpool(decode_and_predict, names, data)
        for name, d in zip(names, decoded):
            if isinstance(d, ImageLoadError):
                raise HTTPException(400, f"{name}: {d.reason}")
        if found is None:
            found = await batcher.predict([array for array, _ in decoded])
        return decoded, found

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok", "model": predictor.backend, "index": len(index) if index is not None else None}

    @app.get("/api")
    async def endpoints() -> dict:
        """The JSON API's endpoints (OpenAPI with their parameters at /openapi.json, browsable at /docs)."""
        return {"endpoints": [{"method": method, "path": route.path,
                               "summary": getattr(route, "summary", None) or route.name}
                              for route in app.routes if route.path.startswith("/api")
                              for method in sorted(getattr(route, "methods", ()) or ()) if method != "HEAD"],
                "docs": "/docs", "openapi": "/openapi.json"}

    @app.get("/api/models")
    async def models() -> dict:
        tax = predictor.taxonomy
        return {"taxonomy": tax.name, "classes": tax.classes, "polarity": tax.polarity, "backend": predictor.backend,
                "precision": predictor.precision, "model_id": predictor.identity.digest,
                "affect": predictor.rates_affect, "heatmaps": heatmaps_possible,
                "preprocessing": asdict(predictor.preprocessing)}

    @app.post("/api/predict")
    async def predict(files: list[UploadFile] = File(...), heatmaps: bool = Query(False)) -> JSONResponse:
        """Top emotion, polarity and distribution per image; with ``heatmaps``, a Grad-CAM overlay
        (PNG data URL of the model's view) each."""
        images, found = await read_and_predict(files)
        results = [{"filename": f.filename, **_prediction(p)} for f, p in zip(files, found)]
        if heatmaps:
            for result, (_, view) in zip(results, images):
                result["heatmap"] = await run_in_threadpool(heatmap, view)
        return JSONResponse({"results": results})  # as it is: a response model would validate it again

    def require_index():
        if index is None:
            raise HTTPException(404, "no index loaded (start the server with --db)")
        return index

    def ranges(valence: str | None, arousal: str | None) -> AffectFilter:
        try:
            return AffectFilter.parse(valence, arousal)
        except ValueError as e:
            raise HTTPException(400, str(e))

    RANGE = "LOW:HIGH on the common scale [-1, 1]: keep to images in it"

    @app.post("/api/search")
    async def search_image(file: UploadFile = File(...), k: int = Query(12, ge=1, le=200),
                           valence: str | None = Query(None, description=RANGE),
                           arousal: str | None = Query(None, description=RANGE)) -> dict:
        """The indexed images that feel most like the uploaded one (within the valence/arousal ranges); the
        uploaded file itself, where the collection holds it, is left out (as `emolens search` leaves out its
        query)."""
        store, within = require_index(), ranges(valence, arousal)
        _, (query,) = await read_and_predict([file])
        await file.seek(0)
        upload = hashlib.sha256(await file.read()).digest()
        try:  # index calls stay on the event loop: one at a time
            hits = store.search_vector(query.outputs["embedding"], k + 1, within=within)
        except AffectiveIndexError as e:
            raise HTTPException(400, str(e))
        same = [h for h in hits if h.score >= SAME_IMAGE_SCORE and await run_in_threadpool(same_file, store, h, upload)]
        return {"query": _prediction(query), "hits": [_hit(h) for h in hits if h not in same][:k]}

    @app.get("/api/search")
    async def search_emotion(emotion: str | None = Query(None), k: int = Query(12, ge=1, le=200),
                             valence: str | None = Query(None, description=RANGE),
                             arousal: str | None = Query(None, description=RANGE),
                             nearest: bool = Query(False, description="With ranges alone: when they hold no image, "
                                                   "the images nearest their centre (``outside`` is then true)")) -> dict:
        """The images most likely to evoke ``emotion``; or, with ranges alone, those nearest the ranges' centre."""
        store, within = require_index(), ranges(valence, arousal)
        if emotion is None and not within:
            raise HTTPException(400, "give an emotion, or valence/arousal ranges")
        outside = False
        try:
            hits = store.search_emotion(emotion, k, within) if emotion is not None else store.search_affect(within, k)
            if not hits and nearest and emotion is None:
                hits, outside = store.search_affect(within, k, inside=False), True
        except KeyError as e:
            raise HTTPException(400, str(e.args[0]))
        except AffectiveIndexError as e:
            raise HTTPException(400, str(e))
        return {"emotion": emotion, "valence": valence, "arousal": arousal, "outside": outside,
                "hits": [_hit(h) for h in hits]}

    @app.get("/api/points")
    async def points(limit: int = Query(2000, ge=1, le=20000)) -> dict:
        """Where the collection's images lie on the valence-arousal plane: up to ``limit`` of them, spread."""
        store = require_index()
        return {"total": len(store), "points": [list(p) for p in store.affect_points(limit)]}

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response((Path(__file__).parent / "web" / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    @app.get("/api/images/{image_id}")
    async def image(image_id: int):
        store = require_index()
        row = store.image_row(image_id) if image_id in SQLITE_IDS else None
        data = None if row is None else await run_in_threadpool(read_indexed_file, row)
        if data is None:
            raise HTTPException(404, f"no image with id {image_id}")
        return Response(data, media_type=mimetypes.guess_type(row.path)[0] or "application/octet-stream")

    app.mount("/", StaticFiles(directory=Path(__file__).parent / "web", html=True), name="web")
    return app


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413 before it is read (by its
    Content-Length) or as soon as the streamed bytes pass the limit, so nothing larger lands on disk; a
    client that pauses more than ``timeout`` seconds, or has not sent the whole body ``deadline`` seconds
    after the head, gets 408. Any answer given before the body is complete closes the connection: a
    client cannot hold it open by trickling the rest of a body nobody reads."""

    def __init__(self, app, max_bytes: int, timeout: float, deadline: float):
        self.app, self.max_bytes, self.timeout, self.deadline = app, max_bytes, timeout, deadline

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"error": f"request larger than {self.max_bytes} bytes"}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline
        received = 0
        complete = b"transfer-encoding" not in headers and int(length or 0) == 0  # no body to wait for

        async def limited_receive():
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come, whenever it does
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(min(self.timeout, left), 0))
            except asyncio.TimeoutError:
                why = f"no request data for {self.timeout:g} s" if left > self.timeout else \
                    f"request body not complete within {self.deadline:g} s"
                raise HTTPException(408, why, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, f"request larger than {self.max_bytes} bytes",
                                        headers={"Connection": "close"})
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


#: Where `emolens serve --workers N` puts the app's settings for its worker processes (JSON).
SETTINGS_VARIABLE = "EMOLENS_SERVE_SETTINGS"


def app_from_environment():
    """The app of one worker process of ``emolens serve --workers N``: its settings come from the
    environment (:data:`SETTINGS_VARIABLE`), as the command wrote them."""
    import warnings

    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    warnings.simplefilter("ignore")  # the command said them once, before starting its workers
    return create_app(settings["model"], settings["db"], Limits(**settings["limits"]), tuple(settings["allowed_hosts"]),
                      settings["device"], settings["precision"], settings["workers"])


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request head within
    ``HEADER_TIMEOUT`` seconds of opening, or of the previous response on a kept-alive connection: half-open
    and trickling connections cannot pile up to the connection limit."""

    HEADER_TIMEOUT = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._time_head()

    def _time_head(self) -> None:
        self._awaited_after = self.cycle  # a head has arrived once a new cycle stands in its place
        self._head_timer = self.loop.call_later(self.HEADER_TIMEOUT, self._head_timeout)

    def _head_timeout(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # no request is being answered
        if self.cycle is self._awaited_after and idle and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head_timer.cancel()
            self._time_head()

    def connection_lost(self, exc) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)


#: Decodes from this size on hand their freed heap back to the system afterwards.
LARGE_IMAGE_PIXELS = 4_000_000


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Give freed heap back to the system (glibc): after a large decode the process would keep it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: A hit this close to the query (cosine of unit embeddings) may be the query's own file: its bytes decide.
SAME_IMAGE_SCORE = 0.999


def same_file(store, hit, digest: bytes) -> bool:
    """Whether the indexed file of ``hit`` has the sha256 ``digest`` (an upload's)."""
    row = store.image_row(hit.id)
    data = None if row is None else read_indexed_file(row)
    return data is not None and hashlib.sha256(data).digest() == digest


def read_indexed_file(row) -> bytes | None:
    """The bytes of an indexed image, only if the file opened is still the regular file that was indexed:
    the same identity (device, inode, size, modification and change times), reached by no link, at the real
    path the index stored (inside the folders given to ``index``), so a folder swapped for a link since is
    not followed out."""
    try:
        fd = os.open(row.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if opened_path(f.fileno(), row.path) != row.path or not is_indexed_file_stat(os.fstat(f.fileno()), row.identity):
            return None
        return f.read(row.identity[2])


def opened_path(fd: int, path: str) -> str:
    """Where the file open as ``fd`` really lies: what the kernel says (Linux), else the real path of ``path``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def overlay_data_url(explanation) -> str:
    """The first map of an explanation over the model's view, as a PNG data URL."""
    import base64

    from .explain import overlay

    buffer = io.BytesIO()
    overlay(explanation.image, next(iter(explanation.maps.values()))).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _hit(h) -> dict:
    return {"id": h.id, "url": f"/api/images/{h.id}", "name": Path(h.path).name, "score": h.score,
            "emotion": h.emotion, "probability": h.probability, "polarity": h.polarity,
            "distribution": h.distribution, "valence": h.valence, "arousal": h.arousal}
