"""The suite under pytest-benchmark: one test per case of ``remit-ext bench`` (bench/conftest.py
has the options). Each test

1. runs the case once and checks it against the ``reference`` provider's result on the same
   inputs (computed once per op): a wrong result fails the test; a third-party provider
   (compile, Liger, CCE, QuACK) that raises is skipped with its error, as the runner drops its
   row;
2. measures its peak memory (the runner's method);
3. times it with ``benchmark.pedantic``: on CPU the runner's repeats after one warm-up call; on a
   GPU about 25 ms of warm-up and 200 ms of calls (at least 5), each round ending in
   ``torch.cuda.synchronize()`` and preceded, untimed, by a 256 MB write that flushes the L2
   (so every call reads its inputs from HBM) and a synchronize;
4. stores the ledger row (floor_frac, vs_best, GB/s or TFLOP/s, peak memory, speed-up over
   eager, versions, sha) in ``extra_info``, so ``--benchmark-json`` carries it.

The cases are enumerated at collection by building each family at a tiny shape of the same
arity (the (op, provider) pairs do not depend on the shape); the real inputs are built when a
point's first test runs and dropped when the next point starts.
"""

from __future__ import annotations

import gc
from typing import Optional

import pytest
import torch

from remit_ext.bench import _harness as H
from remit_ext.bench import providers as P
from remit_ext.bench import runner
from bench.conftest import suite_args

_STATE: dict = {}


class Session:
    """The session's resolved arguments, environment, floors and the current point's cases."""

    def __init__(self, config):
        self.args = suite_args(config)
        self.device = self.args.device
        self.runnable, self.skipped = P.split_available(self.args.providers, self.device)
        self.fams = runner.families()
        self.env = H.env_info(self.device)
        self.floors = runner.Floors(self.device, runner._timer(self.device, self.args.quick,
                                                               self.args.repeats), self.env)
        self.rows: list = []
        self._key = None
        self._cases: dict = {}
        self.refs: dict = {}
        self.eager_ms: dict = {}
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True

    def points(self):
        return list(runner.points(self.args, self.fams))

    def enumerate(self) -> list:
        """(family, shape, dtype, op, provider) of every timed case, in run order."""
        out = []
        for fam, ops, shape, dtype in self.points():
            tiny = runner.QUICK_SHAPES[0] if fam.arity == 2 else runner.QUICK_SHAPES[1]
            for case in runner.build_cases(fam, ops, tiny, dtype, "cpu" if not
                                           torch.cuda.is_available() else self.device,
                                           self.runnable, runner.QUICK_SEQ_LEN):
                if case.provider != "reference" or "reference" in self.runnable:
                    out.append((fam.name, shape, dtype, case.op, case.provider))
        torch._dynamo.reset()
        return out

    def cases_at(self, fam_name: str, shape: tuple, dtype: torch.dtype) -> dict:
        key = (fam_name, shape, dtype)
        if key != self._key:
            self._cases, self.refs, self.eager_ms = {}, {}, {}
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
            fam = self.fams[fam_name]
            ops = self.args.plan[fam_name]
            self._cases = {(c.op, c.provider): c for c in runner.build_cases(
                fam, ops, shape, dtype, self.device, self.runnable, self.args.seq_len)}
            self._key = key
        return self._cases

    def reference(self, fam_name, shape, dtype, op) -> tuple:
        cases = self.cases_at(fam_name, shape, dtype)
        if op not in self.refs:
            runner.check(cases[(op, "reference")], self.refs, dtype)
            ref = cases[(op, "reference")]
            if ref.setup is not None:
                ref.setup()
        return self.refs[op]


def _session(config) -> Session:
    if "session" not in _STATE:
        _STATE["session"] = Session(config)
    return _STATE["session"]


def _id(s: Session, item) -> str:
    fam, shape, dtype, op, provider = item
    return (f"{op}-{provider}-{s.fams[fam].shape_label(shape)}-"
            f"{str(dtype).removeprefix('torch.')}")


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        s = _session(metafunc.config)
        items = s.enumerate()
        metafunc.parametrize("bench_case", items, ids=[_id(s, i) for i in items])


def _timings(benchmark) -> Optional[H.Timing]:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    data = sorted(1e3 * x for x in stats.stats.sorted_data)
    return H.Timing(H.quantile(data, 0.5), H.quantile(data, 0.2), H.quantile(data, 0.8),
                    len(data))


def _pedantic(benchmark, case, device: str, quick: bool, repeats: int):
    if device != "cuda":
        benchmark.pedantic(case.fn, setup=case.setup, rounds=1 if quick else repeats,
                           warmup_rounds=0 if quick else 1, iterations=1)
        return
    flush = torch.empty(256 * H.MB, dtype=torch.int8, device="cuda")

    def setup():  # untimed: restore the inputs, flush the L2, wait for both
        if case.setup is not None:
            case.setup()
        flush.zero_()
        torch.cuda.synchronize()

    def call():
        case.fn()
        torch.cuda.synchronize()

    setup()
    probe = H.time_ms(call, warmup=1, repeats=1, setup=setup).p50
    warm_ms, rep_ms = (1.0, 5.0) if quick else (25.0, 200.0)
    benchmark.pedantic(call, setup=setup, iterations=1,
                       warmup_rounds=max(1, min(1000, int(warm_ms / max(probe, 1e-3)))),
                       rounds=max(5, min(1000, int(rep_ms / max(probe, 1e-3)))))


def test_case(bench_case, benchmark, request):
    s = _session(request.config)
    fam_name, shape, dtype, op, provider = bench_case
    fam = s.fams[fam_name]
    benchmark.group = f"{op} {fam.shape_label(shape)} {str(dtype).removeprefix('torch.')}"
    case = s.cases_at(fam_name, shape, dtype)[(op, provider)]
    floor = s.floors.of_family(fam, shape, dtype)
    ref = s.reference(fam_name, shape, dtype, op)
    try:
        if case.setup is not None:
            case.setup()
        why = runner.mismatch(case.fn(), ref, dtype, tol=runner.tolerance(provider, dtype))
        if case.setup is not None:
            case.setup()
        if why:
            pytest.fail(f"{provider} disagrees with the reference: {why}")
        peak, _ = H.peak_memory_bytes(case.fn, s.device)
        if case.setup is not None:
            case.setup()
        _pedantic(benchmark, case, s.device, s.args.quick, s.args.repeats)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    except Exception as err:
        if provider not in P.THIRD_PARTY or isinstance(err, pytest.fail.Exception):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        pytest.skip(f"{provider} raised {type(err).__name__}: {first[:300]}")
    finally:
        if case.setup is not None:
            case.setup()
    t = _timings(benchmark)
    if t is None:  # --benchmark-disable: run once, nothing measured
        return
    if provider == "eager":
        s.eager_ms[op] = t.p50
    best = runner.best_of(case, fam, shape, dtype, s.env["device"], s.floors)
    row = runner.case_row(s.env, fam, case, shape, dtype, t, floor, best, peak,
                          s.eager_ms.get(op))
    s.rows.append(row)
    benchmark.extra_info.update(row)


@pytest.fixture(scope="session", autouse=True)
def _ledger(request):
    """--bench-ledger DIR: the session's rows (hardware rows first) appended to the ledger."""
    yield
    out = request.config.getoption("--bench-ledger")
    s = _STATE.get("session")
    if out and s is not None and s.rows:
        from pathlib import Path

        path = Path(out) / f"{H.device_slug(s.env['device'])}.csv"
        H.append_csv(path, s.floors.rows + s.rows, runner.COLUMNS)
