"""The Triton backend's ops: ``torch.ops.remit_ext_triton.*``, with the very schemas of the C++
ops (read from them, so the two cannot drift), the same fakes and the same autograd
(``remit_ext._fakes_autograd.register_fakes_autograd``). Each op is opaque to torch.compile and
runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).

Launch sizes: one program per row with a loop over the vocabulary in BLOCK_V chunks; on the CPU
interpreter a smaller BLOCK_V keeps each program cheap. Every launch passes
``kernels.LAUNCH_OPTIONS`` (no FMA contraction; the interpreter ignores compiler options).

A direct ``torch.ops.remit_ext_triton`` call gets the argument checks of the C++ ops, with their
messages (the section below).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .. import _fakes_autograd
from ..reference import acc_dtype
from . import kernels as K

NAMESPACE = "remit_ext_triton"
# The running top-k is unrolled k times per block: fine for RMT's k = 16, not for thousands.
MAX_TOPK = 64
OPS = ("token_stats", "remit_weights", "weighted_ce_fwd", "weighted_ce_bwd", "weighted_ce_bwd_",
       "remit_loss", "pg_loss_fwd", "kd_loss_fwd", "kd_loss_bwd")

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name in OPS:
    _schema = str(getattr(torch.ops.remit_ext, _name).default._schema)
    _lib.define(_schema.split("::", 1)[1])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_v(vocab: int) -> int:
    cap = 1024 if interpreting() else 4096
    return min(cap, triton.next_power_of_2(vocab))


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device, not on the tensors' one (and a Python op
    gets no device guard from the dispatcher): make the tensors' device current for the launch."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Rows are addressed through their stride; only the vocab dim must be dense."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _inv_temp(temperature, like):
    """1/temperature as a one-element tensor in the accumulation dtype (see the kernels)."""
    dt = acc_dtype(like.dtype)
    return torch.full((1,), 1.0 / temperature, dtype=dt, device=like.device)


# ---------------------------------------------------------------------------- argument checks
#
# The checks of csrc/op_checks.h and the device layer of csrc/cuda/glue.h, with the same
# messages (python_tests/test_triton_guards.py matches them): the kernels index every tensor by
# row or token, so a wrong shape or device would read out of bounds, not fail. Values (targets,
# cu_seqlens) are not checked here, as on CUDA (that needs a host sync): the kernels give an
# out-of-range target a NaN log-prob and clamp the offsets into [0, N].


def _sizes(t: torch.Tensor) -> str:
    return str(list(t.shape))  # as at::IntArrayRef prints: [2, 5]


def _scalar(dtype: torch.dtype) -> str:
    """The c10::ScalarType name the C++ messages print (Float, Long, BFloat16)."""
    return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]


def _num(x: float) -> str:
    return f"{x:g}"  # a double as a C++ stream prints it: 1, 0.2, 1e-07, nan


def _check_logits(t, name):
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, V] tensor, got shape {_sizes(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {_scalar(t.dtype)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name}: expected V >= 1, got shape {_sizes(t)}")


def _check_on_device(t, like, name):
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {t.device}")


def _check_targets(t, like, name="targets"):
    """One int32/int64 target per row of `like` (logits, or the log-probs of remit_weights)."""
    n = like.shape[0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected a 1-D tensor of {n} elements, got shape {_sizes(t)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected int64 or int32, got {_scalar(t.dtype)}")
    _check_on_device(t, like, name)


def _check_same_rows(a, b, name, a_name="logits"):
    if a.shape != b.shape:
        raise ValueError(f"{name}: expected the same shape as {a_name} {_sizes(a)}, got "
                         f"{_sizes(b)}")


def _check_scorer_logits(s, logits):
    _check_logits(s, "scorer_logits")
    _check_same_rows(logits, s, "scorer_logits")
    if s.device != logits.device:
        raise ValueError(f"scorer_logits: expected a tensor on {logits.device}")


def _check_per_token(t, like, name):
    n = like.shape[0]
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}], got {_sizes(t)}")
    _check_on_device(t, like, name)


def _per_token_float(t, like, name):
    """A per-token input of pg_loss_fwd as the kernel reads it: [N] floats on the logits'
    device, dense, in the accumulation dtype."""
    _check_per_token(t, like, name)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {_scalar(t.dtype)}")
    return t.to(acc_dtype(like.dtype)).contiguous()


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {_num(temperature)}")


def _check_topk(topk):
    if topk < 0:
        raise ValueError(f"topk: expected >= 0 (0: not computed), got {topk}")


def _check_eps(eps):
    if not 0 < eps < 1:
        raise ValueError(f"eps: expected a value in (0, 1), got {_num(eps)}")


def _check_cu_seqlens(cu):
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError("cu_seqlens: expected a 1-D tensor of at least 2 offsets, got shape "
                         f"{_sizes(cu)}")
    if cu.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cu_seqlens: expected int32 or int64, got {_scalar(cu.dtype)}")


def _check_remit_weights_args(logprob, scorer_logprob, targets):
    if logprob.dim() != 1:
        raise ValueError(f"logprob: expected a 1-D tensor, got shape {_sizes(logprob)}")
    if logprob.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"logprob: expected float32 or float64, got {_scalar(logprob.dtype)}")
    _check_same_rows(logprob, scorer_logprob, "scorer_logprob", "logprob")
    _check_on_device(scorer_logprob, logprob, "scorer_logprob")
    _check_targets(targets, logprob)


def _check_pg_coefficients(clip_low, clip_high, kl_beta, has_ref_logprob):
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low: expected a value in [0, 1), got {_num(clip_low)}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high: expected a value >= 0, got {_num(clip_high)}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta: expected a value >= 0, got {_num(kl_beta)}")
    if kl_beta != 0 and not has_ref_logprob:
        raise ValueError(f"kl_beta: {_num(kl_beta)} > 0 needs ref_logprob, got None")


def _check_inplace_rows(logits):
    """The in-place backward writes whole rows over the logits: it cannot fall back to a dense
    copy, and rows that share memory would be read after another row overwrote them."""
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError("logits: the in-place backward needs rows with unit stride, got "
                         f"strides {list(logits.stride())}")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[-1]:
        raise ValueError("logits: the in-place backward needs rows that do not overlap in "
                         f"memory (row stride >= V), got sizes {list(logits.shape)} and strides "
                         f"{list(logits.stride())}")


def _check_kd_args(logits, teacher_logits, targets, temperature):
    """csrc/cpu/kd_loss.cpp's check_kd_args, in its order, and the devices."""
    _check_logits(logits, "logits")
    _check_logits(teacher_logits, "teacher_logits")
    _check_same_rows(logits, teacher_logits, "teacher_logits")
    if teacher_logits.dtype != logits.dtype:
        raise ValueError(f"teacher_logits: expected the logits' dtype {_scalar(logits.dtype)}, "
                         f"got {_scalar(teacher_logits.dtype)}")
    _check_on_device(teacher_logits, logits, "teacher_logits")
    _check_targets(targets, logits)
    _check_temperature(temperature)


def _check_ce_bwd_args(logits, targets, lse, logprob, coef):
    _check_logits(logits, "logits")
    _check_targets(targets, logits)
    for t, name in ((lse, "lse"), (logprob, "logprob"), (coef, "coef")):
        _check_per_token(t, logits, name)


# ---------------------------------------------------------------------------- launches


def _stats_into(logits, targets, scorer, ignore_index, temperature, with_entropy, topk=0,
                topk_renormalize=False):
    z = _rows(logits)
    s = None if scorer is None else _rows(scorer)
    targets = targets.contiguous()  # read as targets_ptr + row: a strided view would be misread
    n, vocab = z.shape
    dt = acc_dtype(z.dtype)
    lse, logprob = z.new_empty(n, dtype=dt), z.new_empty(n, dtype=dt)
    entropy = z.new_empty(n if with_entropy else 0, dtype=dt)
    topk_entropy = z.new_empty(n if topk > 0 else 0, dtype=dt)
    s_lse = z.new_empty(n if s is not None else 0, dtype=dt)
    s_logprob = z.new_empty(n if s is not None else 0, dtype=dt)
    block = _block_v(vocab)
    with _on_device(z):
        K._token_stats_fwd_kernel[(n,)](
            z, z if s is None else s, targets, lse, logprob, entropy if with_entropy else lse,
            topk_entropy if topk > 0 else lse,
            s_lse if s is not None else lse, s_logprob if s is not None else lse,
            vocab, z.stride(0), z.stride(0) if s is None else s.stride(0), ignore_index,
            _inv_temp(temperature, z), HAS_SCORER=s is not None, WITH_ENTROPY=with_entropy,
            BLOCK_V=block, ACC=_acc(z.dtype), TOPK=min(topk, vocab),
            TOPK_PAD=triton.next_power_of_2(max(min(topk, vocab), 1)),
            TOPK_RENORM=topk_renormalize, num_warps=_num_warps(block), **K.LAUNCH_OPTIONS)
    return lse, logprob, entropy, topk_entropy, s_lse, s_logprob


def _weights_into(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps, loss=None):
    """`loss`, when given, must be zero-filled: like w and delta_hat, the kernel writes only the
    tokens some (clamped) segment covers."""
    _check_eps(eps)
    _check_cu_seqlens(cu_seqlens)
    a = logprob.contiguous()
    b = scorer_logprob.to(a.dtype).contiguous()
    # On the device already in the usual case; a CPU tensor is copied over, as on CUDA.
    cu = cu_seqlens.to(a.device).contiguous()
    w, dhat = torch.zeros_like(a), torch.zeros_like(a)
    num_seg = cu.numel() - 1
    partial = a.new_empty((num_seg, 7))
    # [1 - eps, 1 + eps], filled on the device by fill_ kernels. Not `band[0] = 1 - eps`: on a
    # CUDA tensor that assignment copies a CPU scalar tensor with a blocking H2D copy
    # (cudaStreamSynchronize), a host sync per call, refused during CUDA graph capture.
    band = a.new_full((2,), 1.0 + eps)
    band[0].fill_(1.0 - eps)
    with _on_device(a):
        K._remit_weights_kernel[(num_seg,)](
            a, b, targets.contiguous(), cu, w, dhat, w if loss is None else loss, partial,
            a.shape[0], ignore_index, band,
            WRITE_LOSS=loss is not None, BLOCK=1024 if not interpreting() else 256,
            ACC=_acc(a.dtype), **K.LAUNCH_OPTIONS)
    # Diagnostics from the per-sequence partial sums: a tiny reduction, no host sync.
    sums = partial.double().sum(0)
    inv = 1.0 / sums[6].clamp(min=1)
    mean = sums[0] * inv
    shifted_mean = (sums[0] - sums[6]) * inv  # mean of w - 1
    var = (sums[1] * inv - shifted_mean * shifted_mean).clamp(min=0)
    diag = torch.stack((mean, var.sqrt(), sums[2] * inv,
                        sums[3] * inv, sums[4] * inv, sums[5] * inv)).to(a.dtype)
    return w, dhat, diag


def _ce_grad_into(logits, targets, lse, logprob, coef, ignore_index, grad):
    n, vocab = logits.shape
    block = _block_v(vocab)
    dt = acc_dtype(logits.dtype)
    with _on_device(logits):
        K._ce_bwd_kernel[(n,)](
            logits, grad, targets.contiguous(), lse.to(dt).contiguous(),
            logprob.to(dt).contiguous(), coef.to(dt).contiguous(), vocab, logits.stride(0),
            grad.stride(0), ignore_index,
            BLOCK_V=block, ACC=_acc(logits.dtype), num_warps=_num_warps(block),
            **K.LAUNCH_OPTIONS)
    return grad


def _token_stats(logits, targets, scorer_logits, ignore_index, temperature, with_entropy, topk,
                 topk_renormalize):
    _check_logits(logits, "logits")
    _check_targets(targets, logits)
    _check_temperature(temperature)
    _check_topk(topk)
    if topk > MAX_TOPK and topk < logits.shape[-1]:
        raise ValueError(f"topk: the Triton kernel takes 0 <= topk <= {MAX_TOPK} or topk >= V, "
                         f"got {topk}")
    if scorer_logits is not None:
        _check_scorer_logits(scorer_logits, logits)
    if topk >= logits.shape[-1]:
        # Every class is among the top k: both forms equal the full entropy (the mass is 1).
        lse, logprob, entropy, _, s_lse, s_logprob = _stats_into(
            logits, targets, scorer_logits, ignore_index, temperature, True)
        return (lse, logprob, entropy if with_entropy else entropy[:0], entropy.clone(), s_lse,
                s_logprob)
    return _stats_into(logits, targets, scorer_logits, ignore_index, temperature, with_entropy,
                       topk, topk_renormalize)


def _remit_weights(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps):
    _check_remit_weights_args(logprob, scorer_logprob, targets)
    return _weights_into(logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps)


def _weighted_ce_fwd(logits, targets, weights, ignore_index, inplace_backward):
    _check_logits(logits, "logits")
    _check_targets(targets, logits)
    if weights is not None:
        _check_per_token(weights, logits, "weights")
    lse, logprob, _, _, _, _ = _stats_into(logits, targets, None, ignore_index, 1.0, False)
    loss = -logprob
    if weights is not None:
        # Selected: a NaN/inf weight at an ignored position counts nothing (0 * NaN = NaN).
        loss = torch.where(targets != ignore_index, loss * weights.to(logprob.dtype), 0)
    return loss, lse, logprob


def _weighted_ce_bwd(logits, targets, lse, logprob, coef, ignore_index):
    _check_ce_bwd_args(logits, targets, lse, logprob, coef)
    z = _rows(logits)
    return _ce_grad_into(z, targets, lse, logprob, coef, ignore_index,
                         torch.empty_like(z, memory_format=torch.contiguous_format))


def _weighted_ce_bwd_inplace(logits, targets, lse, logprob, coef, ignore_index):
    _check_ce_bwd_args(logits, targets, lse, logprob, coef)
    _check_inplace_rows(logits)
    _ce_grad_into(logits, targets, lse, logprob, coef, ignore_index, logits)


def _remit_loss(logits, targets, scorer_logits, scorer_logprob, cu_seqlens, ignore_index, eps,
                detach_weights, inplace_backward):
    _check_logits(logits, "logits")
    _check_targets(targets, logits)
    if (scorer_logits is None) == (scorer_logprob is None):
        raise ValueError("remit_loss: expected exactly one of scorer_logits and scorer_logprob")
    if scorer_logits is not None:
        _check_scorer_logits(scorer_logits, logits)
    else:
        _check_per_token(scorer_logprob, logits, "scorer_logprob")
    # Statistics pass: policy and scorer rows in one launch (or the precomputed scorer log-probs).
    lse, logprob, _, _, _, b = _stats_into(logits, targets, scorer_logits, ignore_index, 1.0,
                                           False)
    if scorer_logits is None:
        b = scorer_logprob
    loss = torch.zeros_like(logprob)  # tokens no segment covers keep 0 (see _weights_into)
    w, dhat, diag = _weights_into(logprob, b, targets, cu_seqlens, ignore_index, eps, loss=loss)
    return loss, w, logprob, lse, dhat, diag


def _pg_loss_fwd(logits, actions, advantages, scale, old_logprob, ref_logprob, ignore_index,
                 clip_low, clip_high, kl_beta, inplace_backward):
    _check_logits(logits, "logits")
    _check_targets(actions, logits, "actions")
    _check_pg_coefficients(clip_low, clip_high, kl_beta, ref_logprob is not None)
    n = logits.shape[0]
    per_token = [None if t is None else _per_token_float(t, logits, name) for t, name in (
        (advantages, "advantages"), (scale, "scale"), (old_logprob, "old_logprob"),
        (ref_logprob, "ref_logprob"))]
    adv, sc, old, ref = per_token
    # Statistics pass: lse and a_t = log p(action_t), one read of each row.
    lse, logprob, _, _, _, _ = _stats_into(logits, actions, None, ignore_index, 1.0, False)
    # The O(N) epilogue as one small kernel rather than torch elementwise ops: that is ~20
    # launches and temporaries on the GPU (this op is opaque to torch.compile, so
    # nothing would fuse them), this is one launch reading five vectors and writing two. It
    # stays out of _token_stats_fwd_kernel, which every op shares, for a term 1/V of its cost.
    loss, dlogprob = torch.empty_like(logprob), torch.empty_like(logprob)
    # Filled on the device by fill_ kernels (no host copy; see the band in _weights_into).
    coefs = logprob.new_full((3,), 1.0 - clip_low)
    coefs[1].fill_(1.0 + clip_high)
    coefs[2].fill_(kl_beta)
    block = min(1024, triton.next_power_of_2(max(n, 1)))
    with _on_device(logprob):
        K._pg_terms_kernel[(triton.cdiv(n, block),)](
            logprob, actions.contiguous(), adv, adv if sc is None else sc,
            adv if old is None else old, adv if ref is None else ref, coefs, loss, dlogprob, n,
            ignore_index, HAS_SCALE=sc is not None, HAS_OLD=old is not None,
            HAS_REF=ref is not None, BLOCK=block, ACC=_acc(logits.dtype), **K.LAUNCH_OPTIONS)
    return loss, lse, logprob, dlogprob


def _kd_loss_fwd(logits, teacher_logits, targets, ignore_index, temperature):
    _check_kd_args(logits, teacher_logits, targets, temperature)
    z, zt = _rows(logits), _rows(teacher_logits)
    n, vocab = z.shape
    dt = acc_dtype(z.dtype)
    loss, lse, teacher_lse = (z.new_empty(n, dtype=dt) for _ in range(3))
    block = _block_v(vocab)
    with _on_device(z):
        K._kd_fwd_kernel[(n,)](
            z, zt, targets.contiguous(), loss, lse, teacher_lse, vocab, z.stride(0),
            zt.stride(0), ignore_index, _inv_temp(temperature, z), BLOCK_V=block,
            ACC=_acc(z.dtype), num_warps=_num_warps(block), **K.LAUNCH_OPTIONS)
    return loss, lse, teacher_lse


def _kd_loss_bwd(logits, teacher_logits, targets, lse, teacher_lse, coef, ignore_index,
                 temperature):
    _check_kd_args(logits, teacher_logits, targets, temperature)
    # Not checked by the C++ op (it reads them as given), but indexed by row here.
    for t, name in ((lse, "lse"), (teacher_lse, "teacher_lse"), (coef, "coef")):
        _check_per_token(t, logits, name)
    z, zt = _rows(logits), _rows(teacher_logits)
    n, vocab = z.shape
    dt = acc_dtype(z.dtype)
    grad = torch.empty_like(z, memory_format=torch.contiguous_format)
    block = _block_v(vocab)
    with _on_device(z):
        K._kd_bwd_kernel[(n,)](
            z, zt, grad, targets.contiguous(), lse.to(dt).contiguous(),
            teacher_lse.to(dt).contiguous(), coef.to(dt).contiguous(), vocab, z.stride(0),
            zt.stride(0), grad.stride(0), ignore_index, _inv_temp(temperature, z),
            BLOCK_V=block, ACC=_acc(z.dtype), num_warps=_num_warps(block), **K.LAUNCH_OPTIONS)
    return grad


_IMPLS = {
    "token_stats": _token_stats,
    "remit_weights": _remit_weights,
    "weighted_ce_fwd": _weighted_ce_fwd,
    "weighted_ce_bwd": _weighted_ce_bwd,
    "weighted_ce_bwd_": _weighted_ce_bwd_inplace,
    "remit_loss": _remit_loss,
    "pg_loss_fwd": _pg_loss_fwd,
    "kd_loss_fwd": _kd_loss_fwd,
    "kd_loss_bwd": _kd_loss_bwd,
}
for _name, _fn in _IMPLS.items():
    # CPU runs the same kernels in Triton's interpreter (tests only; the dispatcher never picks
    # Triton for CPU tensors by itself).
    _lib.impl(_name, _fn, "CUDA")
    _lib.impl(_name, _fn, "CPU")

_fakes_autograd.register_fakes_autograd(NAMESPACE, OPS)

ops = getattr(torch.ops, NAMESPACE)
