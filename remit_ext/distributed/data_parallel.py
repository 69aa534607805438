"""Data parallelism (``dp_group=``, ``global_num_items``, ``reduce_diagnostics``).

Data parallel. ``global_num_items`` gives the valid-token count of the whole global batch as a
0-d tensor for ``num_items_in_batch``; ``reduce_diagnostics`` (or ``dp_group=`` on
``remit_loss`` / ``remit_weights``) turns per-rank ReMiT diagnostics into global ones.

Gradient averaging. DDP, FSDP2 and TorchTitan average parameter gradients over the ranks that
hold different data (the data- and context-parallel ranks; tensor-parallel ranks hold the same
tokens and do not average). With ``reduction="mean"`` a rank's loss divides by its own count, so
the averaged gradient equals the global mean only when every rank has as many valid tokens.
For exact global-batch semantics pass ``num_items_in_batch=global_num_items(targets, group,
per_rank=True)`` with ``group`` the ranks that average (data x context parallel): the global
count divided by their number, so that averaging W rank losses of ``sum_r / (count / W)`` gives
``sum / count``.

"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as chk
from ..reference import ReMiTDiagnostics, remit_diag_from_sums
from ._groups import _eager, _gather, _group

__all__ = ["global_num_items", "reduce_diagnostics"]


@_eager
def reduce_diagnostics(diagnostics: ReMiTDiagnostics, targets: Tensor, group, *,
                       ignore_index: int = -100, name: str = "group") -> ReMiTDiagnostics:
    """Per-rank ReMiT diagnostics (over this rank's valid ``targets``) combined into those of
    all ranks of ``group`` (data parallel: each rank its own batch shard), weighted by the
    ranks' valid-token counts. One small all_gather, no host sync. ``name``: the argument
    ``group`` came in as, for error messages (``dp_group`` from the losses)."""
    group, _, world = _group(group, name)
    d = [x.detach().to(torch.float64) for x in diagnostics]
    n = (targets != ignore_index).sum().to(torch.float64)
    local = torch.stack([n, n * d[0], n * (d[1] * d[1] + d[0] * d[0]), n * d[2], n * d[3],
                         n * d[4], n * d[5]])
    return remit_diag_from_sums(_gather(local, group, world).sum(0),
                                diagnostics.w_mean.dtype)


@_eager
def global_num_items(targets: Tensor, group=None, *, ignore_index: int = -100,
                     per_rank: bool = False) -> Tensor:
    """The valid-token count over every rank of ``group`` (default: the world), a 0-d tensor on
    the targets' device for ``num_items_in_batch`` (one all_reduce, no host sync).

    ``per_rank=True`` divides it by the group size: the divisor for engines that average the
    gradients over ``group`` (DDP, FSDP2, TorchTitan's data x context parallel mesh), so that
    the averaged gradient is that of the global mean (module docstring). Pass the group of the
    ranks that hold different tokens, not tensor-parallel ranks (they hold the same)."""
    chk._tensor(targets, "targets")
    if group is None:
        group = dist.group.WORLD
    group, _, world = _group(group, "group")
    count = (targets != ignore_index).sum().to(torch.float64 if per_rank else torch.long)
    dist.all_reduce(count, group=group)
    return count / world if per_rank else count
