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


def _handshake(values: list[int], device, group, world: int, *,
               refused: bool = False) -> Tensor:
    """The one handshake of the distributed paths. Before its first collective, every rank of
    ``group`` all-gathers a row of int64 facts about its call (shapes, sizes, which heads are
    sharded) with its status last: 1 when its inputs passed its local checks, 0 when it refused
    them (``refused``; its facts are then zeros) and joins only so that its peers raise
    instead of waiting in a collective it never reaches. Returns the ``[world, len(values) +
    1]`` table; every rank reads the same one, so all raise together (``_check_status``,
    ``_check_agree``). No host-to-device copy: the row is filled on ``device``."""
    row = [0] * len(values) + [0] if refused else list(values) + [1]
    mine = torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in row])
    return _gather(mine, group, world)


def _check_status(table: Tensor, group_name: str) -> None:
    """A rank whose inputs passed raises when a peer refused (the peer's error names the
    argument)."""
    if not bool(table[:, -1].all()):
        refused = (table[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"{group_name}: rank(s) {refused} of {group_name} refused their inputs "
                         f"(their own errors name the argument); this rank's passed its local "
                         f"checks")


def _check_agree(table: Tensor, col: int, what: str, name: str, group_name: str) -> None:
    """Every rank raises the same ValueError (they all read the same table), so none hangs."""
    vals = table[:, col].tolist()
    if len(set(vals)) != 1:
        raise ValueError(f"{name}: expected the same {what} on every rank of {group_name}, got "
                         f"{vals} (by rank)")
