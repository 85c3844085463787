"""Training engine: fit, evaluate, feature caching for frozen backbones, DDP."""

from .data import FeatureCache, compute_features, task_targets_arrays
from .trainer import FitResult, TrainConfig, embed, evaluate, feature_cache, fit, task_metrics

__all__ = ["FeatureCache", "FitResult", "TrainConfig", "compute_features", "embed", "evaluate", "feature_cache", "fit",
           "task_metrics", "task_targets_arrays"]
