"""Planning batches: equal counts across DDP ranks, persistent loaders, augmentation fixed by seed and row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_image
from emolens.data.transforms import train_transform
from emolens.engine.data import ImageFiles, epoch_batches, planned_loader
from emolens.preprocessing import Preprocessing


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_rank_gets_as_many_training_batches_and_every_row_is_seen(world, batch_size):
    rows = list(range(10, 33))  # 23 rows: not a multiple of any world size here
    per_rank = [epoch_batches(rows, batch_size, True, seed=5, rank=r, world=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    seen = {r for batches in per_rank for b in batches for r in b}
    assert seen == set(rows)


def test_evaluation_batches_cover_each_row_once_in_order():
    rows = list(range(7))
    parts = [epoch_batches(rows, 2, False, seed=0, rank=r, world=2) for r in range(2)]
    flat = sorted(r for batches in parts for b in batches for r in b)
    assert flat == rows
    assert epoch_batches(rows, 3, False, seed=9) == [[0, 1, 2], [3, 4, 5], [6]]


def test_training_order_follows_the_seed():
    rows = list(range(50))
    assert epoch_batches(rows, 8, True, seed=1) == epoch_batches(rows, 8, True, seed=1)
    assert epoch_batches(rows, 8, True, seed=1) != epoch_batches(rows, 8, True, seed=2)


def test_balanced_batches_are_shared_out_evenly_across_ranks():
    labels = np.array([0] * 9 + [1] * 5 + [2] * 3)
    per_rank = [epoch_batches(range(17), 6, True, seed=0, rank=r, world=2, balanced_labels=labels) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1


def test_a_persistent_loader_gives_the_same_crops_in_line_and_in_workers(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", size=(64, 48), seed=i) for i in range(4)]
    transform = train_transform(Preprocessing(size=32))
    plan_batches = [[(0, 11), (1, 12)], [(2, 13), (3, 14)]]

    def images(workers):
        loader, plan = planned_loader(paths, transform, workers)
        passes = []
        for _ in range(2):  # the second pass reuses the workers of the first
            plan.batches = plan_batches
            passes.append(torch.cat([b["image"] for b in loader]))
        return passes

    inline, workers = images(0), images(2)
    assert torch.equal(inline[0], inline[1])  # the seeds, not the pass, fix each crop
    assert torch.equal(inline[0], workers[0]) and torch.equal(workers[0], workers[1])
    loader, plan = planned_loader(paths, transform, 0)
    plan.batches = [[(0, 99), (1, 12)]]
    assert not torch.equal(next(iter(loader))["image"][0], inline[0][0])  # another seed, another crop


#: A caller that holds an ONNX Runtime session in a reference cycle, then loads with two workers whose transform
#: collects garbage: a worker forked from the caller frees the session it inherited and waits forever on
#: the session's thread pool (the test run of 2026-12 hung so, after an in-process ``predict``).
CALLER_WITH_A_SESSION = textwrap.dedent("""
    import gc
    import sys

    import numpy as np
    import torch
    from PIL import Image


    class CollectThenTensor:
        def __call__(self, image):
            gc.collect()
            return torch.from_numpy(np.asarray(image, dtype=np.float32))


    if __name__ == "__main__":
        import onnxruntime
        from emolens.engine.data import planned_loader
        from emolens.runtime import packaged_default_onnx

        paths = [f"{sys.argv[1]}/{i}.png" for i in range(4)]
        for i, path in enumerate(paths):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
        gc.disable()
        cycle = {"session": onnxruntime.InferenceSession(str(packaged_default_onnx()),
                                                         providers=["CPUExecutionProvider"])}
        cycle["self"] = cycle
        del cycle
        loader, plan = planned_loader(paths, CollectThenTensor(), workers=2)
        plan.batches = [[0, 1], [2, 3]]
        print(sum(len(batch["index"]) for batch in loader))
""")


def test_workers_do_not_inherit_the_callers_onnx_sessions(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(CALLER_WITH_A_SESSION)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    caller = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    try:
        out, _ = caller.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(caller.pid, signal.SIGKILL)  # the workers too
        caller.communicate()
        pytest.fail("loading with workers hung after the caller had held an ONNX Runtime session")
    assert caller.returncode == 0 and out.split() == ["4"]


def test_the_main_process_random_stream_is_left_alone(tmp_path):
    paths = [write_image(tmp_path / "a.png", size=(64, 48), seed=1)]
    files = ImageFiles(paths, train_transform(Preprocessing(size=32)))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    files[(0, 3)]
    assert torch.equal(torch.rand(3), expected)


def test_one_loader_serves_training_items_with_a_seed_and_evaluation_items_without(tmp_path):
    from emolens.data.transforms import eval_transform

    paths = [write_image(tmp_path / "a.png", size=(64, 48), seed=2)]
    pre = Preprocessing(size=32)
    files = ImageFiles(paths, eval_transform(pre), seeded_transform=train_transform(pre))
    assert torch.equal(files[0]["image"], files[0]["image"])  # evaluation: the fixed view
    assert not torch.equal(files[(0, 5)]["image"], files[0]["image"])  # training: a random crop of its seed
