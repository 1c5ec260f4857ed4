"""``mvar_dist.attention.neighborhood_attention``, the documented entry point of the k x k
neighbourhood attention; it lives in :mod:`mvar_dist.model.attention`."""

from mvar_dist.model.attention import AttentionPlan, neighborhood_attention

__all__ = ["AttentionPlan", "neighborhood_attention"]
