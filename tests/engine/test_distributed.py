import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_ldl_dataset

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("accumulate", [1, 3])  # 3: gradients exchanged once per step, and at the epoch's end
def test_two_cpu_processes_train_in_step(tmp_path, accumulate):
    spec = make_ldl_dataset(tmp_path / "data", per_class=6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(WORKER), spec, str(tmp_path), str(accumulate)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # torchrun's log folders stay in the test's own folder
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics are gathered over ranks: both saw the whole validation part and chose the same epoch
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    assert (tmp_path / "rank0.txt").read_text().startswith("2 ")
    # only rank 0 writes checkpoints, once
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) == ["best.safetensors", "last.safetensors"]
