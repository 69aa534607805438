"""Input builders shared by the tests: ragged shapes, ignored positions, packed sequences,
confident rows and extreme logits (STYLE.md habit 8)."""

from __future__ import annotations

import math

import torch

from conftest import DEVICE

IGNORE = -100

# (batch dims..., T, V): N = 1 and 199; V = 2, 1025, 32001; a 3-D batch.
SHAPES = [
    (1, 2),
    (1, 1025),
    (199, 2),
    (199, 1025),
    (3, 5, 32001),
    (2, 2, 7, 33),
]


def make_logits(shape, dtype, *, scale=3.0, generator=None, device=DEVICE):
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    return x.to(device=device, dtype=dtype)


def make_targets(shape, vocab, *, ignore_frac=0.2, generator=None, device=DEVICE):
    y = torch.randint(0, vocab, shape, generator=generator)
    drop = torch.rand(shape, generator=generator) < ignore_frac
    return torch.where(drop, torch.full_like(y, IGNORE), y).to(device)


def make_pair(shape, dtype, *, seed=0, ignore_frac=0.2, scale=3.0):
    """Policy logits, scorer logits (a noisy, sharper variant) and targets."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, torch.float64, scale=scale, generator=g, device="cpu")
    noise = torch.randn(shape, dtype=torch.float64, generator=g)
    scorer = 1.3 * logits + 2.0 * noise
    targets = make_targets(shape[:-1], shape[-1], ignore_frac=ignore_frac, generator=g)
    return logits.to(DEVICE, dtype), scorer.to(DEVICE, dtype), targets


def confident_rows(logits, targets, margin=20.0):
    """Make p(target) -> 1 on every valid row: the target logit sits `margin` above the rest."""
    z = logits.detach().double().clone()
    valid = targets != IGNORE
    idx = torch.where(valid, targets, 0).unsqueeze(-1)
    top = z.amax(-1, keepdim=True) + margin
    z = torch.where(valid.unsqueeze(-1), z.scatter(-1, idx, top), z)
    return z.to(logits.dtype)


def assert_target_gradient_accurate(grad, truth, targets, rtol=1e-4):
    """On confident rows the target-class gradient coef * (p_y - 1) is tiny and negative; it must
    match the fp64 truth in relative terms (a rounded p_y gives 0 or a few % error)."""
    valid = targets != IGNORE
    idx = torch.where(valid, targets, 0).unsqueeze(-1)
    g, t = grad.gather(-1, idx)[valid].double(), truth.gather(-1, idx)[valid]
    assert bool((t < 0).all()) and float(t.abs().max()) < 1e-5, "rows are not confident"
    rel = float(((g - t) / t).abs().max())
    assert rel < rtol, f"target-class gradient relative error {rel:.2e}"


def off_target_error(grad, want, targets, logprob):
    """Largest |grad - want| off the target column of a valid row, in units of eps (|a| + log V)
    x that row's largest |want| off the target column (eps = fp32's): the relative error of the
    p_v the row is made of. The target entry (from expm1(a)) is left out: on a flat row it is
    ~1000x the others and would hide their errors."""
    V = grad.shape[-1]
    valid = targets != IGNORE
    off = torch.ones_like(want, dtype=torch.bool).scatter(
        -1, torch.where(valid, targets, 0).unsqueeze(-1), False)
    zero = torch.zeros((), dtype=torch.float64, device=want.device)
    err = torch.where(off, (grad.double() - want).abs(), zero).amax(-1)
    scale = torch.where(off, want.abs(), zero).amax(-1)
    unit = (logprob.double().abs() + math.log(V)) * torch.finfo(torch.float32).eps
    return float((err / (scale * unit))[valid].max())
