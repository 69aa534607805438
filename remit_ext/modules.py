"""``nn.Module`` wrappers over the functional API."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .functional import remit_loss


class ReMiTLoss(nn.Module):
    """ReMiT loss with its configuration held on the module.

    ``forward(logits, targets, scorer_logits=None, scorer_logprobs=None, cu_seqlens=None)``
    returns the loss (or ``ReMiTOutput`` with ``return_details=True``); see ``remit_loss``.
    """

    def __init__(self, eps: float = 0.2, ignore_index: int = -100, reduction: str = "mean",
                 detach_weights: bool = True, inplace_backward: bool = False,
                 return_details: bool = False, backend: str = "auto"):
        super().__init__()
        self.eps, self.ignore_index, self.reduction = eps, ignore_index, reduction
        self.detach_weights, self.inplace_backward = detach_weights, inplace_backward
        self.return_details, self.backend = return_details, backend

    def forward(self, logits: Tensor, targets: Tensor, scorer_logits: Optional[Tensor] = None,
                scorer_logprobs: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None):
        return remit_loss(
            logits, targets, scorer_logits=scorer_logits, scorer_logprobs=scorer_logprobs,
            cu_seqlens=cu_seqlens, eps=self.eps, ignore_index=self.ignore_index,
            reduction=self.reduction, detach_weights=self.detach_weights,
            inplace_backward=self.inplace_backward, return_details=self.return_details,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"detach_weights={self.detach_weights}, backend={self.backend!r}")
