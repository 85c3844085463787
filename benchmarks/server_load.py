"""`emolens serve` under load and abuse, on loopback: throughput, latency percentiles and peak memory at
several concurrencies, concurrent heat maps, and the fault cases with their outcome.

The server is a separate process (`emolens serve`, the embedded default model, an index of synthetic
photos); clients are threads of this process, one keep-alive connection each. Every phase is bounded in
time and the server is stopped at the end.

    python benchmarks/server_load.py [--seconds 8] [--concurrency 1,4,16,64,256] [--precision int8]

``--throughput-only`` stops after the predict phases. Between them, in the same run, the offline predictor
(``Predictor``, same model and precision, its own process) scores the same uploads from files for as long as
a phase lasts: before the first predict phase and after each one, the server idle. Each phase prints its
images/s as a share of the mean of the offline rates just before and just after it (this host's speed drifts
by up to a fifth within minutes), the CPU the server's processes used (cores, and ms an image) and, with
``--workers``, how many of the clients' connections each server process holds. The first offline process
also times 4 plain threads decoding the uploads and calling the model as the server's worker threads do,
without HTTP: what the server's own machinery costs shows between the two.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "emolens-load"


def photo(seed: int, size=(640, 480)) -> bytes:
    """A smooth random photo-sized JPEG."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    parts = []
    for name, data in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


class Client:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, port: int, timeout: float = 60):
        self.port, self.timeout, self.conn = port, timeout, None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return response.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    return 0, b""
        return 0, b""


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_threads(target, count: int) -> float:
    """``target(k)`` on ``count`` threads at once; the wall seconds until all return."""
    started = time.perf_counter()
    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def run_phase(port: int, concurrency: int, seconds: float, make_request, server_pid: int | None = None) -> dict:
    """``concurrency`` client threads for ``seconds``; latency and outcome of every request, and halfway
    through, how the server's processes share the clients' connections."""
    latencies, statuses, images = [], {}, [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    split = []
    watch = threading.Timer(seconds / 2, lambda: split.extend(connections_per_process(server_pid, port)))
    if server_pid is not None:
        watch.start()

    def worker(k: int) -> None:
        client, rng = Client(port), random.Random(k)
        while time.perf_counter() < stop:
            method, path, body, headers, count = make_request(rng)
            start = time.perf_counter()
            status, _ = client.request(method, path, body, headers)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                images[0] += count if status == 200 else 0

    wall = run_threads(worker, concurrency)
    if server_pid is not None:
        watch.join()  # the split is read before the phase's figures are
    ms = np.array(latencies) * 1000
    return {"requests_per_s": len(ms) / wall, "images_per_s": images[0] / wall,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "statuses": statuses, "split": split}


def offline_rate(folder: Path, precision: str, seconds: float, plain_threads: bool = False) -> dict:
    """The offline predictor on the upload photos in ``folder``, from files, in a process of its own as the
    server is (:func:`measure_offline`)."""
    out = subprocess.run([sys.executable, __file__, "--offline", str(folder), "--precision", precision, "--seconds",
                          str(seconds), *(["--plain-threads"] if plain_threads else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_offline(folder: str, precision: str, seconds: float, plain_threads: bool, threads: int = 4) -> dict:
    """Images/s and CPU (cores, ms an image) of ``Predictor.predict`` on the photos in ``folder``, over and over
    for ``seconds``; with ``plain_threads``, also of ``threads`` plain threads each decoding an upload's bytes
    and calling the model on it, as the server's worker threads do, without HTTP."""
    import glob
    import resource

    from emolens.predict import Predictor

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    paths = sorted(glob.glob(f"{folder}/q*.jpg"))
    predictor = Predictor(None, precision=precision)
    predictor.predict(paths)
    start, used, done = time.perf_counter(), cpu(), 0
    while time.perf_counter() - start < seconds:
        done += len(predictor.predict(paths * 4)[0])
    wall = time.perf_counter() - start
    result = {"images_per_s": done / wall, "cores": (cpu() - used) / wall, "cpu_ms": 1000 * (cpu() - used) / done}
    if not plain_threads:
        return result

    single = Predictor(None, precision=precision, threads=1)  # as the server's calls run
    data = [Path(p).read_bytes() for p in paths]
    counts, stop = [0] * threads, time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            single.predict_prepared(["upload"], [single.prepare(data[(k + counts[k]) % len(data)])])
            counts[k] += 1  # each thread its own count

    used = cpu()
    wall = run_threads(loop, threads)
    done = sum(counts)
    result.update(threads_images_per_s=done / wall, threads_cores=(cpu() - used) / wall,
                  threads_cpu_ms=1000 * (cpu() - used) / done)
    return result


def server_processes(pid: int) -> list[int]:
    """Process ``pid`` and its descendants (the server's workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            pass  # a process that ended meanwhile
    return found


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its child processes (server workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in server_processes(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError):
            pass
    return total


def connections_per_process(pid: int, port: int) -> list[int]:
    """Established connections on ``port`` that each server process holds (most first): which worker the
    kernel handed each client's connection to."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    counts = []
    for p in server_processes(pid):
        try:
            links = [os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")]
        except OSError:
            continue
        held = sum(link[8:-1] in inodes for link in links if link.startswith("socket:["))
        if held:
            counts.append(held)
    return sorted(counts, reverse=True)


def start_server(root: Path, port: int, precision: str = "fp32", workers: int = 1) -> subprocess.Popen:
    log = open(root / "serve.log", "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "emolens", "serve", "--db", str(root / "db"), "--port", str(port),
                             "--precision", precision, "--workers", str(workers)], stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"emolens serve stopped: {(root / 'serve.log').read_text()[-2000:]}")
        try:
            if Client(port, timeout=2).request("GET", "/api/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("emolens serve did not start in 180 s")


def faults(root: Path, port: int, pid: int, indexed: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    rows = []
    client = Client(port)

    secret = (root / "outside" / "secret.jpg").read_bytes()
    reported = "link-out.jpg" in indexed.stderr and "outside the indexed folders" in " ".join(indexed.stderr.split())
    total = client.request("GET", "/api/health")[1]
    ids = range(1, json.loads(total)["index"] + 20)
    served = sum(client.request("GET", f"/api/images/{i}")[1] == secret for i in ids)
    rows.append(("a link in the indexed folder to a file outside it",
                 f"index exit {indexed.returncode}, link {'reported as outside' if reported else 'NOT reported'}; "
                 f"{served} of {len(ids)} image ids serve the outside file"))

    body, ctype = multipart([("photo.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")])
    start = time.perf_counter()
    status, data = client.request("POST", "/api/predict", body, {"Content-Type": ctype})
    rows.append(("EPS payload named photo.jpg", f"{status} in {1000 * (time.perf_counter() - start):.0f} ms: "
                 f"{json.loads(data)['error']}"))

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        start = time.perf_counter()
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + ctype.encode() +
                  b"\r\nContent-Length: 209715200\r\n\r\n" + b"\0" * 65536)
        answer = s.recv(4096).split(b"\r\n", 1)[0].decode()
    rows.append(("200 MB upload announced", f"{answer} after {1000 * (time.perf_counter() - start):.0f} ms, "
                 "64 KiB sent, nothing written to disk"))

    status, _ = client.request("GET", "/api/health", headers={"Host": "evil.example"})
    rows.append(("Host: evil.example (DNS rebinding)", str(status)))
    status, _ = client.request("GET", f"/api/images/{2**63}")
    rows.append(("image id 2^63 (outside SQLite's range)", str(status)))

    silent = []
    try:
        for _ in range(1100):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        start = time.perf_counter()
        status, _ = Client(port).request("GET", "/api/health")
        first = (status, time.perf_counter() - start)
        time.sleep(12)  # past the header timeout
        closed = 0
        for s in silent:
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        status, _ = Client(port).request("GET", "/api/health")
        rows.append(("1,100 half-open connections", f"health {first[0]} in {1000 * first[1]:.0f} ms while open; "
                     f"{closed}/1100 closed by the server after the header timeout; then health {status}"))
    finally:
        for s in silent:
            s.close()

    rows.append(slow_bodies(port, SLOW_CLIENTS))

    big = np.zeros((5000, 8000), dtype=np.uint16)  # 40 megapixels, 16-bit: 80 MB decoded as it is
    big[::7] = 40000
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    body, ctype = multipart([(f"{i}.png", buf.getvalue()) for i in range(16)])
    before = current_rss_mib(pid)
    result = {}

    def heavy():
        start = time.perf_counter()
        result["status"], _ = Client(port, timeout=300).request("POST", "/api/predict", body, {"Content-Type": ctype})
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=heavy)
    thread.start()
    health = []
    while thread.is_alive():
        start = time.perf_counter()
        Client(port).request("GET", "/api/health")
        health.append(time.perf_counter() - start)
        time.sleep(0.2)
    thread.join()
    time.sleep(1)
    rows.append((f"16 x 40-MP 16-bit PNGs in one request ({len(body) / 2**20:.1f} MB)",
                 f"{result['status']} in {result['seconds']:.1f} s; health p100 {1000 * max(health):.0f} ms meanwhile; "
                 f"RSS {before:.0f} -> peak {peak_rss_mib(pid):.0f} MiB, {current_rss_mib(pid):.0f} MiB after"))
    return rows


#: Slow-body clients: more than `serve`'s default --max-connections (2048).
SLOW_CLIENTS = 2100


def slow_bodies(port: int, clients: int, pause: float = 20.0, watch: float = 75.0) -> tuple[str, str]:
    """``clients`` connections that each announce a 100 kB upload and send it one byte every ``pause``
    seconds (under the per-read timeout), while /api/health is probed every second for ``watch`` seconds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, clients + 512)), hard))
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n--x\r\n")
    started = time.perf_counter()
    held, released, answers = {}, [], {}  # socket -> next byte due; when the server let go; status lines
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(head)
        s.setblocking(False)
        held[s] = time.perf_counter() + pause
    probes = []
    try:
        while time.perf_counter() - started < watch:
            now = time.perf_counter()
            for s in list(held):
                try:
                    status = s.recv(4096).split(b"\r\n", 1)[0][9:12].decode() or "closed"  # 408, 503, or a close
                except BlockingIOError:
                    if now >= held[s]:
                        try:
                            s.send(b"a")
                            held[s] = now + pause
                        except OSError:
                            pass
                    continue
                except OSError:
                    status = "reset"
                answers[status] = answers.get(status, 0) + 1
                released.append(now - started)
                del held[s]
            probe = time.perf_counter()
            try:
                status = Client(port, timeout=5).request("GET", "/api/health")[0]
            except OSError:
                status = 0
            probes.append((probe - started, status))
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - probe)))
    finally:
        for s in held:
            s.close()
    first_ok = next((t for t, status in probes if status == 200), None)
    answered = sum(status == 200 for _, status in probes)
    late = [t for t in released if t > 5]
    return (f"{clients} clients sending a body 1 byte / {pause:g} s",
            f"{len(released) - len(late)} let go within 5 s, the other {len(late)} cut at {min(late, default=0):.0f}-"
            f"{max(late, default=0):.0f} s (answers {dict(sorted(answers.items()))}), {len(held)} still held after "
            f"{watch:g} s; "
            f"health 200 to {answered} of {len(probes)} probes, first at {first_ok if first_ok is None else round(first_ok)} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="length of each load phase and of each offline measurement")
    ap.add_argument("--concurrency", default="1,4,16,64,256")
    ap.add_argument("--gallery", type=int, default=200, help="synthetic photos in the index")
    ap.add_argument("--precision", default="fp32", help="fp32 or int8, for the server and the offline predictor")
    ap.add_argument("--throughput-only", action="store_true", help="stop after the predict phases")
    ap.add_argument("--workers", type=int, default=1, help="server processes (serve --workers)")
    ap.add_argument("--offline", metavar="FOLDER", help=argparse.SUPPRESS)  # measure_offline in its own process
    ap.add_argument("--plain-threads", action="store_true", help=argparse.SUPPRESS)  # with --offline
    args = ap.parse_args()
    if args.offline:
        print(json.dumps(measure_offline(args.offline, args.precision, args.seconds, args.plain_threads)))
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        for i in range(args.gallery):
            (root / "photos" / f"{i}.jpg").write_bytes(photo(i))
        env_cache = os.environ.setdefault("EMOLENS_CACHE", str(root / "cache"))
        (root / "outside").mkdir()
        (root / "outside" / "secret.jpg").write_bytes(photo(99_999))
        (root / "photos" / "link-out.jpg").symlink_to(root / "outside" / "secret.jpg")  # must not be indexed
        indexed = subprocess.run([sys.executable, "-m", "emolens", "index", str(root / "photos"), "--db",
                                  str(root / "db"), "--precision", args.precision], capture_output=True, text=True,
                                 env={**os.environ, "COLUMNS": "400"})
        if indexed.returncode not in (0, 3):
            raise SystemExit(f"emolens index failed: {indexed.stderr[-2000:]}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "uploads").mkdir()
        upload_photos = [photo(10_000 + i) for i in range(32)]  # the offline predictor reads them from files
        for i, data in enumerate(upload_photos):
            (root / "uploads" / f"q{i}.jpg").write_bytes(data)
        server = start_server(root, port, args.precision, args.workers)
        try:
            uploads = [multipart([(f"q{i}.jpg", data)]) for i, data in enumerate(upload_photos)]
            emotions = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]

            def predict(rng):
                body, ctype = rng.choice(uploads)
                return "POST", "/api/predict", body, {"Content-Type": ctype}, 1

            def mixed(rng):
                x = rng.random()
                if x < 0.6:
                    return predict(rng)
                if x < 0.8:
                    return "GET", f"/api/search?emotion={rng.choice(emotions)}&k=12", None, {}, 0
                if x < 0.9:
                    body, ctype = rng.choice(uploads)
                    body, ctype = body.replace(b'name="files"', b'name="file"'), ctype
                    return "POST", "/api/search?k=12", body, {"Content-Type": ctype}, 1
                return "GET", "/api/health", None, {}, 0

            print(f"emolens serve --workers {args.workers}, default model (ONNX Runtime, {args.precision}), index of "
                  f"{args.gallery} photos; "
                  f"{os.cpu_count()} CPUs shared by server and clients; {args.seconds:g} s per phase; cache {env_cache}")
            phases = []
            offline = [offline_rate(root / "uploads", args.precision, args.seconds, plain_threads=True)]
            for name, make in (("predict", predict), ("mixed", mixed))[:1 if args.throughput_only else 2]:
                for c in levels:
                    used, served = os.times(), process_cpu_seconds(server.pid)
                    r = run_phase(port, c, args.seconds, make, server.pid)
                    wall = os.times().elapsed - used.elapsed
                    # the load generator's own share of the CPUs, which the offline predictor has to itself
                    r["clients"] = (sum(os.times()[:2]) - sum(used[:2])) / wall / os.cpu_count()
                    r["cores"] = (process_cpu_seconds(server.pid) - served) / wall
                    r["peak_rss"] = peak_rss_mib(server.pid)
                    if name == "predict":  # its baseline again, the server idle: the host's speed drifts
                        offline.append(offline_rate(root / "uploads", args.precision, args.seconds))
                        r["offline"] = (offline[-2]["images_per_s"] + offline[-1]["images_per_s"]) / 2
                    phases.append((name, c, r))
            first = offline[0]
            rates = " / ".join(f"{o['images_per_s']:.1f}" for o in offline)
            cpu_ms = " / ".join(f"{o['cpu_ms']:.2f}" for o in offline)
            cores = sorted(o["cores"] for o in offline)
            print(f"offline predictor on the same 640x480 uploads from files, {args.seconds:g} s before the first "
                  f"predict phase and after each: {rates} images/s, {cpu_ms} ms of CPU an image, "
                  f"{cores[0]:.2f}-{cores[-1]:.2f} cores; "
                  f"4 threads decoding uploads and calling the model, without HTTP (once, at first): "
                  f"{first['threads_images_per_s']:.1f} images/s, {first['threads_cores']:.2f} cores, "
                  f"{first['threads_cpu_ms']:.2f} ms an image")
            print("'offline': a predict phase's images/s as a share of the mean of the offline rates just before "
                  "and after it (that mean in brackets)")
            print(f"{'traffic':8} {'conc':>4} {'req/s':>7} {'img/s':>7} {'offline':>16} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'p99 ms':>8} {'peak RSS':>9}  statuses; server CPU")
            for name, c, r in phases:
                per_image = f", {1000 * r['cores'] / r['images_per_s']:.2f} ms an image" if r["images_per_s"] else ""
                share = f"{r['images_per_s'] / r['offline']:.2f}x ({r['offline']:.1f})" if "offline" in r else "-"
                split = f"; connections per process {'+'.join(map(str, r['split']))}" if args.workers > 1 else ""
                print(f"{name:8} {c:4d} {r['requests_per_s']:7.1f} {r['images_per_s']:7.1f} "
                      f"{share:>16} {r['p50']:8.1f} {r['p95']:8.1f} {r['p99']:8.1f} "
                      f"{r['peak_rss']:7.0f} M  {dict(sorted(r['statuses'].items()))}; server used "
                      f"{r['cores']:.2f} cores{per_image}; clients used {r['clients']:.0%} of the CPUs{split}",
                      flush=True)
            if args.throughput_only:
                return

            heat_body, heat_type = uploads[0]
            reference = Client(port).request("POST", "/api/predict?heatmaps=true", heat_body, {"Content-Type": heat_type})
            maps = []
            heat = run_phase(port, 6, args.seconds, lambda rng: ("POST", "/api/predict?heatmaps=true", heat_body,
                                                               {"Content-Type": heat_type}, 1))
            for _ in range(6):
                maps.append(Client(port).request("POST", "/api/predict?heatmaps=true", heat_body,
                                                 {"Content-Type": heat_type}))
            same = sum(m == reference for m in maps) if reference[0] == 200 else 0  # equal errors are no maps
            print(f"heat maps, 6 concurrent clients: {heat['requests_per_s']:.1f} req/s, p50 {heat['p50']:.0f} ms, "
                  f"statuses {heat['statuses']}; {same}/{len(maps)} answers identical to a lone request's")
            print("faults:")
            for case, outcome in faults(root, port, server.pid, indexed):
                print(f"  {case}: {outcome}")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        graceful = "Application shutdown complete" in (root / "serve.log").read_text()
        print(f"SIGTERM: {'graceful shutdown' if graceful else 'NO graceful shutdown'} "
              f"(exit status {server.returncode}: uvicorn re-raises the signal once it has shut down)")


if __name__ == "__main__":
    main()
