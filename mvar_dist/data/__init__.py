"""Resumable distributed loading of code shards: the ``data`` config section, the rank's window
plan, the window reader (DataLoader workers) and the train / validation loaders. Never imports
training code."""

from mvar_dist.data.config import DataConfig
from mvar_dist.data.loader import (
    TrainLoader,
    ValLoader,
    build_train_loader,
    build_val_loader,
    window_reader,
)
from mvar_dist.data.reader import BadDataError

__all__ = ["BadDataError", "DataConfig", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader", "window_reader"]
