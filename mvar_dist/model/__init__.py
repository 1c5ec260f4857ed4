"""The MVAR / VAR transformer: config, attention patterns, blocks, the model and its sampler.

Imports nothing from training, data loading, tracking or launching: a user who only samples
from an exported model needs torch, safetensors and this package.
"""

from mvar_dist.model.config import Mode, MVARConfig
from mvar_dist.model.transformer import MVAR

__all__ = ["MVAR", "MVARConfig", "Mode"]
