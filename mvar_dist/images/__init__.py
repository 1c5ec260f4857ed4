"""Resumable distributed loading of images for tokenizer training (``mvar-dist train-tokenizer``):
the ``data`` section of a tokenizer experiment (:mod:`mvar_dist.images.config`), image folders
and local tar shards of images indexed for random access (:mod:`mvar_dist.images.sources`), the
batches a DataLoader worker decodes and augments (:mod:`mvar_dist.images.batches`) and the train
/ validation loaders (:mod:`mvar_dist.images.loader`). Decoding follows
:mod:`mvar_dist.image_decoding`, the rules ``mvar-dist prep`` uses too. The code-shard loader of
the transformer is :mod:`mvar_dist.data`."""

from mvar_dist.images.config import ImageDataConfig
from mvar_dist.images.loader import build_image_train_loader, build_image_val_loader

__all__ = ["ImageDataConfig", "build_image_train_loader", "build_image_val_loader"]
