"""remit_ext: fused kernels for token-reweighted LLM training (ReMiT, Rho-1, KD).

The semantics every backend follows are in METHODS.md (shared/spec); the readable references
are in ``remit_ext.reference``.
"""

import torch  # noqa: F401  (the extension has no RUNPATH: libtorch must be loaded first)

from ._build import build_info
from . import _meta  # noqa: F401  (registers _fakes_autograd; also loaded by the C++ library)
from ._backends import BackendUnavailableError, available_backends
from ._checks import get_validation, set_validation, validation
from .functional import (
    PolicyGradientOutput,
    ReMiTOutput,
    ReMiTWeights,
    TokenStats,
    kd_loss,
    policy_gradient_loss,
    remit_loss,
    remit_weights,
    rho1_loss,
    token_stats,
    weighted_cross_entropy,
)
from .linear import LinearLossOutput, LinearTokenStats, linear_token_stats, remit_linear_loss
from .modules import LinearReMiTLoss, ReMiTLoss
from .reference import ReMiTDiagnostics

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LinearLossOutput",
    "LinearReMiTLoss",
    "LinearTokenStats",
    "PolicyGradientOutput",
    "ReMiTDiagnostics",
    "ReMiTLoss",
    "ReMiTOutput",
    "ReMiTWeights",
    "TokenStats",
    "available_backends",
    "build_info",
    "get_validation",
    "kd_loss",
    "linear_token_stats",
    "policy_gradient_loss",
    "remit_linear_loss",
    "remit_loss",
    "remit_weights",
    "rho1_loss",
    "set_validation",
    "token_stats",
    "validation",
    "weighted_cross_entropy",
]
