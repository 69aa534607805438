"""Re-exports of the FSDP2 sharded-head losses, kept one release under this name: the
functional form is ``remit_ext.distributed.fsdp`` (its docstring is the design record), the
module form ``remit_ext.modules.ReMiTLinearHead``."""

from __future__ import annotations

from .distributed.fsdp import linear_token_stats, remit_linear_loss
from .modules import ReMiTLinearHead

__all__ = ["ReMiTLinearHead", "linear_token_stats", "remit_linear_loss"]
