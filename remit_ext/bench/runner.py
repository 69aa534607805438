"""The benchmark runner: ``remit-ext bench [--quick] [--ops ...] [--shapes ...]`` (or ``python -m
remit_ext.bench``); in a checkout the same cases also run under pytest-benchmark (``python -m
pytest bench --benchmark-only``, ``bench/test_suite.py``).

A *case* is one op run by one provider (``providers.py``) at one shape and dtype. For each
case the runner

1. calls it once and checks its result against the ``reference`` provider's
   (``remit_ext.reference``, fp32 ground truth) on the same inputs: a remit_ext kernel that
   disagrees fails the run and nothing is written; any other provider (plain PyTorch, compile,
   Liger, CCE, QuACK), held to a tolerance for computing in the input dtype, loses that row and
   is reported (``--quick`` fails on it);
2. measures the peak memory of one call beyond what was allocated before it, outputs and
   gradients included (CUDA: the caching allocator's high-water mark; CPU: the resident set's);
3. times it: on a GPU per-call CUDA events with the L2 cache flushed before every call (about
   25 ms of warm-up, then about 200 ms of calls, at least 5), on CPU wall clock (``--repeats``);
4. reports the median and the 20th/80th percentiles, the throughput (GB/s for the memory-bound
   logits-level ops, over the bytes the op must move; TFLOP/s for the fused-linear ops, over the
   matrix products it must do), ``floor_frac`` = floor time / median time, where the floor
   time is that work at the hardware rate measured in the same run: a device-to-device copy of
   an ``N x V`` tensor of the dtype (bytes read + written per second), or a plain ``[N, D] x
   [D, V]`` matrix product in the dtype; ``vs_best`` = best time / median time against today's
   best public result (``targets.py``: published fused-linear rates on H200/H100/B200; for
   the logits-level ops one read of their ``[N, V]`` inputs at the read bandwidth measured in
   the same run); and ``speedup_vs_eager``, against plain PyTorch (``eager.py``).
   The hardware measurements are rows too (provider ``hardware``). (The step's other products,
   e.g. grad W = ``[V, N] x [N, D]``, may run faster than that one shape, so a fused-linear
   ``floor_frac`` can exceed 1 slightly.)

A full run appends its rows to ``<out-dir>/<device>.csv`` (the ledger, default
``bench/results`` under the current directory; ``remit-ext bench table`` and ``remit-ext bench
plot`` read it) and, on a GPU, records per op the remit_ext kernel backends fastest first in
``--auto-table`` (default: the user's table that ``backend="auto"`` reads,
``remit_ext._backends.user_auto_table()``). Without
``--shapes`` a GPU runs the published shapes and a CPU the CPU shapes. ``--quick`` runs tiny
shapes on any machine, checks every provider, and writes nothing: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import _backends
from . import _harness as H
from . import providers as P
from . import targets as T

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOGITS_SHAPES = [(8192, 50304), (16384, 128256), (4096, 262144)]
LINEAR_SHAPES = [(8192, 2048, 50304), (16384, 4096, 128256)]
# CPU-sized: what `remit-ext bench` and `pytest bench` run on a machine without a GPU.
CPU_SHAPES = [(1024, 32000), (1024, 128, 32000)]
QUICK_SHAPES = [(32, 256), (32, 16, 256)]
SEQ_LEN, QUICK_SEQ_LEN = 4096, 16
FAMILY_MODULES = ("suite_token_stats", "suite_weights", "suite_logits_loss",
                  "suite_linear_loss")
# remit_ext op names (remit_ext/_backends.py) whose backend="auto" order a measured op decides.
AUTO_OPS = {"token_stats": ("token_stats",), "remit_weights": ("remit_weights",),
            "weighted_ce": ("weighted_cross_entropy", "rho1_loss"),
            "remit_loss": ("remit_loss",), "pg_loss": ("pg_loss",)}
AUTO_KERNELS = ("cuda", "triton")
COLUMNS = H.COLUMNS  # the ledger's columns (_harness.py)
THIRD_PARTY = P.THIRD_PARTY
CPU_REPEATS = 5  # timed calls per CPU case (after one untimed)
# A provider's result must match the reference's to atol = rtol = this (x (1 + |ref|)).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# The same, for the providers that are not remit_ext (eager, compile, Liger, CCE, QuACK). They
# compute in the input dtype by design (bf16 log-probs, bf16 logits gradients, bf16 dW), so
# their distance from the fp32 reference is PyTorch's own low-precision error, which the gate
# bounds but cannot hold to the kernels' 2e-2: plain PyTorch's bf16 grad W at 4096 x 128 x 32000
# reached 2.3% of its largest entry. A disagreement beyond this loses that case's row (it is
# reported; --quick fails on it); a remit_ext provider that disagrees fails the run.
TOLERANCE_PEERS = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}
REMIT_PROVIDERS = ("reference",) + P.KERNEL_BACKENDS


def tolerance(provider: str, dtype: torch.dtype) -> float:
    ours = provider.split("_")[0] in REMIT_PROVIDERS
    return (TOLERANCE if ours else TOLERANCE_PEERS)[dtype]


@dataclasses.dataclass
class Case:
    """One provider running one op: ``fn()`` is one timed call and returns what is checked: a
    value, or ``(value, *gradients)`` (a None part is not checked)."""

    op: str
    provider: str
    fn: Callable[[], torch.Tensor]
    work: float  # bytes the op must move (unit GB/s) or flops it must do (unit TFLOP/s)
    unit: str
    what: str  # the work in words, e.g. "4 passes over N x V"
    setup: Optional[Callable[[], None]] = None  # before every call and after the last, untimed
    reads: int = 0  # [N, V] inputs it reads (logits-level ops: its vs_best is one read of each)


@dataclasses.dataclass
class Context:
    """What a family's ``build`` gets: the shape and dtype, the device, the providers that can
    run here (``reference`` always: the gate), and the ops asked for."""

    shape: tuple
    dtype: torch.dtype
    device: str
    providers: list
    ops: Optional[set]
    seq_len: int

    def wants(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def has(self, provider: str) -> bool:
        return provider in self.providers

    @property
    def kernels(self) -> list:
        return [p for p in P.KERNEL_BACKENDS if p in self.providers]

    def rows_of(self, n: int) -> tuple[int, int]:
        """(sequences, tokens per sequence) for N tokens: ``seq_len`` when it divides N."""
        t = self.seq_len if n % self.seq_len == 0 else n
        return n // t, t

    def generator(self, seed: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, *shape, scale: float = 1.0, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(shape, dtype=self.dtype, device=self.device)
        return x.normal_(0.0, scale, generator=g)

    def targets(self, n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
        """Token ids shaped [sequences, tokens], every 32nd ignored (-100)."""
        y = torch.randint(0, vocab, (n,), generator=g, device=self.device)
        y[::32] = -100
        return y.view(self.rows_of(n))


@dataclasses.dataclass
class Family:
    """An op family: its name, its ops, shape arity (2: N x V, 3: N x D x V), floor kind, and
    ``build(ctx) -> [Case]`` (within each op: ``reference`` first, then ``eager``)."""

    name: str
    ops: tuple
    arity: int
    floor: str  # "copy" or "matmul"
    build: Callable[[Context], list]
    shape_label: Callable[[tuple], str] = lambda s: "x".join(map(str, s))
    # (shape, dtype) of the floor measurement: the copy of an N x V tensor of the dtype, or the
    # N x D x V product, unless the family says otherwise.
    floor_of: Optional[Callable[[tuple, torch.dtype], tuple]] = None
    dtypes: Optional[tuple] = None  # the only dtypes it runs at (None: --dtypes)


def families() -> dict:
    out = {}
    for name in FAMILY_MODULES:
        fam = importlib.import_module(f"{__package__}.{name}").FAMILY
        out[fam.name] = fam
    return out


def fwd_bwd(loss_fn: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor]):
    """A case body: the loss and its gradients for ``wrt`` (returned by autograd, so nothing
    accumulates between calls), both checked: ``(loss, *gradients)``."""
    def fn():
        loss = loss_fn()
        return (loss.detach(), *torch.autograd.grad(loss, list(wrt)))
    return fn


# ------------------------------------------------------------------------------- measuring


def _timer(device: str, quick: bool, repeats: int = CPU_REPEATS):
    if device == "cuda":
        if quick:
            return lambda fn, setup: H.cuda_time_ms(fn, setup=setup, warmup_ms=1, rep_ms=5)
        return lambda fn, setup: H.cuda_time_ms(fn, setup=setup)
    reps, warm = (1, 0) if quick else (repeats, 1)
    return lambda fn, setup: H.time_ms(fn, warmup=warm, repeats=reps, setup=setup)


def measure_floor(kind: str, shape: tuple, dtype: torch.dtype, device: str, timer) -> dict:
    """A hardware rate measured now: bytes/s of a copy of an N x V tensor ("copy"), of reading
    one ("read": the sum of an fp32 tensor of as many bytes, a pure read stream on any device),
    or flop/s of a plain [N, D] x [D, V] product ("matmul")."""
    g = torch.Generator(device=device).manual_seed(1)
    if kind in ("copy", "read"):
        n, v = shape[0], shape[-1]
        nbytes = n * v * (torch.finfo(dtype).bits // 8)
        if kind == "copy":
            src = torch.empty(n, v, dtype=dtype, device=device).normal_(generator=g)
            dst = torch.empty_like(src)
            t = timer(lambda: dst.copy_(src), None)
            work, what = 2 * nbytes, f"copy of {n} x {v}"
        else:
            src = torch.empty(max(nbytes // 4, 1), device=device).normal_(generator=g)
            t = timer(lambda: src.sum(), None)
            work, what = nbytes, f"read of {n} x {v}"
        rate, unit = work / (t.p50 * 1e-3), "GB/s"
    else:
        n, d, v = shape
        a = torch.empty(n, d, dtype=dtype, device=device).normal_(generator=g)
        b = torch.empty(v, d, dtype=dtype, device=device).normal_(generator=g)
        t = timer(lambda: a @ b.T, None)
        work = 2.0 * n * d * v
        rate, unit, what = work / (t.p50 * 1e-3), "TFLOP/s", f"[{n}, {d}] x [{d}, {v}] matmul"
    del g
    return {"rate": rate, "unit": unit, "what": what, "timing": t, "kind": kind,
            "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch.")}


class Floors:
    """The hardware measurements of a run, each made once (on first use) and kept as a
    ``hardware`` row."""

    def __init__(self, device: str, timer, env: dict):
        self.device, self.timer, self.env = device, timer, env
        self.measured: dict = {}
        self.rows: list = []

    def get(self, kind: str, shape: tuple, dtype: torch.dtype, tag: str = "") -> dict:
        key = (kind, tuple(shape), dtype)
        if key not in self.measured:
            fl = self.measured[key] = measure_floor(kind, shape, dtype, self.device, self.timer)
            self.rows.append(_row(self.env, kind, "hardware", fl["shape"], fl["dtype"],
                                  fl["timing"], _scaled(fl["rate"], fl["unit"]), fl["unit"],
                                  fl["what"], None, None, None, None, ""))
            print(f"{tag}{fl['what']} {fl['dtype']}: {self.rows[-1]['throughput']} "
                  f"{fl['unit']}", flush=True)
        return self.measured[key]

    def of_family(self, fam: "Family", shape: tuple, dtype: torch.dtype) -> dict:
        """The floor a family's cases are held to at (shape, dtype)."""
        f_shape, f_dtype = (fam.floor_of(shape, dtype) if fam.floor_of
                            else (shape if fam.floor == "matmul" else shape[:2], dtype))
        return self.get(fam.floor, f_shape, f_dtype, tag=f"[{fam.name}] ")


def _scaled(rate: float, unit: str) -> float:
    return rate / (1e9 if unit == "GB/s" else 1e12)


def as_parts(out) -> tuple:
    """A case's result as (value, *gradients); None parts are not checked."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def to_host(out) -> tuple:
    """The reference's result, kept on the host while the op's other providers run (on a GPU
    the device memory is for them)."""
    return tuple(None if t is None else t.detach().to("cpu", copy=True) for t in as_parts(out))


def mismatch(out, ref: tuple, dtype: torch.dtype, rows_per_chunk: int = 1024,
             tol: Optional[float] = None) -> Optional[str]:
    """Why ``out`` is not the reference's result within the dtype's tolerance (None when it is).

    The value (the loss, or the statistics) must agree to ``tol x (1 + |ref|)`` element by
    element; a gradient to ``tol x (|ref| + max |ref|)``, i.e. relative to its largest entry
    (most entries of a softmax gradient over a large vocabulary are far below 1). NaN never
    agrees. Compared in fp32 on the result's device, a block of rows at a time."""
    parts, tol = as_parts(out), TOLERANCE[dtype] if tol is None else tol
    if len(parts) != len(ref):
        return f"{len(parts)} results vs the reference's {len(ref)}"
    for i, (o, r) in enumerate(zip(parts, ref)):
        if o is None or r is None:
            continue
        what = "value" if i == 0 else f"gradient {i}"
        if tuple(o.shape) != tuple(r.shape):
            return f"{what}: shape {tuple(o.shape)} vs the reference's {tuple(r.shape)}"
        o2, r2 = o.detach().reshape(o.shape[0] if o.dim() else 1, -1), r.reshape(
            r.shape[0] if r.dim() else 1, -1)
        scale = 1.0 if i == 0 else float(r2.abs().max()) if r2.numel() else 0.0
        bad, first = 0, None
        for s0 in range(0, o2.shape[0], rows_per_chunk):
            oc = o2[s0:s0 + rows_per_chunk].float()
            rc = r2[s0:s0 + rows_per_chunk].to(oc.device, torch.float32)
            off = ~((oc - rc).abs() <= tol * (rc.abs() + scale))
            n_off = int(off.sum())
            if n_off and first is None:
                j = int(off.flatten().nonzero()[0])
                first = (oc.flatten()[j].item(), rc.flatten()[j].item())
            bad += n_off
        if bad:
            return (f"{what}: {bad} of {o.numel()} entries off, e.g. {first[0]:.6g} vs "
                    f"{first[1]:.6g} (tolerance {tol:g} x (|ref| + {scale:.3g}))")
    return None


def points(args, fams: dict):
    """(family, ops asked for, shape, dtype) in the order a run measures them."""
    for fam_name, ops in args.plan.items():
        fam = fams[fam_name]
        for shape in (s for s in args.shapes if len(s) == fam.arity):
            for dtype_name in fam.dtypes or args.dtypes:
                yield fam, ops, shape, DTYPES[dtype_name]


def build_cases(fam: Family, ops, shape: tuple, dtype: torch.dtype, device: str,
                runnable: Sequence[str], seq_len: int) -> list:
    """A family's cases at one point, with fresh compile caches: one code object compiled at
    every (op, shape, dtype) would pass dynamo's recompile limit and silently run eagerly."""
    torch._dynamo.reset()
    ctx = Context(shape, dtype, device, ["reference"] + [p for p in runnable if p != "reference"],
                  ops, seq_len)
    return fam.build(ctx)


def check(case: Case, refs: dict, dtype: torch.dtype) -> Optional[str]:
    """Run ``case`` once (its setup first) and check it: the reference's result is stored in
    ``refs[op]``; anyone else's is compared with it. Returns why it is wrong (None: right).
    Raises what the case raises, and KeyError when the op has no reference result."""
    if case.setup is not None:
        case.setup()
    out = case.fn()
    if case.provider == "reference":
        refs[case.op] = to_host(out)
        return None
    return mismatch(out, refs[case.op], dtype, tol=tolerance(case.provider, dtype))


def best_of(case: Case, fam: Family, shape: tuple, dtype: torch.dtype, device_name: str,
            floors: Floors) -> tuple[Optional[float], str]:
    """(best ms, what it is) for a case: targets.py."""
    if fam.floor == "matmul":
        return T.linear_best(device_name, case.work)
    if case.reads:
        rd = floors.get("read", shape[:2], dtype)
        n, v = shape[0], shape[-1]
        return T.read_best(case.reads, n * v * (torch.finfo(dtype).bits // 8), rd["rate"],
                           f"{rd['what']} {rd['dtype']}")
    return None, ""


def case_row(env: dict, fam: Family, case: Case, shape: tuple, dtype: torch.dtype, t,
             floor: dict, best: tuple, peak, eager_ms) -> dict:
    """A ledger row for a timed case."""
    label, dtype_name = fam.shape_label(shape), str(dtype).removeprefix("torch.")
    floor_ms = case.work / floor["rate"] * 1e3
    return _row(env, case.op, case.provider, label, dtype_name, t,
                _scaled(case.work / (t.p50 * 1e-3), case.unit), case.unit,
                f"{case.what} at the measured {floor['what']}", floor_ms, peak, eager_ms,
                best[0], best[1])


def run(args) -> tuple[list, list, dict, list]:
    """Measure every selected case. Returns (rows, failures, {provider: why skipped}, [the
    third-party cases that raised, and why])."""
    device = args.device
    env = H.env_info(device)
    runnable, skipped = P.split_available(args.providers, device)
    for p, why in skipped.items():
        print(f"skipping provider {p}: {why}", flush=True)
    timer = _timer(device, args.quick, args.repeats)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        # Past the limit dynamo would fall back to eager and the row would be labelled
        # "compile"; raising makes it a reported failure instead.
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    floors = Floors(device, timer, env)
    rows, failures, broken = [], [], []
    for fam, ops, shape, dtype in points(args, families()):
        floor = floors.of_family(fam, shape, dtype)
        cases = build_cases(fam, ops, shape, dtype, device, runnable, args.seq_len)
        rows += _run_cases(fam, cases, shape, dtype, device, floor, floors, env, timer,
                           failures, timed=set(runnable), broken=broken)
        del cases
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return floors.rows + rows, failures, skipped, broken


def _run_cases(fam: Family, cases: list, shape: tuple, dtype: torch.dtype, device: str,
               floor: dict, floors: Floors, env: dict, timer, failures, timed: set,
               broken: list) -> list:
    label, dtype_name = fam.shape_label(shape), str(dtype).removeprefix("torch.")
    refs, eager_ms, rows = {}, {}, []
    for case in cases:
        tag = f"[{fam.name}] {case.op:<18} {case.provider:<15} {label} {dtype_name}"
        where = f"{case.op} {label} {dtype_name}: {case.provider}"
        if case.provider == "reference":
            refs = {}  # an op's reference is dropped when the next op starts
        elif case.op not in refs:
            print(f"{tag}: the reference did not run, nothing to check against: no row",
                  flush=True)
            broken.append(f"{where} not measured (no reference to check it against)")
            continue
        try:
            why = check(case, refs, dtype)
            if why and case.provider.split("_")[0] in REMIT_PROVIDERS:
                failures.append(f"{tag}: {why}")
                print(f"{tag}: WRONG RESULT: {why}", flush=True)
                continue
            if why:
                print(f"{tag}: disagrees with the reference ({why}), no row", flush=True)
                broken.append(f"{where} disagrees with the reference: {why}")
                continue
            if case.provider == "reference" and "reference" not in timed:
                continue  # the reference, for the checks only
            if case.setup is not None:
                case.setup()
            peak, _ = H.peak_memory_bytes(case.fn, device)
            t = timer(case.fn, case.setup)
        except torch.OutOfMemoryError:
            print(f"{tag}: out of memory, no row", flush=True)
            broken.append(f"{where} ran out of memory")
            continue
        except Exception as err:
            if case.provider not in THIRD_PARTY:
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            why = f"{type(err).__name__}: {first}"
            # torch.compile, Liger, CCE and QuACK are measured as they are: when one of them
            # breaks on a case (a compiler bug, an unsupported shape) that case has no row, and
            # says why.
            print(f"{tag}: {case.provider} failed ({why[:300]}), no row", flush=True)
            broken.append(f"{where} raised {why[:300]}")
            continue
        finally:
            if case.setup is not None:
                case.setup()  # leave the inputs as the next case expects them
            if device == "cuda":
                torch.cuda.empty_cache()
        if case.provider == "eager":
            eager_ms[case.op] = t.p50
        best = best_of(case, fam, shape, dtype, env["device"], floors)
        row = case_row(env, fam, case, shape, dtype, t, floor, best, peak,
                       eager_ms.get(case.op))
        rows.append(row)
        best_s, eager_s = (str(row[k]) if row[k] != "" else "-"
                           for k in ("vs_best", "speedup_vs_eager"))
        print(f"{tag}: {row['ms_p50']:>9} ms  {row['throughput']:>8} {case.unit:<7} floor "
              f"{row['floor_frac']:<6} best {best_s:<6} {row['peak_mem_MB']:>9} MB  "
              f"x{eager_s}", flush=True)
    return rows


def _row(env, op, provider, shape, dtype, t, throughput, unit, floor, floor_ms, peak,
         eager_ms, best_ms=None, best="") -> dict:
    base = provider.split("_")[0]
    return {
        "op": op, "provider": provider, "shape": shape, "dtype": dtype,
        "ms_p50": round(t.p50, 4), "ms_p20": round(t.p20, 4), "ms_p80": round(t.p80, 4),
        "throughput": float(f"{throughput:.4g}"), "unit": unit,
        "floor_frac": "" if floor_ms is None else round(floor_ms / t.p50, 3),
        "floor_ms": "" if floor_ms is None else round(floor_ms, 4), "floor": floor,
        "vs_best": "" if best_ms is None else round(best_ms / t.p50, 3),
        "best_ms": "" if best_ms is None else round(best_ms, 4), "best": best,
        "peak_mem_MB": "" if peak is None else round(peak / H.MB, 1),
        "speedup_vs_eager": "" if eager_ms is None else round(eager_ms / t.p50, 2),
        "provider_version": P.version(base) or "",
        **{k: env[k] for k in ("device", "torch_version", "triton_version", "git_sha",
                               "date", "thp")},
    }


# --------------------------------------------------------------------------- auto table


def auto_table_rows(rows: Sequence[dict]) -> dict:
    """{remit_ext op: [kernel backends, fastest first]} from measured rows: ms p50 summed over
    the (shape, dtype) points, only for backends measured at every point of that op."""
    out = {}
    for op, select_ops in AUTO_OPS.items():
        mine = [r for r in rows if r["op"] == op and r["provider"] in AUTO_KERNELS]
        points = {(r["shape"], r.get("dtype")) for r in mine}
        totals = {}
        for p in AUTO_KERNELS:
            ms = [float(r["ms_p50"]) for r in mine if r["provider"] == p]
            if points and len(ms) == len(points):
                totals[p] = sum(ms)
        if totals:
            for select_op in select_ops:
                out[select_op] = sorted(totals, key=totals.get)
    return out


def write_auto_table(path: Path, device: str, order: dict, env: dict) -> None:
    """Record ``order`` for ``device`` in the table at ``path``, keeping its other entries; a new
    table starts from the one shipped in the package (its measured devices stay measured)."""
    source = path if path.exists() else _backends.AUTO_TABLE
    data = json.loads(source.read_text()) if source.exists() else {}
    data.setdefault("devices", {})
    data["note"] = ("Per-device backend order for backend='auto', fastest first, written by "
                    "`remit-ext bench` (ms p50 summed over its shapes and dtypes); devices not "
                    "listed use the default order in remit_ext/_backends.py.")
    data["devices"].setdefault(device, {}).update(order)
    data.setdefault("measured", {})[device] = {k: env[k] for k in ("git_sha", "date",
                                                                   "torch_version")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------- CLI


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected NxV (logits-level ops) or NxDxV (fused-linear ops) with positive "
            f"integers, got {text!r}")
    return shape


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, every provider checked, nothing written (CI smoke test)")
    ap.add_argument("--ops", nargs="+", metavar="OP",
                    help="op families (token_stats, weights, logits_loss, linear_loss) or single "
                         "ops (e.g. remit_loss); default: all")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, metavar="SHAPE",
                    help="NxV for the logits-level families, NxDxV for linear_loss (default: "
                         "the published set on a GPU, 1024x32000 1024x128x32000 on CPU; "
                         "--quick: 32x256 and 32x16x256)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                    help="default: bfloat16 float32")
    ap.add_argument("--providers", nargs="+", choices=P.PROVIDERS,
                    help="default: all but reference (which runs for the correctness gate "
                         "and is timed only when listed), and on CPU without --quick all but "
                         "triton too (its interpreter takes minutes a call at CPU shapes); "
                         "those that cannot run here are skipped with the reason")
    ap.add_argument("--repeats", type=int, default=CPU_REPEATS,
                    help=f"timed calls per case on CPU, after one untimed (default "
                         f"{CPU_REPEATS}; a GPU times ~200 ms of calls)")
    ap.add_argument("--seq-len", type=int, help=f"tokens per sequence for ReMiT's centring "
                                                f"(default {SEQ_LEN}; --quick {QUICK_SEQ_LEN})")
    ap.add_argument("--out-dir", type=Path, default=H.RESULTS,
                    help="where <device>.csv and <device>.md go (default: bench/results under "
                         "the current directory, the repository's ledger when run from its root)")
    ap.add_argument("--auto-table", default=None, metavar="PATH",
                    help="the backend='auto' table a full GPU run updates (default: the one "
                         "backend='auto' reads: $REMIT_AUTO_TABLE, else "
                         "$XDG_CACHE_HOME/remit_ext/auto_table.json or "
                         "~/.cache/remit_ext/auto_table.json; '' leaves every table alone)")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the inputs live (default: cuda when there is one)")
    ap.add_argument("--no-write", action="store_true", help="print only")


def resolve(ap: argparse.ArgumentParser, args, fams: dict) -> None:
    """Fill defaults and turn --ops into {family: set of ops or None (all)}; errors go
    through the parser."""
    if args.shapes is None:
        args.shapes = (QUICK_SHAPES if args.quick else CPU_SHAPES if args.device == "cpu"
                       else LOGITS_SHAPES + LINEAR_SHAPES)
    args.dtypes = args.dtypes or ["bfloat16", "float32"]
    if args.providers is None:
        args.providers = [p for p in P.DEFAULT_PROVIDERS
                          if not (p == "triton" and args.device == "cpu" and not args.quick)]
    if args.seq_len is None:
        args.seq_len = QUICK_SEQ_LEN if args.quick else SEQ_LEN
    if args.seq_len < 1:
        ap.error(f"--seq-len: expected a positive integer, got {args.seq_len}")
    if args.repeats < 1:
        ap.error(f"--repeats: expected a positive integer, got {args.repeats}")
    op_family = {op: f.name for f in fams.values() for op in f.ops}
    plan: dict = {}  # family -> the ops asked for (None: all of them)
    for item in args.ops or list(fams):
        if item in fams:
            plan[item] = None
        elif item in op_family:
            fam = op_family[item]
            if plan.get(fam, set()) is not None:
                plan.setdefault(fam, set()).add(item)
        else:
            ap.error(f"--ops: {item!r} is neither a family ({', '.join(fams)}) nor an op "
                     f"({', '.join(sorted(op_family))})")
    args.plan = plan
    if not any(len(s) == fams[f].arity for f in plan for s in args.shapes):
        ap.error(f"--shapes: none of {args.shapes} fits the selected ops (NxV for "
                 f"token_stats/weights/logits_loss, NxDxV for linear_loss)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "remit-ext bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    fams = families()
    resolve(ap, args, fams)
    rows, failures, skipped, broken = run(args)
    if failures:
        print("\nresults that disagree with the reference (nothing written):\n  "
              + "\n  ".join(failures), file=sys.stderr)
        return 1
    if not rows:
        print("no case ran", file=sys.stderr)
        return 1
    if args.quick and broken:  # a smoke test must not let a failing case pass unseen
        print("\n--quick: cases that failed:\n  " + "\n  ".join(broken), file=sys.stderr)
        return 1
    if args.quick or args.no_write:
        print(f"\n{len(rows)} rows measured; not written"
              f"{' (--quick timings mean nothing)' if args.quick else ''}")
        return 0
    from . import report

    device = rows[0]["device"]
    csv_path = args.out_dir / f"{H.device_slug(device)}.csv"
    H.append_csv(csv_path, rows, COLUMNS)
    md = report.markdown(report.latest_run(report.load(csv_path)), skipped=skipped,
                         broken=broken)
    csv_path.with_suffix(".md").write_text(md)
    print(f"\nappended {len(rows)} rows to {csv_path}; wrote {csv_path.with_suffix('.md')}")
    # The backend="auto" table is measured at published shapes only (tiny shapes time
    # launches, not kernels; a subset of them serves, as the time-capped GPU check runs); a run
    # of some ops updates those ops' entries and keeps the rest.
    published = set(LOGITS_SHAPES + LINEAR_SHAPES)
    table = _backends.user_auto_table() if args.auto_table is None else args.auto_table
    if args.device == "cuda" and table and set(args.shapes) <= published:
        order = auto_table_rows(rows)
        if order:
            write_auto_table(Path(table), device, order, H.env_info("cuda"))
            print(f"backend='auto' order for {device}: {order} -> {table}")
    return 0
