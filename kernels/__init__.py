"""Attention kernels for mvar-dist, installed as ``mvar_dist.kernels``.

``reference`` holds the torch implementations (the CPU path and the ground truth);
``neighborhood`` holds the Triton kernels and imports triton, so callers import it only when
they run on a GPU (the dispatcher in ``mvar_dist.model.attention`` does).
"""
