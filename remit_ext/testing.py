"""Comparison helpers for checking a kernel against the references (used by our tests, and
usable by anyone's CI).

The rule (tolerances relative to PyTorch): a kernel's error against an fp64 truth may be at most
``factor`` times the error of the same PyTorch math run at the kernel's precision, plus a small
floor, so that tiny shapes where the baseline happens to be exact do not make a test flaky.
Non-finite values must match the truth position for position.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Relative floor (times max |truth|) by the dtype of the compared output.
FLOOR_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
FLOOR_ATOL = 1e-12


def max_error(x: Tensor, truth: Tensor) -> float:
    """max |x - truth| over the entries where truth is finite (0 for none)."""
    finite = torch.isfinite(truth)
    if not bool(finite.any()):
        return 0.0
    return float((x.double() - truth.double())[finite].abs().max())


def assert_close_to_truth(
    actual: Tensor,
    truth: Tensor,
    baseline: Tensor,
    *,
    factor: float = 2.0,
    floor_rtol: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``err(actual) <= factor * err(baseline) + floor``, errors against ``truth``.

    ``truth`` is the reference in float64; ``baseline`` is the reference at the kernel's working
    precision (e.g. fp32 math on the same bf16 inputs, with its outputs in the kernel's dtypes).
    """
    if actual.shape != truth.shape or baseline.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} vs truth "
                             f"{tuple(truth.shape)} vs baseline {tuple(baseline.shape)}")
    a, t = actual.detach().double(), truth.detach().double()
    for what, mask_a, mask_t in (
        ("NaN", torch.isnan(a), torch.isnan(t)),
        ("+inf", a == float("inf"), t == float("inf")),
        ("-inf", a == float("-inf"), t == float("-inf")),
    ):
        if not torch.equal(mask_a, mask_t):
            raise AssertionError(f"{name}: {what} at {int(mask_a.sum())} positions, truth has "
                                 f"{int(mask_t.sum())} (first differing index "
                                 f"{(mask_a != mask_t).nonzero()[0].tolist()})")
    finite = torch.isfinite(t)
    scale = float(t[finite].abs().max()) if bool(finite.any()) else 0.0
    rtol = FLOOR_RTOL[actual.dtype] if floor_rtol is None else floor_rtol
    err, base = max_error(a, t), max_error(baseline.detach(), t)
    bound = factor * base + rtol * scale + FLOOR_ATOL
    if not err <= bound:  # also catches a NaN error
        raise AssertionError(f"{name}: max error {err:.3e} exceeds {bound:.3e} = {factor} x "
                             f"baseline {base:.3e} + floor {rtol:.0e} x {scale:.3e}")
