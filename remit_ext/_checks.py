"""Argument checks for the public API: each failure names the argument, what was expected and
what was given. Shape, dtype and device checks are free and always on. Checks of tensor *values*
(target range, cu_seqlens offsets) follow the validation mode (``set_validation``):

- ``"async"`` (default): CPU tensors are checked on the host (a clear ``ValueError``); on an
  accelerator the check is a device-side assert (``torch._assert_async``): no host
  synchronisation, but a bad value kills the CUDA context ("device-side assert triggered")
  and every later CUDA call in the process fails.
- ``"sync"``: every device is checked on the host and raises the same ``ValueError`` as on CPU;
  on an accelerator that costs one host synchronisation per checked tensor (targets, and
  cu_seqlens when given), reading one flag, or a few values only when the check fails.
- ``"off"``: no value checks (the kernels then give NaN log-probs for out-of-range targets and
  clamp malformed offsets; the C++ CPU kernels still refuse them where they read them).

While ``torch.compile`` traces, the value checks of "async" and "sync" are device-side asserts on
every device (a host check would break the graph): ops of the compiled graph, with no host
sync, that raise a RuntimeError naming the argument when the compiled code runs on CPU and
are the device-side assert of "async" on a GPU. No value check runs on the meta device (no
values). The mode is process-wide, read from ``REMIT_EXT_VALIDATION`` at import.
"""

from __future__ import annotations

from typing import Optional

import contextlib
import math
import numbers
import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")
INT64_LIMIT = 2 ** 63


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


VALIDATION_MODES = ("async", "sync", "off")
ENV_VALIDATION = "REMIT_EXT_VALIDATION"


def _parse_mode(mode, name: str) -> str:
    if mode not in VALIDATION_MODES:
        raise ValueError(f"{name}: expected one of {VALIDATION_MODES}, got {mode!r}")
    return mode


_mode = _parse_mode(os.environ.get(ENV_VALIDATION, "async"), ENV_VALIDATION)


def set_validation(mode: str) -> str:
    """Set how tensor values (target range, cu_seqlens offsets) are checked: ``"async"``
    (default; device-side asserts on accelerators, no host sync), ``"sync"`` (host checks and a
    ``ValueError`` on every device, one host sync per checked tensor) or ``"off"``. Returns the
    previous mode. The environment variable ``REMIT_EXT_VALIDATION`` sets the initial mode."""
    global _mode
    previous, _mode = _mode, _parse_mode(mode, "mode")
    return previous


def get_validation() -> str:
    """The current validation mode (see ``set_validation``)."""
    return _mode


@contextlib.contextmanager
def validation(mode: str):
    """``with remit_ext.validation("sync"): ...``: the mode for a block, restored after."""
    previous = set_validation(mode)
    try:
        yield
    finally:
        set_validation(previous)


def _value_check(device: torch.device) -> Optional[str]:
    """How to check values on ``device`` now: "host", "device" or None (not at all)."""
    if _mode == "off" or device.type == "meta":
        return None
    if torch.compiler.is_compiling():
        # A host check would break the graph (fullgraph=True refuses it); a device-side assert
        # is an op of the graph that inductor keeps. Skipping the check here let a malformed
        # cu_seqlens or target through a compiled call as a plausible loss (issue 26).
        return "device"
    return "host" if device.type == "cpu" or _mode == "sync" else "device"


def check_logits(logits, name: str = "logits") -> Tensor:
    _tensor(logits, name)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, "
                        f"got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected shape [..., N, V] with at least 2 dims, "
                         f"got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(logits.shape)}")
    return logits


def check_like_logits(x, logits: Tensor, name: str) -> Tensor:
    check_logits(x, name)
    if x.shape != logits.shape:
        raise ValueError(f"{name}: expected the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(x.shape)}")
    check_same_device(logits, x, name)
    return x


def check_same_device(ref: Tensor, x: Tensor, name: str, like: str = "logits") -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} like {like}, "
                         f"got one on {x.device}")


def check_ignore_index(ignore_index) -> int:
    """An int in int64's range (the kernels' type). A string or None made ``targets !=
    ignore_index`` a Python bool and the call crash later; 2**70 an OverflowError in a kernel
    call; a float reached the kernels' int argument."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__} "
                        f"{ignore_index!r}")
    if not -INT64_LIMIT <= ignore_index < INT64_LIMIT:
        raise ValueError(f"ignore_index: expected an int in [-2**63, 2**63), got {ignore_index}")
    return int(ignore_index)


def check_targets(targets, logits: Tensor, ignore_index: int, name: str = "targets") -> Tensor:
    check_ignore_index(ignore_index)
    check_positions(targets, logits, name)
    how = _value_check(targets.device)
    if how is not None:
        vocab = logits.shape[-1]
        bad = ((targets != ignore_index) & ((targets < 0) | (targets >= vocab))).flatten()
        msg = f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}"
        if how == "host":
            # One read (one host sync on an accelerator): the first bad position, or -1.
            idx = -1
            if bad.numel():
                idx = int(torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1))
            if idx >= 0:
                raise ValueError(f"{msg}, got {int(targets.flatten()[idx])} at flat position {idx}")
        else:
            torch._assert_async(~bad.any(), msg)
    return targets


def check_per_token(x, targets: Tensor, name: str) -> Tensor:
    _tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.shape != targets.shape:
        raise ValueError(f"{name}: expected shape {tuple(targets.shape)} (one value per "
                         f"position), got {tuple(x.shape)}")
    check_same_device(targets, x, name)
    return x


def check_cu_seqlens(cu_seqlens, n_tokens: int, device: torch.device) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    _tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens: expected a 1-D tensor of at least 2 offsets "
                         f"[0, ..., {n_tokens}], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected a tensor on {device} like logits, "
                         f"got one on {cu_seqlens.device}")
    how = _value_check(device)
    if how is not None:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens)
        ok = ok & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        msg = (f"cu_seqlens: expected non-decreasing offsets from 0 to the number of tokens "
               f"{n_tokens}")
        if how == "host":
            if not bool(ok):
                raise ValueError(f"{msg}, got {cu_seqlens.tolist()}")
        else:
            torch._assert_async(ok, msg)
        return cu_seqlens
    # Unchecked ("off"): the documented meaning of malformed offsets on every backend, formed
    # on the device without a sync: clamped into [0, n_tokens], then made non-decreasing (a
    # running maximum), so no two segments overlap and no slice wraps around; positions
    # outside every segment count in no sequence.
    return torch.cummax(cu_seqlens.clamp(0, n_tokens), 0).values


def check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps: expected a number in (0, 1), got {eps!r}")
    return float(eps)


def check_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
        raise ValueError(f"{name}: expected a number > 0, got {x!r}")
    if x == math.inf:
        # temperature=inf divided the logits to 0 (the Triton kernels gave NaN, the others a
        # uniform distribution); no clip bound or temperature needs it.
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_exactly_one(a, b, name_a: str, name_b: str, op: str) -> None:
    if (a is None) == (b is None):
        given = "both" if a is not None else "neither"
        raise ValueError(f"{op}: expected exactly one of {name_a} and {name_b}, got {given}")


def check_num_items(num_items, reduction: str, device: torch.device):
    """num_items_in_batch validated: None, an int in [0, 2**63) or a 0-d real tensor on
    ``device`` or the CPU; only with reduction='mean'. A count of 0 gives a loss of 0 (see
    ``reference.reduce_tokens``). A negative tensor count raises here where its value can be
    read without a device sync (a CPU tensor, or validation "sync"); elsewhere (an accelerator
    under "async", or "off") it is not read and the loss comes out NaN."""
    if num_items is None:
        return None
    if isinstance(num_items, bool) or not isinstance(num_items, (int, Tensor)):
        raise TypeError(f"num_items_in_batch: expected an int or a 0-d tensor, got "
                        f"{type(num_items).__name__}")
    if isinstance(num_items, int):
        if not 0 <= num_items < INT64_LIMIT:
            raise ValueError(f"num_items_in_batch: expected an int in [0, 2**63) (the number of "
                             f"tokens the mean divides by), got {num_items}")
    else:
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items_in_batch: expected an integer or floating tensor, got "
                            f"{num_items.dtype}")
        if num_items.dim() != 0:
            raise ValueError(f"num_items_in_batch: expected a 0-d tensor, got shape "
                             f"{tuple(num_items.shape)}")
        if num_items.device != device and num_items.device.type != "cpu":
            raise ValueError(f"num_items_in_batch: expected a tensor on {device} (or the CPU), "
                             f"got one on {num_items.device}")
        if _value_check(num_items.device) == "host":
            value = num_items.item()
            if not value >= 0:  # NaN too
                raise ValueError(f"num_items_in_batch: expected a count >= 0 (the number of "
                                 f"tokens the mean divides by), got {value}")
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch: only reduction='mean' divides by a token count, "
                         f"got reduction={reduction!r}")
    return num_items


def check_positions(targets, logits: Tensor, name: str) -> None:
    """check_targets without the range check (a vocab-parallel call checks the range against
    the global vocab, in its layout handshake)."""
    _tensor(targets, name)
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int64 or int32, got {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{name}: expected shape {tuple(logits.shape[:-1])} (logits without "
                         f"the vocab dim), got {tuple(targets.shape)}")
    check_same_device(logits, targets, name)


def is_dtensor(x) -> bool:
    """A DTensor (False where torch has no torch.distributed.tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, DTensor)
