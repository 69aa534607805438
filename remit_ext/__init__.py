"""remit_ext: fused kernels for token-reweighted LLM training (ReMiT, Rho-1, KD).

The semantics every backend follows are in docs/METHODS.md (a copy of shared/spec); the references
are in ``remit_ext.reference``.

Layers: a module imports only its own layer and those above it here, never below, and no
import circle (``python_tests/test_layers.py`` walks every import, function-level ones too):

- L0 ``reference``, ``_checks``, ``_methods`` (the fused-linear method table), ``_build`` (+
  the compiled ``_C``), ``testing``, ``_source_tree``, ``_files``: leaves.
- L1 ``_grads`` (the closed-form logits gradients, one copy each), ``_fakes_autograd``,
  ``triton/``: the registered ops' Python side (fakes, autograd) and the Triton kernels and
  ops.
- L2 ``_backends``: the dispatcher; each backend's logits ops and fused-linear chunk primitives.
- L3 ``_linear_plan``, ``_linear_engine``, ``_linear_ops``, ``_linear_local``: the fused-linear
  chunk planning, engine, registered ops and plain-tensor entry points.
- L4 ``distributed/``: one module per parallelism (vocab, context, data, vocab-parallel
  fused-linear heads, FSDP2 heads).
- L5 ``functional``, ``linear``, ``modules`` (+ the ``parallel`` / ``fsdp`` re-export shims and
  this package): the public API, checking and routing plain / distributed.
- L6 ``rmt``, ``demo``, ``hf/``, ``train/``, ``bench/`` (the benchmark suite), ``__main__``: users
  of the API.
"""

import torch  # noqa: F401  (the extension has no RUNPATH: libtorch must be loaded first)

from ._source_tree import use_installed_copy

# A checkout's remit_ext/ without a compiled _C, found first because Python was started in the
# checkout's root after a plain (non-editable) install, is replaced by the installed copy
# (_source_tree.py); the imports below then only bind that copy's names in this module object,
# which `import` discards for it.
use_installed_copy(__name__, __path__[0])

from ._build import build_info
from . import _fakes_autograd  # noqa: F401  (the C++ ops' fakes and autograd)
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
