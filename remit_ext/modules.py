"""``nn.Module`` wrappers over the functional API: ``ReMiTLoss`` (logits), ``LinearReMiTLoss``
(fused-linear, heads passed to ``forward``) and ``ReMiTLinearHead`` (fused-linear, owns the head:
for FSDP2's ``fully_shard``)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._methods import loss_options
from .distributed.fsdp import loss_kwargs, sharded_linear_loss
from .functional import remit_loss
from .linear import remit_linear_loss


class ReMiTLoss(nn.Module):
    """ReMiT loss with its configuration held on the module.

    ``forward(logits, targets, scorer_logits=None, scorer_logprobs=None, cu_seqlens=None,
    num_items_in_batch=None)`` returns the loss (or ``ReMiTOutput`` with
    ``return_details=True``); see ``remit_loss``. ``num_items_in_batch`` is per call (the
    global batch's valid tokens change every step), so it is an argument of ``forward``.
    """

    def __init__(self, eps: float = 0.2, ignore_index: int = -100, reduction: str = "mean",
                 detach_weights: bool = True, inplace_backward: bool = False,
                 return_details: bool = False, backend: str = "auto"):
        super().__init__()
        self.eps, self.ignore_index, self.reduction = eps, ignore_index, reduction
        self.detach_weights, self.inplace_backward = detach_weights, inplace_backward
        self.return_details, self.backend = return_details, backend

    def forward(self, logits: Tensor, targets: Tensor, scorer_logits: Optional[Tensor] = None,
                scorer_logprobs: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[int, Tensor]] = None):
        return remit_loss(
            logits, targets, scorer_logits=scorer_logits, scorer_logprobs=scorer_logprobs,
            cu_seqlens=cu_seqlens, eps=self.eps, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            detach_weights=self.detach_weights,
            inplace_backward=self.inplace_backward, return_details=self.return_details,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"detach_weights={self.detach_weights}, backend={self.backend!r}")


class LinearReMiTLoss(nn.Module):
    """The fused-linear loss (``remit_linear_loss``) with its configuration held on the module:
    ``forward(hidden, lm_head_weight, targets, bias=None, scorer_hidden=None,
    scorer_weight=None, scorer_bias=None, scorer_logprobs=None, cu_seqlens=None,
    num_items_in_batch=None)``.

    ``method`` is ``"remit"``, ``"ntp"``, ``"rho1"`` or ``"kd"``; the LM heads are passed to
    ``forward`` rather than owned, so the module never duplicates a model's parameters.
    ``tp_group``: a vocab-parallel head (this rank's rows of it; ``remit_linear_loss``), held
    on the module and passed through on every call. FSDP2 DTensor heads need no argument.
    """

    def __init__(self, method: str = "remit", eps: float = 0.2, keep_ratio: float = 0.6,
                 temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 grad_weight_fp32: bool = True, return_details: bool = False,
                 backend: str = "auto", tp_group=None,
                 chunk_dtype: Optional[torch.dtype] = None):
        super().__init__()
        # Checked here, once: a bad option fails at construction, not at the first step.
        loss_options(method, ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio,
                     temperature=temperature)
        self.method, self.eps, self.keep_ratio = method, eps, keep_ratio
        self.tp_group = tp_group
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.grad_weight_fp32, self.return_details = grad_weight_fp32, return_details
        self.backend, self.chunk_dtype = backend, chunk_dtype

    def forward(self, hidden: Tensor, lm_head_weight: Tensor, targets: Tensor,
                bias: Optional[Tensor] = None, scorer_hidden: Optional[Tensor] = None,
                scorer_weight: Optional[Tensor] = None, scorer_bias: Optional[Tensor] = None,
                scorer_logprobs: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[int, Tensor]] = None):
        return remit_linear_loss(
            hidden, lm_head_weight, targets, bias=bias, scorer_hidden=scorer_hidden,
            scorer_weight=scorer_weight, scorer_bias=scorer_bias,
            scorer_logprobs=scorer_logprobs, method=self.method, cu_seqlens=cu_seqlens,
            ignore_index=self.ignore_index, eps=self.eps, keep_ratio=self.keep_ratio,
            temperature=self.temperature, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget, grad_weight_fp32=self.grad_weight_fp32,
            return_details=self.return_details, backend=self.backend,
            chunk_dtype=self.chunk_dtype, tp_group=self.tp_group)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, eps={self.eps}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}"
                + (", tp_group=set" if self.tp_group is not None else ""))


class ReMiTLinearHead(nn.Module):
    """An LM head that computes its fused loss with its own parameters, for ``fully_shard``.

    ``ReMiTLinearHead(model.lm_head, scorer_head=None, method="remit", ...)`` takes the
    ``nn.Linear``'s weight (and bias) Parameters, and a frozen scorer / reference / teacher head
    (an ``nn.Linear``, frozen here) as the submodule ``scorer_head``. Put it in the model in
    place of the ``nn.Linear`` (``model.lm_head = ReMiTLinearHead(model.lm_head, ...)``) before
    ``fully_shard(model.lm_head)``: FSDP2 then all-gathers the heads around this forward, again
    in the backward, and reduce-scatters (averages) the gradient itself, with its own options
    (mixed precision, ``set_gradient_divide_factor``, gradient accumulation without sync).

    ``forward(hidden, targets=None, scorer_hidden=None, scorer_logprobs=None, cu_seqlens=None,
    num_items_in_batch=None)``: without ``targets`` the logits (``F.linear``, an ``nn.Linear``'s
    forward: generation and evaluation keep working); with them the loss of
    ``remit_linear_loss`` (``LinearLossOutput`` with ``return_details=True``).

    ``recompute=True`` (default): the loss's forward forms no gradient and its backward
    recomputes (~8NDV FLOPs), so nothing of the head's size is kept between forward and
    backward. ``recompute=False``: ``remit_linear_loss``'s one-pass schedule, the gradient
    formed in the forward (6NDV) and held until the backward as one fp32 ``[V, D]`` buffer
    (twice a bf16 head's size).
    """

    def __init__(self, lm_head: Union[nn.Linear, nn.Parameter], *,
                 scorer_head: Optional[nn.Linear] = None, method: str = "remit",
                 eps: float = 0.2, keep_ratio: float = 0.6, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 grad_weight_fp32: bool = True, return_details: bool = False,
                 backend: str = "auto", recompute: bool = True,
                 chunk_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(lm_head, nn.Linear):
            self.weight, self.bias = lm_head.weight, lm_head.bias
        elif isinstance(lm_head, nn.Parameter):
            self.weight = lm_head
            self.register_parameter("bias", None)
        else:
            raise TypeError(f"lm_head: expected an nn.Linear or an nn.Parameter, got "
                            f"{type(lm_head).__name__}")
        if scorer_head is not None:
            if not isinstance(scorer_head, nn.Linear):
                raise TypeError(f"scorer_head: expected an nn.Linear or None, got "
                                f"{type(scorer_head).__name__}")
            scorer_head.requires_grad_(False)
        self.scorer_head = scorer_head
        loss_options(method, ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio,
                     temperature=temperature)
        self.kw = loss_kwargs(method, ignore_index, eps, keep_ratio, temperature, reduction,
                              chunk_size, memory_budget, grad_weight_fp32, backend, chunk_dtype)
        self.return_details, self.recompute = return_details, recompute

    def forward(self, hidden: Tensor, targets: Optional[Tensor] = None,
                scorer_hidden: Optional[Tensor] = None,
                scorer_logprobs: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[int, Tensor]] = None):
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        sw = sb = None
        if self.scorer_head is not None and scorer_hidden is not None:
            sw, sb = self.scorer_head.weight, self.scorer_head.bias
        if self.recompute:
            return sharded_linear_loss(hidden, self.weight, targets, self.bias, scorer_hidden,
                                       sw, sb, scorer_logprobs, cu_seqlens, num_items_in_batch,
                                       self.return_details, None, self.kw)
        return remit_linear_loss(
            hidden, self.weight, targets, bias=self.bias, scorer_hidden=scorer_hidden,
            scorer_weight=sw, scorer_bias=sb, scorer_logprobs=scorer_logprobs,
            cu_seqlens=cu_seqlens, num_items_in_batch=num_items_in_batch,
            return_details=self.return_details, **self.kw)

    def extra_repr(self) -> str:
        return (f"vocab={self.weight.shape[0]}, hidden={self.weight.shape[1]}, "
                f"bias={self.bias is not None}, method={self.kw['method']!r}, "
                f"recompute={self.recompute}")
