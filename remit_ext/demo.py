"""``remit-ext demo``: the ReMiT loss, forward + backward, on every available backend.

A deterministic batch stands in for a mid-training step: a policy and a frozen scorer that see
the same text (shared logits), where the scorer is clearly more confident on about a third of
the target tokens and less confident on some others, with padded rows and scattered ignored
positions. Every backend's loss, weight diagnostics, error against the float64 reference
(``reference.remit_loss_ref`` with autograd, on the same rounded inputs) and fwd+bwd time are
printed; the exit status is 1 when a backend's error exceeds the tolerance below, so the demo
doubles as a smoke check of the installed build.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import reference as ref
from ._backends import BackendUnavailableError, available_backends
from ._build import build_info
from .functional import remit_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Tolerance(NamedTuple):
    loss: float  # absolute, on the mean loss (itself O(1..10))
    grad: float  # relative to max |reference gradient|


# Error against the float64 reference on the same rounded inputs. Losses and weights are
# computed in fp32 whatever the input dtype, so only the gradient, written in the logits'
# dtype, pays the bf16 rounding (half an ulp = 2^-9 of the largest entry; 2^-7 leaves room for
# fp32 accumulation). A real bug (a wrong normaliser, an unclipped or uncentred weight, a
# missing ignore mask) moves the loss by >= 1e-2 and the gradient by O(1) relative.
TOLERANCES = {
    torch.float32: Tolerance(loss=1e-4, grad=1e-4),
    torch.bfloat16: Tolerance(loss=1e-3, grad=2.0 ** -7),
}


class Batch(NamedTuple):
    logits: Tensor  # policy, [B, T, V] in the demo dtype
    scorer_logits: Tensor  # frozen scorer, same shape and dtype
    targets: Tensor  # [B, T] int64, ignore_index at padded / masked positions
    ignore_index: int


def make_batch(batch: int, seq_len: int, vocab: int, dtype: torch.dtype, seed: int = 0,
               ignore_index: int = -100) -> Batch:
    """The built-in example batch (deterministic for a given seed and shape)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len)
    targets = torch.randint(0, vocab, shape, generator=g)
    # Both models read the same text: a shared context term plus model-specific noise.
    context = torch.randn(*shape, vocab, generator=g).mul_(2.0)
    policy = context + torch.randn(*shape, vocab, generator=g).mul_(0.1)
    scorer = context.add_(torch.randn(*shape, vocab, generator=g).mul_(0.1))
    # How well the policy knows each target, and how much better (or worse) the scorer does:
    # ~30% "reasoning" tokens where the RL scorer is much surer, ~15% where it is less sure.
    known = torch.rand(shape, generator=g).mul_(6.0)
    kind = torch.rand(shape, generator=g)
    gap = torch.randn(shape, generator=g).mul_(0.15)
    gap = torch.where(kind < 0.30, 0.5 + 2.0 * torch.rand(shape, generator=g), gap)
    gap = torch.where(kind > 0.85, -0.5 - 1.5 * torch.rand(shape, generator=g), gap)
    policy.scatter_add_(-1, targets.unsqueeze(-1), known.unsqueeze(-1))
    scorer.scatter_add_(-1, targets.unsqueeze(-1), (known + gap).unsqueeze(-1))
    # Right padding of 0, 1/8, 2/8, 3/8 of the row (cycling), plus ~2% masked positions.
    pad = (torch.arange(batch) % 4) * seq_len // 8
    ignored = torch.arange(seq_len) >= (seq_len - pad).unsqueeze(-1)
    ignored |= torch.rand(shape, generator=g) < 0.02
    targets = targets.masked_fill(ignored, ignore_index)
    return Batch(policy.to(dtype), scorer.to(dtype), targets, ignore_index)


class Reference(NamedTuple):
    loss: float
    grad: Tensor  # float64
    diagnostics: dict[str, float]


def reference_run(b: Batch) -> Reference:
    """fp64 truth on the same (possibly bf16-rounded) inputs; rows are the sequences."""
    vocab = b.logits.shape[-1]
    z = b.logits.detach().double().reshape(-1, vocab).requires_grad_()
    rows, seq_len = b.targets.shape
    loss, _, diag = ref.remit_loss_ref(
        z, b.targets.reshape(-1), scorer_logits=b.scorer_logits.double().reshape(-1, vocab),
        cu_seqlens=torch.arange(rows + 1) * seq_len, ignore_index=b.ignore_index)
    loss.backward()
    return Reference(loss.item(), z.grad.reshape(b.logits.shape), diag.as_dict())


class BackendResult(NamedTuple):
    backend: str
    loss: float = float("nan")
    diagnostics: Optional[dict[str, float]] = None
    loss_err: float = float("nan")
    grad_err: float = float("nan")
    grad_err_rel: float = float("nan")
    ms_p50: float = float("nan")
    status: str = "ok"  # "ok", "FAIL: ...", or "skipped: ..."


def _step(b: Batch, backend: str, return_details: bool = False):
    logits = b.logits.detach().requires_grad_()
    out = remit_loss(logits, b.targets, scorer_logits=b.scorer_logits,
                     ignore_index=b.ignore_index, return_details=return_details,
                     backend=backend)
    (out.loss if return_details else out).backward()
    return out, logits.grad


def run_backend(b: Batch, backend: str, truth: Reference, repeats: int) -> BackendResult:
    """One checked step (which is also the warm-up), then `repeats` timed fwd+bwd steps."""
    try:
        out, grad = _step(b, backend, return_details=True)
    except BackendUnavailableError as err:
        return BackendResult(backend, status=f"skipped: {err}")
    tol = TOLERANCES[b.logits.dtype]
    loss = out.loss.item()
    loss_err = abs(loss - truth.loss)
    grad_err = (grad.double() - truth.grad).abs().max().item()
    grad_err_rel = grad_err / max(truth.grad.abs().max().item(), 1e-30)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(b, backend)
        times.append(time.perf_counter() - t0)
    failures = []
    # `not <=` so that a NaN error fails too.
    if not loss_err <= tol.loss:
        failures.append(f"loss error {loss_err:.2e} > {tol.loss:.0e}")
    if not grad_err_rel <= tol.grad:
        failures.append(f"relative gradient error {grad_err_rel:.2e} > {tol.grad:.1e}")
    return BackendResult(
        backend, loss, out.diagnostics.as_dict(), loss_err, grad_err, grad_err_rel,
        1e3 * statistics.median(times) if times else float("nan"),
        "FAIL: " + "; ".join(failures) if failures else "ok")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned text: first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        first, rest = cells[0].ljust(widths[0]), [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


DIAG_COLUMNS = ("w_mean", "w_std", "frac_clip_low", "frac_clip_high", "abs_delta_hat_mean",
                "delta_mean")


def report(b: Batch, truth: Reference, results: list[BackendResult], repeats: int) -> str:
    tol = TOLERANCES[b.logits.dtype]
    diag_rows = [["reference (fp64)", f"{truth.loss:.6f}",
                  *(f"{truth.diagnostics[k]:.4f}" for k in DIAG_COLUMNS)]]
    check_rows, skipped = [], []
    for r in results:
        if r.status.startswith("skipped"):
            skipped.append(f"{r.backend}: {r.status}")
            continue
        if r.diagnostics is None:
            diag_rows.append([r.backend, "-", *("-" for _ in DIAG_COLUMNS)])
        else:
            diag_rows.append([r.backend, f"{r.loss:.6f}",
                              *(f"{r.diagnostics[k]:.4f}" for k in DIAG_COLUMNS)])
        check_rows.append([r.backend, f"{r.loss_err:.2e}", f"{r.grad_err:.2e}",
                           f"{r.grad_err_rel:.2e}", f"{r.ms_p50:.1f}", r.status])
    return "\n\n".join([
        _table(["backend", "loss", *DIAG_COLUMNS], diag_rows),
        _table(["backend", "|loss err|", "max|grad err|", "rel grad err",
                f"fwd+bwd ms (p50 of {repeats})", "status"], check_rows),
        f"tolerance ({str(b.logits.dtype).removeprefix('torch.')}): |loss err| <= "
        f"{tol.loss:.0e}, max|grad err| / max|grad| <= {tol.grad:.1e}",
        *(["\n".join(skipped)] if skipped else []),
    ])


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of both logits tensors (default: float32)")
    p.add_argument("--batch", type=_int_at_least(1), default=4,
                   help="sequences (default: 4)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=256,
                   help="tokens per sequence (default: 256)")
    p.add_argument("--vocab", type=_int_at_least(1), default=32000,
                   help="vocabulary size (default: 32000)")
    p.add_argument("--repeats", type=_int_at_least(0), default=3,
                   help="timed fwd+bwd steps per backend after the checked one (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example batch (default: 0)")
    p.add_argument("--backends", nargs="+", choices=available_backends(), default=None,
                   help="backends to run (default: every available one)")


def run(args: argparse.Namespace) -> int:
    backends = args.backends or available_backends()
    dtype = DTYPES[args.dtype]
    b = make_batch(args.batch, args.seq_len, args.vocab, dtype, seed=args.seed)
    n_valid = int((b.targets != b.ignore_index).sum())
    info = build_info()
    print("remit_ext demo: ReMiT loss (eps=0.2, detached weights), forward + backward\n"
          f"  batch {args.batch} x {args.seq_len} tokens ({b.targets.numel()} positions, "
          f"{n_valid} valid), vocab {args.vocab}, {args.dtype}, seed {args.seed}\n"
          f"  torch {torch.__version__}, {torch.get_num_threads()} threads; extension built "
          f"against torch {info['torch_version']}, cpu={info['cpu_capability']}, "
          f"cuda={info['cuda']}\n"
          f"  backends: {', '.join(backends)}; truth: reference.remit_loss_ref in float64 "
          "with autograd\n", flush=True)
    truth = reference_run(b)
    results = [run_backend(b, name, truth, args.repeats) for name in backends]
    print(report(b, truth, results, args.repeats))
    failed = [r.backend for r in results if r.status.startswith("FAIL")]
    ran = [r.backend for r in results if r.status == "ok"]
    if failed:
        print(f"\nFAIL: {', '.join(failed)} outside tolerance")
        return 1
    if not ran:
        print("\nFAIL: no backend ran")
        return 1
    print(f"\nOK: {', '.join(ran)} within tolerance of the float64 reference")
    return 0
