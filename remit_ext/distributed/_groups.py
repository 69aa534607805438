"""Process groups for the distributed losses: ProcessGroup / 1-D DeviceMesh parsing, the
rank-ordered all_gather, and the handshake table every rank reads the same (so all raise
together instead of one waiting in a collective)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as chk

# torch.compile: the distributed entry points run eagerly, one graph break each (dynamo
# cannot trace the ProcessGroup / DeviceMesh checks, the handshake's host reads or the
# autograd.Functions that issue collectives).
_eager = torch.compiler.disable


def _group(group, name: str):
    """(process group, rank, world) of ``group``: a ProcessGroup or a 1-D DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised (call "
                         f"init_process_group first), got {name}={group!r}")
    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"{name}: expected a ProcessGroup or a 1-D DeviceMesh, got a "
                             f"{group.ndim}-D mesh (pass mesh['<dim>'])")
        group = group.get_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a non-member
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member "
                         f"of the group")
    return group, rank, dist.get_world_size(group)


def _gather(t: Tensor, group, world: int) -> Tensor:
    """[world, *t.shape]: every rank's ``t`` in rank order (sums over it are then formed in the
    same order on every rank, so the results are bitwise replicated)."""
    if world == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _host_checks(device: torch.device) -> bool:
    return chk._value_check(device) == "host"


def _handshake(values: list[int], device, group, world: int) -> Tensor:
    """[world, len(values)] int64: every rank's shape facts (no host-to-device copy)."""
    mine = torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])
    return _gather(mine, group, world)


def _check_agree(table: Tensor, col: int, what: str, name: str, group_name: str) -> None:
    """Every rank raises the same ValueError (they all read the same table), so none hangs."""
    vals = table[:, col].tolist()
    if len(set(vals)) != 1:
        raise ValueError(f"{name}: expected the same {what} on every rank of {group_name}, got "
                         f"{vals} (by rank)")
