"""Robustness report: the bad-input corpus through every entry point, and SIGKILL loops for `index`
and `train`, as a user runs them (subprocesses; the server through its ASGI app).

For each entry point: inputs tried, inputs handled correctly (a good file has its result; a bad
one is named with its reason) and whether the exit code said "some failed" (3). For each kill loop:
kills that landed mid-run, then whether the resumed result equals an uninterrupted run (rows lost).

    python benchmarks/robustness.py [--kills 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus lives with the tests

from corpus import make_awkward_names, make_bad_images, make_good_images, make_odd_paths  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
EXIT_SOME_FAILED = 3


def emolens(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emolens", *args], env={**ENV, "COLUMNS": "400"},
                          capture_output=True, text=True, errors="replace")


def counted(output: str, good: set[str], bad: dict[str, str], results: set[str]) -> int:
    """Good files with a result plus bad files named in ``output`` beside their reason."""
    flat = " ".join(output.split())
    return len(good & results) + sum(name in flat and word in flat for name, word in bad.items())


def make_corpus(root: Path) -> tuple[Path, set[str], dict[str, str]]:
    folder = root / "photos"
    good = set(make_good_images(folder / "good")) | set(make_awkward_names(folder / "names"))
    bad = {**make_bad_images(folder / "bad"), **make_odd_paths(folder / "odd")}
    return folder, good, bad


def shown(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def entry_points(root: Path, folder: Path, good: set[str], bad: dict[str, str], model: Path) -> list[tuple]:
    rows = []
    tried = len(good) + len(bad)
    good_shown = {shown(n) for n in good}

    r = emolens("predict", str(folder), "--model", str(model), "--format", "json")
    payload = json.loads(r.stdout)
    done = {shown(os.path.basename(p["source"])) for p in payload["predictions"]}
    errors = " ".join(f"{os.path.basename(e['source'])} {e['reason']}" for e in payload["errors"])
    rows.append(("predict", tried, counted(errors, good_shown, bad, done), r.returncode))

    db = root / "db"
    r = emolens("index", str(folder), "--db", str(db), "--model", str(model))
    from emolens.retrieval.index import AffectiveIndex

    store = AffectiveIndex(db)
    indexed = {shown(os.path.basename(store.image_path(i))) for i in store.vectors()[0]}
    store.close()
    rows.append(("index", tried, counted(r.stdout + r.stderr, good_shown, bad, indexed), r.returncode))

    ok = 0
    for name, word in bad.items():
        path = folder / ("bad" if os.path.lexists(folder / "bad" / name) else "odd") / name
        q = emolens("search", str(path), "--db", str(db), "--model", str(model))
        ok += q.returncode == 2 and name in q.stderr + q.stdout and word in " ".join((q.stderr + q.stdout).split())
    for name in sorted((folder / "good").iterdir()):
        q = emolens("search", str(name), "--db", str(db), "--model", str(model), "--format", "json", "-k", "3")
        ok += q.returncode == 0 and len(json.loads(q.stdout)["hits"]) == 3
    rows.append(("search (each file as the query)", len(bad) + len(list((folder / "good").iterdir())), ok, None))

    r = emolens("explain", str(folder), "--model", "default", "--out", str(root / "explained"))
    pngs = len(list((root / "explained").glob("*.png")))  # output names are made file-system safe
    rows.append(("explain", tried, min(pngs, len(good)) + counted(r.stdout + r.stderr, set(), bad, set()),
                 r.returncode))

    rows.append(training_row(root, folder, bad))
    rows.append(server_row(folder, good, bad, model))
    return rows


def training_row(root: Path, folder: Path, bad: dict[str, str]) -> tuple:
    """A dataset whose images include the corpus's bad files: `datasets info` and `train` go on."""
    from helpers import make_ldl_dataset

    spec = make_ldl_dataset(root / "data", per_class=6)
    images = sorted((root / "data" / "images").iterdir(), key=lambda p: int(p.stem))
    broken = {}
    for target, source in zip(images, sorted((folder / "bad").iterdir())):
        target.write_bytes(source.read_bytes())
        broken[target.name] = bad[source.name]
    info = emolens("datasets", "info", spec, "--check-images")
    ok = counted(info.stdout + info.stderr, set(), broken, set())
    run = root / "run"
    train = emolens("train", "--model", "global", "--data", spec, "--out", str(run), "--backbone", "test_efficientnet",
                    "--backbone-weights", "none", "--epochs", "1", "--batch-size", "4", "--workers", "0")
    left_out = json.loads((run / "metrics.json").read_text())["bad_images"]
    ok += sum(any(p.endswith("/" + n) and w in r for p, r in left_out.items()) for n, w in broken.items())
    codes = {info.returncode, train.returncode}
    return (f"datasets info + train ({len(images)} images, {len(broken)} bad)", 2 * len(broken), ok,
            codes.pop() if len(codes) == 1 else codes)


def server_row(folder: Path, good: set[str], bad: dict[str, str], model: Path) -> tuple:
    from fastapi.testclient import TestClient

    from emolens.server import create_app

    client = TestClient(create_app(model, None), base_url="http://127.0.0.1", raise_server_exceptions=False)
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK)]
    ok = 0
    for p in files:
        r = client.post("/api/predict", files=[("files", (shown(p.name), p.read_bytes(), "image/png"))])
        if p.name in good:
            ok += r.status_code == 200
        else:
            ok += r.status_code == 400 and bad[p.name] in r.json().get("error", "")
    return ("server /api/predict (one upload per file)", len(files), ok, None)


def index_kills(root: Path, model: Path, kills: int, rng: random.Random) -> tuple[int, int, int]:
    """(kills that landed mid-run, rows lost or different, total rows)."""
    from PIL import Image
    import numpy as np

    photos = root / "kill-photos"
    for i in range(60):
        arr = np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        (photos / f"{i // 20}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(photos / f"{i // 20}" / f"{i:02d}.jpg")
    base = [sys.executable, "-m", "emolens", "index", str(photos), "--model", str(model), "--batch-size", "2"]
    subprocess.run([*base, "--db", str(root / "whole")], env=ENV, capture_output=True, check=True)
    landed = 0
    for _ in range(kills):
        proc = subprocess.Popen([*base, "--db", str(root / "killed")], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        done, target = -1, indexed_rows(root / "killed") + rng.randint(1, 12)  # kill after a random few more images
        while proc.poll() is None and done < target:
            done = indexed_rows(root / "killed")
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += done < 60
        proc.wait()
    subprocess.run([*base, "--db", str(root / "killed")], env=ENV, capture_output=True, check=True)

    def rows(db):
        with sqlite3.connect(db / "index.sqlite") as con:
            return set(con.execute("SELECT path, size, mtime_ns, emotion, distribution, embedding FROM images"))

    whole, killed = rows(root / "whole"), rows(root / "killed")
    return landed, len(whole ^ killed), len(whole)


def indexed_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db / "index.sqlite", timeout=0.1) as con:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked by the writer for a moment
        return 0


def train_kills(root: Path, kills: int, rng: random.Random) -> tuple[int, bool]:
    """(kills that landed mid-run, whether the resumed run equals the uninterrupted one)."""
    from helpers import make_ldl_dataset

    spec = make_ldl_dataset(root / "train-data", per_class=6)
    base = [sys.executable, "-m", "emolens", "train", "--model", "global:loss=multitask", "--data", spec,
            "--backbone", "test_efficientnet", "--backbone-weights", "none", "--epochs", "8", "--batch-size", "4",
            "--workers", "0", "--optimizer", "adamw", "--lr", "3e-3", "--patience", "0"]
    subprocess.run([*base, "--out", str(root / "t-whole")], env=ENV, capture_output=True, check=True)
    landed = 0
    for attempt in range(kills):
        proc = subprocess.Popen([*base, "--out", str(root / "t-killed")] + (["--resume"] if attempt else []), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 5.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
    subprocess.run([*base, "--out", str(root / "t-killed"), "--resume"], env=ENV, capture_output=True, check=True)
    a, b = (json.loads((root / d / "last.json").read_text())["history"] for d in ("t-whole", "t-killed"))
    same = len(a) == len(b) and all(abs(x["train_loss"] - y["train_loss"]) <= 1e-6 * abs(x["train_loss"]) and
                                    abs(x["val_loss"] - y["val_loss"]) <= 1e-6 * abs(x["val_loss"]) for x, y in zip(a, b))
    return landed, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs per loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["EMOLENS_CACHE"] = ENV["EMOLENS_CACHE"] = str(root / "cache")
        folder, good, bad = make_corpus(root)
        model = root / "default.onnx"
        emolens("export", "--onnx", str(model))
        print(f"corpus: {len(good)} good files in awkward modes or names, {len(bad)} bad ones "
              f"({'as root: no permission case' if os.geteuid() == 0 else 'with an unreadable file'})")
        total_tried = total_ok = 0
        for name, tried, ok, code in entry_points(root, folder, good, bad, model):
            exit_note = "" if code is None else f", exit code {code}" + (" (some failed)" if code == EXIT_SOME_FAILED else "")
            print(f"  {name}: {tried} tried, {ok} handled correctly{exit_note}")
            total_tried, total_ok = total_tried + tried, total_ok + ok
        print(f"inputs: {total_tried} tried, {total_ok} handled correctly")
        landed, lost, total = index_kills(root, model, args.kills, rng)
        print(f"index: {landed} SIGKILLs landed mid-run, resumed: {total - lost}/{total} rows identical to an "
              f"uninterrupted run, data lost {lost}")
        landed, same = train_kills(root, args.kills, rng)
        print(f"train: {landed} SIGKILLs landed mid-run, resumed run {'identical to' if same else 'DIFFERS from'} an "
              f"uninterrupted one at the same seed")


if __name__ == "__main__":
    main()
