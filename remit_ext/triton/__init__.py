"""The Triton backend (kernels in ``kernels.py``, ops in ``ops.py``). Importing it registers
``torch.ops.remit_ext_triton``; ``remit_ext`` imports it only when the backend is first asked for."""

from .ops import interpreting, ops

__all__ = ["interpreting", "ops"]
