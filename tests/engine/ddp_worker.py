"""Run by torchrun in test_distributed: a few steps of fit, then each rank saves what it holds."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_model  # noqa: E402

from emolens.data import load_dataset, make_protocol  # noqa: E402
from emolens.engine import TrainConfig, fit  # noqa: E402
from emolens.engine.distributed import init_distributed  # noqa: E402

spec, out, accumulate = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rank, world = init_distributed()
ds = load_dataset(spec)
fold = make_protocol(ds, "split", seed=0, fractions=(0.6, 0.2, 0.2)).folds[0]
torch.manual_seed(0)
model = tiny_model()
result = fit(model, ds, fold, out / "run", TrainConfig(epochs=2, batch_size=4, workers=0, optimizer="adamw", lr=1e-2,
                                                         patience=None, accumulate=accumulate), progress=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.txt").write_text(f"{world} {result.val_metrics['n']} {result.best_epoch}")
