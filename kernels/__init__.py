"""Attention kernels for mvar-dist, installed as ``mvar_dist.kernels``.

``reference`` holds the torch implementations (the CPU path and the ground truth); the Triton
kernels import triton lazily so that CPU-only installs never need it.
"""
