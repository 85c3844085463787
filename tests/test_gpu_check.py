"""benchmarks/gpu_check.py, the GPU check the README's GPU figures come from, runs here on the CPU: a recipe's model on
its own backbone layout trains through the engine's placement, under torchrun with 2 gloo processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_a_recipe_under_torchrun_on_the_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(SCRIPT), "--device", "cpu", "--precisions", "bf16", "--steps", "1", "--batch-size", "2",
           "--recipes", "004_multigap_fi8", "--out", str(tmp_path / "check.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert row["recipe"] == "004_multigap_fi8" and row["backbone"] == "mobilenetv2_100" and row["processes"] == 2
    assert row["images_per_s"] > 0
    assert row["frozen_unreached"] == 4  # VGG16's fc6 and fc7, which Multi-GAP's blocks never read
    assert done.stdout.count("images/s") == 1  # rank 0 reports
