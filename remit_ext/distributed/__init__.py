"""Distributed forms of the losses, one module per parallelism: vocab parallel (``tp_group``),
context parallel ReMiT centring (``cp_group``), data-parallel diagnostics and token counts
(``dp_group``), and sharded fused-linear heads (vocab rows over ``tp_group``; FSDP2).

The public functions (``remit_ext.functional``, ``remit_ext.linear``) route here when given a
group or a DTensor; this package imports only the layers below the public API (checks,
backends, the fused-linear engine), never the public modules.

Package layout:

- ``_groups``: ProcessGroup / 1-D DeviceMesh parsing, the rank-ordered all_gather, the
  handshake table.
- ``vocab_parallel``: vocab-sharded logits (``tp_group=``): shard statistics, their
  combination, the TP forms of weighted CE, Rho-1 and KD.
- ``context_parallel``: ReMiT's centring over ``cp_group``; ``remit_loss`` with tp / cp groups.
- ``data_parallel``: ``global_num_items``, ``reduce_diagnostics`` (``dp_group=``).
- ``vocab_parallel_linear``: fused-linear heads sharded over vocab rows (``tp_group=``, or a
  DTensor ``Shard(0)`` head with DTensor hidden).
- ``fsdp``: fused-linear heads sharded by FSDP2 / HSDP (DTensor heads, plain hidden).

One handshake-and-refusal protocol (``_groups._handshake``): before its first collective
every rank all-gathers a row of facts about its call with a status last; a rank that refused
its inputs still joins, with status 0, so its peers raise instead of waiting, and every rank
reads the same table, so all raise together. Vocab parallel gathers it over ``tp_group``
(``vocab_parallel._VocabLayout``), context parallel over ``cp_group`` (the number of
sequences), the FSDP2 heads over each dim of their mesh in turn, folding the table to its
minima and the negated maxima between dims (``fsdp._mesh_handshake``). Refusals join it on the
fused-linear heads (``vocab_parallel_linear.TPHead.refuse``, ``fsdp``); the logits-level
tensor- and context-parallel entry points check their arguments before the handshake without
joining it, so a check that fails on one rank only leaves its peers waiting (arguments that are
the same on every rank fail on every rank).

torch.compile: every distributed entry point here runs eagerly, a graph break (they check
process groups and meshes, read the handshake on the host and issue collectives from
autograd.Functions); the compiled model around them is unaffected.
"""

from __future__ import annotations

from .data_parallel import global_num_items, reduce_diagnostics
from .vocab_parallel import vocab_parallel_token_stats

__all__ = ["global_num_items", "reduce_diagnostics", "vocab_parallel_token_stats"]
