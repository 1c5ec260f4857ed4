"""Memory a training step needs, counted exactly: the activations autograd saves for backward
(:mod:`mvar_dist.memory.activations`). Imports the model and the trainer's loss, nothing that
needs DeepSpeed, so planning tools load it without the training stack."""

from mvar_dist.memory.activations import (
    ActivationCount,
    activation_bytes,
    activation_peak_bytes,
    count_activations,
    count_saved,
    paper_model_config,
    pass_groups,
)

__all__ = [
    "ActivationCount", "activation_bytes", "activation_peak_bytes", "count_activations", "count_saved",
    "paper_model_config", "pass_groups",
]
