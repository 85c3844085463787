"""Training engine: fit, evaluate, feature caching for frozen backbones, DDP."""

from .data import FeatureCache, build_cache, open_cache, plan_cache, task_targets_arrays
from .trainer import FitResult, TrainConfig, embed, evaluate, feature_cache, fit, task_metrics

__all__ = ["FeatureCache", "FitResult", "TrainConfig", "build_cache", "embed", "evaluate", "feature_cache", "fit",
           "open_cache", "plan_cache", "task_metrics", "task_targets_arrays"]
