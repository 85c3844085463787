"""GPU check: every recipe's model, on its own backbone layout (random weights), trains a few steps at each
precision on synthetic batches of the recipe's size (224 px images, its batch size per GPU), through the
engine's own placement, DDP wrapping and loss. Prints images/s per recipe and precision (all processes
together) and the peak GPU memory of one process; writes them as JSON with ``--out``.

On every visible GPU (one process each):  bash benchmarks/gpu_check.sh
One process, or a CPU smoke run:          python benchmarks/gpu_check.py [--device cpu --precisions bf16 --steps 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emolens.engine.distributed import init_distributed, is_main, leave
from emolens.engine.placement import Placement
from emolens.engine.trainer import _Forward, freeze_unreached, step_optimizer
from emolens.losses import build_loss
from emolens.models import EmotionModel, create_model
from emolens.recipes import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
#: The label space of each dataset a recipe names.
TAXONOMY = {"fi": "mikels", "emotionroi": "emotionroi", "twitter1": "polarity"}
#: Model arguments that name weight files: random weights stand in for them.
FILE_ARGS = ("detector_weights", "stream_weights")


def recipe_model(recipe):
    """The recipe's model on its own backbone, random weights (files it would read left out)."""
    name, _, args = recipe.settings["models"].partition(":")
    kept = ",".join(a for a in args.split(",") if a and a.split("=")[0] not in FILE_ARGS)
    spec = f"{name}:{kept}" if kept else name
    return create_model(spec, taxonomy=TAXONOMY[recipe.dataset], task=recipe.settings["task"],
                        backbone=recipe.settings["backbone"], backbone_weights=None)


def synthetic_batch(model, batch_size: int, placement: Placement) -> dict:
    """Images of the model's input size and the targets its loss reads: labels, and stimuli boxes where the
    model learns its detector from them."""
    size = model.preprocessing.size
    batch = {"images": torch.randn(batch_size, 3, size, size),
             "targets": {"label": torch.randint(0, model.num_classes, (batch_size,))}}
    if "region_boxes" in model.target_keys:
        corner = torch.rand(batch_size, 1, 2) * size / 2
        batch["targets"]["region_boxes"] = torch.cat([corner, corner + size / 3], -1)
    return placement.batch(batch)


def measure(recipe, precision: str, device: str, steps: int, batch_size: int | None, world: int) -> dict:
    placement = Placement.resolve(device, precision, channels_last=device != "cpu")  # NHWC: GPUs' fast path
    torch.manual_seed(0)
    model = placement.model(recipe_model(recipe))
    model.start_epoch(0)  # a staged model (mlrcnn) in its first stage, as fit starts it
    loss_fn = placement.model(build_loss(model.spec["loss"]["name"], model.taxonomy, **model.spec["loss"]["args"]))
    batch = synthetic_batch(model, batch_size or recipe.settings["batch_size"], placement)
    model.train()
    if recipe.settings.get("freeze_backbone"):
        model.backbone.requires_grad_(False)
        model.backbone.eval()

    def loss_of(runner) -> torch.Tensor:
        with placement.autocast():
            outputs = runner(batch)
            return loss_fn(outputs, batch["targets"]) + sum(outputs.get("losses", {}).values())

    staged = type(model).start_epoch is not EmotionModel.start_epoch  # as fit decides how DDP finds gradients
    frozen = freeze_unreached(model, lambda: loss_of(_Forward(model, "images"))) if world > 1 and not staged else []
    runner = placement.training_step(_Forward(model, "images"), world, find_unused_parameters=staged)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=recipe.settings["lr"], momentum=0.9,
                          weight_decay=recipe.settings.get("weight_decay", 0.0))
    scaler = placement.grad_scaler()
    cuda = placement.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(placement.device)
    timed = []
    for step in range(2 + steps):  # two warm-up steps (cuDNN's autotuning, allocator)
        if cuda:
            torch.cuda.synchronize(placement.device)
        start = time.perf_counter()
        scaler.scale(loss_of(runner)).backward()
        step_optimizer(opt, scaler)
        if cuda:
            torch.cuda.synchronize(placement.device)
        if step >= 2:
            timed.append(time.perf_counter() - start)
    images = batch["images"].shape[0] * world
    return {"recipe": recipe.name, "model": model.spec["name"], "backbone": recipe.settings["backbone"],
            "precision": precision, "batch_per_process": batch["images"].shape[0], "processes": world,
            "images_per_s": images * len(timed) / sum(timed),
            "peak_gib": torch.cuda.max_memory_allocated(placement.device) / 2**30 if cuda else float("nan"),
            "frozen_unreached": len(frozen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="per process (default: the recipe's)")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    _, world = init_distributed("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    names = [n for n in args.recipes.split(",") if n]
    # the recipes of the papers' GPU protocols (those of this project's CPU protocol train on cached features)
    recipes = [r for r in map(load_recipe, sorted(RECIPES.glob("*.toml"))) if not r.cpu_protocol
               and (not names or r.name in names)]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    rows = []
    for recipe in recipes:
        for precision in args.precisions.split(","):
            row = measure(recipe, precision, args.device, args.steps, args.batch_size, world)
            rows.append(row)
            if is_main():
                print(f"{device_name} x{world}  {row['recipe']:32s} {precision}  {row['images_per_s']:8.1f} images/s  "
                      f"peak {row['peak_gib']:.1f} GiB  (batch {row['batch_per_process']} per process)", flush=True)
    if is_main() and args.out:
        args.out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
    leave(together=True)


if __name__ == "__main__":
    main()
