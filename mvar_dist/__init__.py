"""mvar-dist: distributed training of MVAR, Markovian Visual AutoRegressive image generation."""

__version__ = "0.1.0"
