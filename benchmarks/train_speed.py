"""Training throughput and peak memory: emolens's `fit` for `global` and each paper model, at fp32 and at
bf16 + channels_last, beside a plain PyTorch loop (DataLoader, timm backbone + linear layer, SGD,
cross-entropy) over the same images, backbone and precision, measured in the same run.

Each measurement runs in its own process (a clean peak memory): one epoch of full fine-tuning over N
images; emolens's figure includes what `fit` does around the steps (a validation pass over a few images,
the checkpoints it writes).

    python benchmarks/train_speed.py [--n 128] [--models global,apse,maiafa,mlrcnn,multigap] [--device auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the synthetic dataset maker lives with the tests

VAL_IMAGES = 8


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_emolens(spec: str, data: str, precision: str, device: str, batch: int, workers: int) -> dict:
    import torch

    from emolens.data import load_dataset
    from emolens.data.protocols import Fold
    from emolens.engine import TrainConfig, fit
    from emolens.models import create_model

    ds = load_dataset(data)
    rows = list(range(len(ds)))
    fold = Fold(rows[VAL_IMAGES:], rows[:VAL_IMAGES], [])
    torch.manual_seed(0)
    model = create_model(spec, taxonomy=ds.taxonomy, task="emotion")
    config = TrainConfig(epochs=1, batch_size=batch, workers=workers, optimizer="sgd", lr=1e-3, patience=None,
                         device=device, precision=precision, channels_last=precision != "fp32")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        fit(model, ds, fold, out, config, progress=False)
        seconds = time.perf_counter() - start
    return {"images_per_s": len(fold.train) / seconds, "peak_mib": peak_memory_mib(config.placement().device)}


def run_plain(data: str, precision: str, device: str, batch: int, workers: int) -> dict:
    """What a researcher would write by hand: no emolens in the loop."""
    import timm
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from emolens.engine.placement import resolve_device

    where = resolve_device(device)
    root = Path(data.split("=", 1)[1])
    lines = (root / "ground_truth.txt").read_text().split("\n")[1:]
    items = [(root / "images" / f.split()[0], int(max(range(8), key=lambda i: float(f.split()[1 + i]))))
             for f in lines if f.strip()][VAL_IMAGES:]
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    class Files(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            return tf(Image.open(path).convert("RGB")), label

    torch.manual_seed(0)
    net = torch.nn.Sequential(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0),
                              torch.nn.Linear(1280, 8)).to(where)
    if precision != "fp32":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers, pin_memory=where.type == "cuda")
    autocast = torch.autocast(where.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    net.train()
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(where, non_blocking=True), labels.to(where, non_blocking=True)
        if precision != "fp32":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if where.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": len(items) / seconds, "peak_mib": peak_memory_mib(where)}


def measure(args, what: str, precision: str, data: str) -> dict:
    command = [sys.executable, str(HERE), "--one", what, "--precision", precision, "--data", data, "--device",
               args.device, "--batch", str(args.batch), "--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="synthetic training images (+8 for validation)")
    ap.add_argument("--models", default="global,apse,maiafa,mlrcnn,multigap")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; medians are shown")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run = (run_plain(args.data, args.precision, args.device, args.batch, args.workers) if args.one == "plain" else
               run_emolens(args.one, args.data, args.precision, args.device, args.batch, args.workers))
        print(json.dumps(run))
        return
    from helpers import make_ldl_dataset

    from emolens.engine.placement import resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        per_class = -(-(args.n + VAL_IMAGES) // 4)
        data = make_ldl_dataset(Path(tmp) / "data", per_class=per_class, size=(320, 240))
        print(f"device {resolve_device(args.device)}; {4 * per_class - VAL_IMAGES} training images 320x240, "
              f"batch {args.batch}, {args.workers} loader workers, one epoch of full fine-tuning on EfficientNet-Lite0")
        print(f"{'model':10} {'precision':16} {'images/s':>9} {'vs plain':>9} {'peak MiB':>9}")
        for precision in args.precisions.split(","):
            shown = precision + (" + channels_last" if precision != "fp32" else "")
            # Interleaved repeats and medians: a shared machine's load drifts between runs.
            runs: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for name in ["plain", *args.models.split(",")]:
                    runs.setdefault(name, []).append(measure(args, name, precision, data))
            plain = median_run(runs.pop("plain"))
            if "error" in plain:
                print(f"{'plain loop':10} {shown:16} {plain['error']}")
                continue
            print(f"{'plain loop':10} {shown:16} {plain['images_per_s']:9.1f} {'1.00x':>9} {plain['peak_mib']:9.0f}")
            for spec, measured in runs.items():
                r = median_run(measured)
                if "error" in r:
                    print(f"{spec:10} {shown:16} {r['error']}")
                    continue
                print(f"{spec:10} {shown:16} {r['images_per_s']:9.1f} "
                      f"{r['images_per_s'] / plain['images_per_s']:8.2f}x {r['peak_mib']:9.0f}", flush=True)


def median_run(runs: list[dict]) -> dict:
    """The median throughput and the largest peak memory of repeated runs (the first error, if any failed)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {"images_per_s": float(np.median([r["images_per_s"] for r in runs])),
            "peak_mib": max(r["peak_mib"] for r in runs)}

if __name__ == "__main__":
    main()
