"""How much a trained run's own maps (MAI-AFA's region map D, APSE's attention, MLR-CNN's class activation) vary
over each image, how its level weights (MAI-AFA's psi) vary between images, and how MLR-CNN's region scores
spread and how often its top class survives without its regions, on its fold's test images.

    python benchmarks/map_spread.py results/emotionroi/emotionroi_003_maiafa/imagenet/maiafa_width=32/fold0

A map that multiplies features (D in E = D * F + F) selects nothing when it is nearly constant over the image:
its spatial std is then near 0 and its effective share (exp of the entropy of the map normalised to sum 1, over
the number of positions) near 1; a one-hot map has an effective share of 1 / positions. ``--untrained`` adds the
same figures for the same model freshly initialised on the run's backbone (its own batch-norm layers on each
batch's statistics, since fresh running statistics are the identity): what training changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from emolens.data import load_dataset
from emolens.data.transforms import eval_transform
from emolens.weights import load_model, model_from_meta


def spread(maps: torch.Tensor) -> dict[str, float]:
    """Per-image spatial statistics of non-negative maps (B, H, W), averaged over the images."""
    flat = maps.flatten(1).float()
    share = flat / flat.sum(1, keepdim=True).clamp_min(1e-12)
    effective = torch.exp(-(share * share.clamp_min(1e-12).log()).sum(1)) / flat.shape[1]
    return {"mean": float(flat.mean()), "spatial_std": float(flat.std(1).mean()),
            "effective_share": float(effective.mean()), "min_effective_share": float(effective.min())}


def region_score_spread(scores: list[torch.Tensor]) -> dict[str, float]:
    """MLR-CNN's region scores S_emo (one tensor of its top regions per image): their mean, their spread between
    the regions of an image, and the spread of an image's mean score between images."""
    means = torch.stack([s.float().mean() for s in scores])
    return {"mean": float(torch.cat(scores).float().mean()),
            "std_within_image": float(torch.stack([s.float().std() for s in scores]).mean()),
            "std_between_images": float(means.std())}


def regions_zeroed_agreement(model, outputs: dict) -> torch.Tensor:
    """Per image, whether MLR-CNN's top class stays the same with its region features zeroed in the classifier's
    input (global features first, then the regions'): how much its decision leans on the regions."""
    embedding = outputs["embedding"].clone()
    embedding[:, model.backbone.num_features:] = 0
    return model.classifier(embedding).argmax(1) == outputs["logits"].argmax(1)


def untrained_like(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s spec freshly initialised around ``model``'s backbone, its own batch norms on batch statistics."""
    fresh = model_from_meta(model.meta)
    fresh.backbone.load_state_dict(model.backbone.state_dict())
    fresh.eval()
    for name, module in fresh.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith("backbone."):
            module.train()
    return fresh


def run_spread(run: Path, images: int, untrained: bool = False, batch_size: int = 32) -> dict:
    """The spread of every explanation map and of the level weights of ``run`` (a fold folder), or of its model
    freshly initialised, on up to ``images`` of its test images."""
    card = json.loads((run / "best.json").read_text())
    dataset = load_dataset(card["dataset"])
    model = load_model(run).eval()
    if untrained:
        model = untrained_like(model)
    view = eval_transform(model.preprocessing)
    maps: dict[str, list[torch.Tensor]] = {}
    weights, region_scores, kept = [], [], []
    test = card["split"]["test"][:images]
    with torch.no_grad():
        for start in range(0, len(test), batch_size):
            batch = torch.stack([view(Image.open(dataset.samples[i].path).convert("RGB"))
                                 for i in test[start:start + batch_size]])
            outputs = model(batch)
            for name, values in model.explanation_maps(outputs).items():
                maps.setdefault(name, []).append(values)
            if "level_weights" in outputs:
                weights.append(outputs["level_weights"])
            if "box_scores" in outputs:
                region_scores += outputs["box_scores"]
                if model.features == "both":
                    kept.append(regions_zeroed_agreement(model, outputs))
    report: dict = {"run": str(run), "untrained": untrained, "images": len(test),
                    "maps": {name: spread(torch.cat(v)) for name, v in maps.items()}}
    if weights:
        psi = torch.cat(weights)
        report["level_weights"] = {"mean": psi.mean(0).tolist(), "std_over_images": psi.std(0).tolist()}
    if region_scores:
        report["region_scores"] = region_score_spread(region_scores)
    if kept:
        report["top_class_kept_without_regions"] = float(torch.cat(kept).float().mean())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="fold folders of emolens train or benchmark runs")
    parser.add_argument("--images", type=int, default=160, help="test images per run (the first of its split)")
    parser.add_argument("--untrained", action="store_true", help="also measure each model freshly initialised")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    reports = []
    for run in args.runs:
        if not (run / "best.json").is_file():
            parser.error(f"{run} holds no best.json: give a fold folder of a finished run")
    states = (False, True) if args.untrained else (False,)
    for run, untrained in [(run, untrained) for run in args.runs for untrained in states]:
        report = run_spread(run, args.images, untrained)
        reports.append(report)
        print(f"{run}{', untrained' if untrained else ''} ({report['images']} test images)")
        for name, figures in report["maps"].items():
            print(f"  {name}: mean {figures['mean']:.3f}, spatial std {figures['spatial_std']:.3f}, effective share "
                  f"{figures['effective_share']:.3f} (lowest {figures['min_effective_share']:.3f})")
        if "level_weights" in report:
            lw = report["level_weights"]
            print("  level weights, coarse to fine: mean " + " ".join(f"{v:+.3f}" for v in lw["mean"])
                  + "; std over images " + " ".join(f"{v:.3f}" for v in lw["std_over_images"]))
        if "region_scores" in report:
            rs = report["region_scores"]
            print(f"  region scores S_emo: mean {rs['mean']:.3f}, std within an image {rs['std_within_image']:.3f}, "
                  f"std of an image's mean between images {rs['std_between_images']:.3f}")
        if "top_class_kept_without_regions" in report:
            print(f"  top class kept with the regions zeroed: {report['top_class_kept_without_regions']:.3f} of images")
        if not report["maps"] and "level_weights" not in report:
            print("  the model draws no maps and weighs no levels")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
