"""Datasets: readers for published layouts, protocols, transforms."""

from .protocols import Fold, Protocol, make_protocol, stratified_kfold, stratified_split, task_targets
from .readers import READERS, load_dataset, parse_spec, register_reader
from .samples import EmotionDataset, LabelFileError, Sample

__all__ = [
    "EmotionDataset", "Fold", "LabelFileError", "Protocol", "READERS", "Sample", "load_dataset", "make_protocol",
    "parse_spec", "register_reader", "stratified_kfold", "stratified_split", "task_targets",
]
