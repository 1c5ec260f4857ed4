"""Tokenizers: images <-> multi-scale codes, and the transformer's teacher input.

:class:`MultiScaleVQVAE` is VAR's released tokenizer; :class:`PatchResidualTokenizer` the
quickstart's pixel-patch one. Both follow the :class:`Tokenizer` protocol; build either with
:func:`load_tokenizer`. Imports nothing from training, data loading, tracking or launching.
"""

from mvar_dist.tokenizer.base import Codes, ResidualTokenizer, Tokenizer, check_codes, state_dict_sha256
from mvar_dist.tokenizer.factory import KINDS, kind_of, load_recorded_tokenizer, load_tokenizer
from mvar_dist.tokenizer.patch import PatchResidualTokenizer, QuickstartTokenizerConfig, fit_tokenizer
from mvar_dist.tokenizer.vqvae import MultiScaleVQVAE, TokenizerConfig

__all__ = [
    "Codes", "KINDS", "MultiScaleVQVAE", "PatchResidualTokenizer", "QuickstartTokenizerConfig", "ResidualTokenizer",
    "Tokenizer", "TokenizerConfig", "check_codes", "fit_tokenizer", "kind_of", "load_recorded_tokenizer",
    "load_tokenizer", "state_dict_sha256",
]
