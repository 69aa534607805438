"""The benchmark suite (``remit_ext.bench``, and the repository's ``bench/``): argument handling,
the correctness gate, the ledger, the targets, the auto table, the report and plots, the
plain-PyTorch baseline, the pytest-benchmark entry point, and ``remit-ext bench`` / ``python -m
remit_ext.bench`` / ``python -m bench`` from a plain shell (no TRITON_INTERPRET preset). Timings
are never asserted: they are what the suite measures, not what it is tested on."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from remit_ext import _backends as B  # noqa: E402
from remit_ext.__main__ import main as cli_main  # noqa: E402
from remit_ext.bench import _harness as H  # noqa: E402
from remit_ext.bench import providers as P  # noqa: E402
from remit_ext.bench import report, runner  # noqa: E402
from remit_ext.bench import targets as T  # noqa: E402


def _resolve(argv):
    ap = runner.argparse.ArgumentParser()
    runner.add_run_arguments(ap)
    args = ap.parse_args(argv)
    runner.resolve(ap, args, runner.families())
    return args


def test_shapes_parse_and_reject():
    assert runner.parse_shape("8192x50304") == (8192, 50304)
    assert runner.parse_shape("16384X4096x128256") == (16384, 4096, 128256)
    for bad in ("8192", "1x2x3x4", "0x10", "ax10", "-1x5"):
        with pytest.raises(runner.argparse.ArgumentTypeError, match="NxV"):
            runner.parse_shape(bad)


def test_ops_select_families_and_single_ops():
    args = _resolve(["--quick"])
    assert args.plan == {f: None for f in runner.families()}
    assert args.shapes == runner.QUICK_SHAPES and args.dtypes == ["bfloat16", "float32"]
    args = _resolve(["--quick", "--ops", "remit_loss", "pg_loss", "token_stats"])
    assert args.plan == {"logits_loss": {"remit_loss", "pg_loss"}, "token_stats": None}
    # A whole family asked for as well as one of its ops: the whole family.
    assert _resolve(["--quick", "--ops", "weights", "remit_weights"]).plan == {"weights": None}


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--ops", "nope"], "neither a family"),
    (["--quick", "--ops", "linear_loss", "--shapes", "64x100"], "none of"),
    (["--quick", "--seq-len", "0"], "--seq-len"),
])
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        _resolve(argv)
    assert message in capsys.readouterr().err


def test_defaults_follow_the_device():
    """No --shapes: the published set on a GPU, CPU shapes on CPU; on CPU without --quick the
    Triton interpreter is left out of the default providers (minutes a call at CPU shapes),
    and the reference is never timed unless asked for."""
    args = _resolve(["--device", "cpu"])
    assert args.shapes == runner.CPU_SHAPES
    assert "triton" not in args.providers and "reference" not in args.providers
    assert {"eager", "compile", "cpu", "quack"} <= set(args.providers)
    assert "triton" in _resolve(["--quick", "--device", "cpu"]).providers
    assert "reference" in _resolve(["--quick", "--providers", "reference", "cpu"]).providers
    if torch.cuda.is_available():
        assert _resolve(["--device", "cuda"]).shapes == runner.LOGITS_SHAPES + \
            runner.LINEAR_SHAPES


def test_mismatch_gate():
    ref = torch.tensor([1.0, -12.0, 0.0])
    host = runner.to_host(ref)
    assert runner.mismatch(ref + 1e-6, host, torch.float32) is None
    assert "value: 1 of 3 entries off" in runner.mismatch(ref + torch.tensor([0, 0.1, 0]), host,
                                                          torch.float32)
    assert runner.mismatch(ref + torch.tensor([0, 0.1, 0]), host, torch.bfloat16) is None
    assert "entries off" in runner.mismatch(torch.tensor([1.0, float("nan"), 0.0]), host,
                                            torch.bfloat16)
    assert "shape" in runner.mismatch(ref[:2], host, torch.float32)
    # Gradients: relative to their largest reference entry, not to 1 (a softmax gradient's
    # entries are tiny), so a wrong small entry is caught; None parts are not compared.
    grad = torch.tensor([[1e-3, 1e-6], [-1e-3, 0.0]])
    ref2 = runner.to_host((torch.tensor(2.0), grad))
    assert runner.mismatch((torch.tensor(2.0), grad + 1e-8), ref2, torch.float32) is None
    assert "gradient 1: 1 of 4 entries off" in runner.mismatch(
        (torch.tensor(2.0), grad + torch.tensor([[0, 1e-5], [0, 0]])), ref2, torch.float32)
    assert runner.mismatch((None, grad), runner.to_host((None, grad)), torch.float32) is None
    assert "2 results" in runner.mismatch((torch.tensor(2.0), grad), runner.to_host(ref),
                                          torch.float32)


def test_providers_say_why_they_cannot_run(monkeypatch):
    for p in ("reference", "eager", "compile"):
        assert P.unavailable(p, "cpu") is None
    for p in ("liger", "cce", "quack"):
        assert "CUDA devices only" in P.unavailable(p, "cpu")
    assert P.unavailable("cuda", "cpu") is not None  # no build runs its kernels on CPU
    assert P.unavailable("triton", "cpu") is None  # conftest set TRITON_INTERPRET=1 in time
    import triton.language as tl

    # Set after triton was imported, the variable cannot turn the interpreter on: said so
    # instead of every launch failing with "Cannot call @triton.jit'd outside of a kernel".
    monkeypatch.setattr(tl, "zeros", object())
    assert "before starting Python" in P.unavailable("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in P.unavailable("triton", "cpu")
    with pytest.raises(ValueError, match="provider"):
        P.unavailable("numpy", "cpu")
    ok, why = P.split_available(["eager", "liger"], "cpu")
    assert ok == ["eager"] and set(why) == {"liger"}


def test_ledger_refuses_a_different_header(tmp_path):
    path = tmp_path / "x.csv"
    H.append_csv(path, [{"a": 1, "b": 2}], ["a", "b"])
    H.append_csv(path, [{"a": 3, "b": 4}], ["a", "b"])
    assert [r["a"] for r in report.load(path)] == ["1", "3"]
    with pytest.raises(ValueError, match="header"):
        H.append_csv(path, [{"a": 1}], ["a", "c"])


def test_device_slug():
    assert H.device_slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert H.device_slug("a/b c") == "a_b_c"


def test_auto_table_ranks_kernels_measured_everywhere(tmp_path):
    rows = [{"op": op, "provider": p, "shape": shape, "dtype": dt, "ms_p50": ms}
            for op, p, shape, dt, ms in [
                ("token_stats", "cuda", "a", "bfloat16", 1.0),
                ("token_stats", "cuda", "a", "float32", 1.0),
                ("token_stats", "triton", "a", "bfloat16", 1.5),
                ("token_stats", "triton", "a", "float32", 1.0),
                ("token_stats", "eager", "a", "bfloat16", 0.1),  # never ranked
                ("token_stats", "cuda_inplace", "a", "bfloat16", 0.1),  # not a backend
                ("remit_loss", "cuda", "a", "bfloat16", 2.0),
                ("remit_loss", "cuda", "b", "bfloat16", 2.0),
                ("remit_loss", "triton", "a", "bfloat16", 1.0),  # missing shape b
                ("weighted_ce", "triton", "a", "float32", 1.0)]]
    order = runner.auto_table_rows(rows)
    assert order == {"token_stats": ["cuda", "triton"], "remit_loss": ["cuda"],
                     "weighted_cross_entropy": ["triton"], "rho1_loss": ["triton"]}
    path = tmp_path / "auto.json"
    env = {"git_sha": "x", "date": "d", "torch_version": "t"}
    runner.write_auto_table(path, "GPU X", order, env)
    runner.write_auto_table(path, "GPU Y", {"token_stats": ["triton"]}, env)
    # A later run of some ops on the same device updates those ops and keeps the others.
    runner.write_auto_table(path, "GPU X", {"pg_loss": ["triton", "cuda"]}, env)
    assert set(json.loads(path.read_text())["devices"]) == {"GPU X", "GPU Y"}
    assert json.loads(path.read_text())["devices"]["GPU X"]["remit_loss"] == ["cuda"]
    table = B.load_auto_table(str(path))
    assert table["GPU X"]["token_stats"] == ("cuda", "triton")
    assert B.auto_order("token_stats", "cuda", "GPU Y", table=table) == ("triton", "cuda",
                                                                         "torch")


def test_the_auto_table_goes_to_the_users_path_seeded_from_the_shipped_one(tmp_path,
                                                                          monkeypatch):
    """A GPU run updates the table backend="auto" reads (B.user_auto_table(), outside the
    installed package) unless --auto-table names another ('' none); a new table keeps the
    devices the package's shipped table has measured."""
    assert _resolve([]).auto_table is None  # runner.main: None -> B.user_auto_table()
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"devices": {"GPU S": {"token_stats": ["cuda"]}}}))
    monkeypatch.setattr(B, "AUTO_TABLE", shipped)
    mine = tmp_path / "cache" / "remit_ext" / "auto_table.json"
    env = {"git_sha": "x", "date": "d", "torch_version": "t"}
    runner.write_auto_table(mine, "GPU U", {"remit_loss": ["cuda", "triton"]}, env)
    assert B.load_auto_table(str(mine)) == {"GPU S": {"token_stats": ("cuda",)},
                                            "GPU U": {"remit_loss": ("cuda", "triton")}}
    assert json.loads(shipped.read_text())["devices"] == {"GPU S": {"token_stats": ["cuda"]}}


def _row(op, provider, shape, dtype, ms, frac, date):
    return {**{c: "" for c in runner.COLUMNS}, "op": op, "provider": provider, "shape": shape,
            "dtype": dtype, "ms_p50": ms, "floor_frac": frac, "date": date, "device": "GPU X",
            "git_sha": "abc", "torch_version": "2.11", "triton_version": "3.6",
            "throughput": 1.0, "unit": "GB/s"}


def test_report_reads_the_latest_run_and_fills_the_readme(tmp_path, monkeypatch):
    old = [_row("remit_loss", "eager", "8x16", "bfloat16", 9.0, 0.1, "2026-01-01T00:00:00Z")]
    new = [_row("copy", "hardware", "8x16", "bfloat16", 0.5, "", "2026-02-01T00:00:00Z"),
           _row("remit_loss", "eager", "8x16", "bfloat16", 8.0, 0.125, "2026-02-01T00:00:00Z"),
           _row("remit_loss", "triton", "8x16", "bfloat16", 1.25, 0.8, "2026-02-01T00:00:00Z")]
    path = tmp_path / "GPU_X.csv"
    H.append_csv(path, old + new, runner.COLUMNS)
    rows = report.latest_run(report.load(path))
    assert len(rows) == 3 and {r["date"] for r in rows} == {"2026-02-01T00:00:00Z"}
    table = report.compact_table(rows)
    assert "| remit_loss | 8x16 | bfloat16 | 8 (0.12) | 1.25 (0.80) |" in table
    assert "hardware" not in table and "9 (" not in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\nrest\n")
    assert report.main("table", ["--csv", str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "1.25 (0.80)" in text and "2026-02-01" in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
    # --readme without a path fills docs/benchmarks.md (here a stand-in), which holds the block.
    assert report.README_START in (REPO / report.BENCH_DOC).read_text()
    readme.write_text(f"{report.README_START}\nold table\n{report.README_END}\n")
    monkeypatch.setattr(report, "BENCH_DOC", readme)
    assert report.main("table", ["--csv", str(path), "--readme"]) == 0
    assert "1.25 (0.80)" in readme.read_text()
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        report.update_readme(readme, "x")
    out = tmp_path / "plots"
    assert report.main("plot", ["--csv", str(path), "--out-dir", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["GPU_X_remit_loss.png"]
    assert (out / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_full_cpu_run_writes_the_ledger(tmp_path):
    """Not --quick: rows are checked against the reference (run, not timed), appended to
    <device>.csv with the ledger's columns, summarised in <device>.md; a second run appends.
    eager + cpu only, to stay fast. The logits-level rows carry vs_best (one read of their
    inputs at the measured read bandwidth, itself a hardware row); the weights rows none."""
    argv = ["--ops", "weights", "remit_loss", "--shapes", "64x100", "--dtypes", "float32",
            "--providers", "eager", "cpu", "--seq-len", "16", "--out-dir", str(tmp_path),
            "--auto-table", "", "--device", "cpu"]
    assert runner.main(argv) == 0
    path = tmp_path / "cpu.csv"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == runner.COLUMNS
    rows = report.load(path)
    got = {(r["op"], r["provider"]) for r in rows}
    assert got == {("copy", "hardware"), ("read", "hardware"), ("remit_weights", "eager"),
                   ("remit_weights", "cpu"), ("remit_weights_varlen", "eager"),
                   ("remit_weights_varlen", "cpu"), ("remit_loss", "eager"),
                   ("remit_loss", "cpu"), ("remit_loss", "cpu_inplace")}
    for r in rows:
        assert float(r["ms_p50"]) > 0 and float(r["ms_p20"]) <= float(r["ms_p80"])
        if r["provider"] != "hardware":
            # Filled in, not > 0: the ledger rounds, and a tiny op on a loaded 2-core machine
            # can sit below 0.0005 of its floor (seen in CI runs beside other jobs).
            assert r["floor_frac"] != "" and float(r["floor_frac"]) >= 0
            assert r["speedup_vs_eager"] != ""
            assert (r["vs_best"] != "") == (r["op"] == "remit_loss")
        if r["op"] == "remit_loss":
            assert "one read of 2 N x V inputs" in r["best"]
    assert {r["shape"] for r in rows if r["op"] == "remit_weights"} == {"64"}
    assert "remit_loss" in (tmp_path / "cpu.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    with pytest.raises(SystemExit):  # the README's table is for GPU runs
        report.main("table", ["--csv", str(path), "--readme", str(readme)])
    assert readme.read_text() == f"{report.README_START}\n{report.README_END}\n"
    assert runner.main(argv) == 0
    assert len(report.load(path)) == 2 * len(rows)


def test_a_wrong_provider_fails_the_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def build(ctx):
        x = torch.arange(4.0)
        return [runner.Case("toy", "reference", lambda: x, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "eager", lambda: x, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "cpu", lambda: x + 1, 16, "GB/s", "16 bytes")]

    toy = runner.Family("toy", ("toy",), 2, "copy", build)
    monkeypatch.setattr(runner, "families", lambda: {"toy": toy})
    code = runner.main(["--ops", "toy", "--shapes", "4x4", "--dtypes", "float32", "--providers",
                        "eager", "cpu", "--out-dir", str(tmp_path), "--auto-table", "",
                        "--device", "cpu"])
    assert code == 1
    assert "toy" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_wrong_peer_loses_its_row_only(tmp_path, monkeypatch):
    """Plain PyTorch (or Liger, CCE, QuACK, compile) off the reference beyond its low-precision
    tolerance: no row, reported, the run goes on; --quick fails on it."""
    x = torch.arange(4.0)

    def build(ctx):
        return [runner.Case("toy", "reference", lambda: x, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "eager", lambda: x * 1.2, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "cpu", lambda: x * (1 + 1e-6), 16, "GB/s", "16 bytes")]

    toy = runner.Family("toy", ("toy",), 2, "copy", build)
    monkeypatch.setattr(runner, "families", lambda: {"toy": toy})
    argv = ["--ops", "toy", "--shapes", "4x4", "--dtypes", "float32", "--providers", "eager",
            "cpu", "--out-dir", str(tmp_path), "--auto-table", "", "--device", "cpu"]
    assert runner.main(argv) == 0
    assert {r["provider"] for r in report.load(tmp_path / "cpu.csv")} == {"hardware", "cpu"}
    assert "eager disagrees with the reference" in (tmp_path / "cpu.md").read_text()
    assert runner.main(["--quick", *argv]) == 1
    assert runner.tolerance("eager", torch.bfloat16) > runner.tolerance("cpu_inplace",
                                                                        torch.bfloat16)


def test_inplace_cases_leave_the_logits_as_they_found_them():
    """The logits-loss family restores its shared logits after an in-place case, so the cases
    after it see the same inputs (else their checks would compare different problems)."""
    from remit_ext.bench import suite_logits_loss

    ctx = runner.Context((32, 64), torch.float32, "cpu",
                         ["reference", "eager", "cpu", "liger", "quack"], {"remit_loss"}, 16)
    cases = suite_logits_loss.build(ctx)
    # Liger's forward writes its gradient into the logits too (not run here: needs CUDA);
    # QuACK's does not unless asked to (inplace_backward=False, its default).
    assert {c.provider for c in cases if c.setup is not None} == {"cpu_inplace", "liger"}
    assert [c.provider for c in cases][:2] == ["reference", "eager"]
    inplace = next(c for c in cases if c.provider == "cpu_inplace")
    eager = next(c for c in cases if c.provider == "reference")
    before = runner.to_host(eager.fn())
    inplace.setup()
    assert runner.mismatch(inplace.fn(), before, torch.float32) is None  # loss and gradient
    inplace.setup()
    after = runner.to_host(eager.fn())
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_remit_ext_bench_forwards_to_the_suite(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "remit-ext bench" in out and "--out-dir" in out and "--auto-table" in out
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "table", "--help"])
    assert exc.value.code == 0 and "--readme" in capsys.readouterr().out


def test_a_third_party_failure_costs_its_row_only(tmp_path, monkeypatch):
    """torch.compile/Liger/CCE breaking on a case (e.g. an inductor codegen error) loses that
    row and is reported; remit_ext's own providers raising fails the run."""
    x, state = torch.arange(4.0), {"cpu_breaks": False}

    def boom():
        raise RuntimeError("codegen went wrong\nsecond line")

    def build(ctx):
        return [runner.Case("toy", "reference", lambda: x, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "eager", lambda: x, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "compile", boom, 16, "GB/s", "16 bytes"),
                runner.Case("toy", "cpu", lambda: boom() if state["cpu_breaks"] else x, 16,
                            "GB/s", "16 bytes")]

    toy = runner.Family("toy", ("toy",), 2, "copy", build)
    monkeypatch.setattr(runner, "families", lambda: {"toy": toy})
    argv = ["--shapes", "4x4", "--dtypes", "float32", "--providers", "eager", "compile", "cpu",
            "--out-dir", str(tmp_path), "--auto-table", "", "--device", "cpu"]
    assert runner.main(["--ops", "toy", *argv]) == 0
    assert {r["provider"] for r in report.load(tmp_path / "cpu.csv")} == {"hardware", "eager",
                                                                         "cpu"}
    assert ("toy 4x4 float32: compile raised RuntimeError: codegen went wrong"
            in (tmp_path / "cpu.md").read_text())
    state["cpu_breaks"] = True
    with pytest.raises(RuntimeError, match="codegen"):
        runner.main(["--ops", "toy", *argv])


def test_targets_are_the_published_numbers():
    """vs_best's targets: the published time back at the published shape on that GPU, scaled
    by flops elsewhere; nothing for a GPU without a published result or the CPU."""
    quack = 2.0 * 3 * 4096 * 4096 * 128256  # 6 N D V
    ms, what = T.linear_best("NVIDIA H200", quack)
    assert ms == pytest.approx(17.33) and "QuACK" in what and "745 TFLOP/s" in what
    ms, what = T.linear_best("NVIDIA H100 80GB HBM3", 2.0 * 4 * 16384 * 4096 * 131072)
    assert ms == pytest.approx(104.77) and "FLSCE" in what and "672 TFLOP/s" in what
    assert T.linear_best("NVIDIA H200", 2 * quack)[0] == pytest.approx(2 * 17.33)
    assert T.linear_best("cpu", quack) == (None, "")
    ms, what = T.read_best(2, 1000, 1e6, "read of 10 x 100 bfloat16")
    assert ms == pytest.approx(2.0) and "one read of 2 N x V inputs" in what
    assert T.read_best(0, 1000, 1e6, "x") == (None, "")


def test_eager_is_plain_pytorch_and_passes_the_gate():
    """Every family's plain-PyTorch provider (remit_ext/bench/eager.py: the denominator of every
    speed-up) agrees with the reference in both dtypes, as the gate requires of it."""
    assert runner.main(["--quick", "--providers", "eager", "cpu", "--no-write"]) == 0
    import ast

    from remit_ext.bench import eager

    tree = ast.parse(Path(eager.__file__).read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not used & {"float64", "double", "item", "reference"}  # no fp64, no syncs


def _plain_env() -> dict:
    """This process's environment without TRITON_INTERPRET: a plain shell's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without GPU")
@pytest.mark.parametrize("entry", ["remit-ext bench", "python -m remit_ext.bench",
                                   "python -m bench"])
def test_entry_points_run_triton_from_a_plain_shell(entry, tmp_path):
    """Without TRITON_INTERPRET in the environment, every entry point runs the Triton kernels
    in the interpreter (importing remit_ext imports triton before the suite runs: it restarts
    itself with the variable set)."""
    head = {"remit-ext bench": [sys.executable, "-m", "remit_ext", "bench"],
            "python -m remit_ext.bench": [sys.executable, "-m", "remit_ext.bench"],
            "python -m bench": [sys.executable, "-m", "bench"]}[entry]
    proc = subprocess.run([*head, "--quick", "--ops", "token_entropy", "--dtypes", "float32",
                           "--providers", "eager", "triton"], cwd=tmp_path, env=_plain_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "token_entropy      triton" in proc.stdout
    assert "skipping provider triton" not in proc.stdout


def _pytest_bench(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *map(str, args)], cwd=cwd, env=_plain_env(), capture_output=True,
                          text=True, timeout=900)


def test_pytest_benchmark_runs_the_suite_cases(tmp_path):
    """python -m pytest bench --benchmark-only: the suite's cases (eager, the kernels), each
    gated and timed, the ledger row in extra_info, one group per (op, shape, dtype);
    --benchmark-json and --benchmark-compare work; --bench-ledger writes the ledger."""
    out, store = tmp_path / "run.json", tmp_path / "store"
    common = ["bench", "--benchmark-only", "--bench-quick", "--bench-ops", "remit_weights",
              "--bench-providers", "eager,cpu", f"--benchmark-storage={store}"]
    proc = _pytest_bench(*common, "--benchmark-autosave", f"--benchmark-json={out}",
                         "--bench-ledger", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert names == {f"test_case[remit_weights-{p}-32-float32]" for p in ("eager", "cpu")}
    for b in data["benchmarks"]:
        assert b["group"] == "remit_weights 32 float32"
        info = b["extra_info"]
        assert info["op"] == "remit_weights" and float(info["floor_frac"]) > 0
        assert info["speedup_vs_eager"] != "" and info["git_sha"]
    ledger = report.load(tmp_path / "cpu.csv")
    assert {r["provider"] for r in ledger} == {"hardware", "eager", "cpu"}
    proc = _pytest_bench(*common, "--benchmark-compare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0001" in proc.stdout


def test_the_default_test_command_never_collects_the_benchmarks():
    """pyproject's testpaths: `python -m pytest` means python_tests; bench/ only when named."""
    proc = _pytest_bench("--collect-only", "python_tests/test_bench.py")
    assert proc.returncode == 0 and "bench/test_suite.py" not in proc.stdout
    import tomllib

    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    assert conf["ini_options"]["testpaths"] == ["python_tests"]
    proc = _pytest_bench("--collect-only", "bench", "--bench-quick", "--bench-ops", "token_stats",
                         "--bench-dtypes", "float32", "--bench-providers", "eager,cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_case[token_stats-eager-32x256-float32]" in proc.stdout
    assert "test_case[token_entropy-cpu-32x256-float32]" in proc.stdout


def test_scaling_study_sweeps_and_plots(tmp_path):
    """bench_scaling.py: N doubles 1k -> 32k, V 32k -> 262k, for both ops; the quick run goes
    through every code path but the fresh processes; the plot is drawn from the rows."""
    from bench import bench_scaling as S

    pts = S.points(S.WORKLOADS["cpu"])
    assert [n for op, sw, n, v in pts if op == "remit_loss" and sw == "N"] == \
        [1024, 2048, 4096, 8192, 16384, 32768]
    assert [v for op, sw, n, v in pts if op == "remit_linear_loss" and sw == "V"] == \
        [32768, 65536, 131072, 262144]
    assert S.main(["--quick"]) == 0
    rows = [{"op": op, "sweep": sw, "n_tokens": n, "vocab": v, "ms_p50": n * v / 1e6,
             "over_grads_MB": 1.0, "grads_MB": n * v / 1e6}
            for op, sw, n, v in S.points(S.WORKLOADS["quick"])]
    S.plot(rows, tmp_path / "scaling.png", "title")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
