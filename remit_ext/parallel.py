"""Re-exports of ``remit_ext.distributed`` (vocab, context and data parallelism, and the
vocab-parallel fused-linear heads), kept one release under this name: the design record and the
code are in ``remit_ext/distributed/`` (one module per parallelism)."""

from __future__ import annotations

from .distributed.context_parallel import remit_loss, remit_weights  # noqa: F401
from .distributed.data_parallel import global_num_items, reduce_diagnostics
from .distributed.vocab_parallel import (kd_loss, rho1_loss,  # noqa: F401
                                         vocab_parallel_token_stats, weighted_cross_entropy)
from .distributed.vocab_parallel_linear import (TPHead, unshard_linear,  # noqa: F401
                                                vocab_parallel_linear,
                                                vocab_parallel_linear_loss,
                                                vocab_parallel_linear_stats)

__all__ = [
    "global_num_items",
    "reduce_diagnostics",
    "vocab_parallel_token_stats",
]
