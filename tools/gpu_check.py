"""The GPU check, in stages that each fit one device command (<= 8 minutes), most valuable first.

    bash tools/gpu_check.sh [--stages 1,2,3] [--dry-run] OUT_DIR

1. ``build``: the extension for ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a``, an H100/H200), CUDA
   kernels required; import; ``build_info``. Always runs first (a warm machine's build tree
   makes it quick), so every command stands alone.
2. ``tests``: every GPU-relevant test file in its own pytest process with a time cap, the
   bad-input files last, so a failure or a poisoned CUDA context never hides the rest.
3. ``sanitizers``: compute-sanitizer memcheck, racecheck, synccheck and initcheck on a small
   targeted set of CUDA/Triton tests, with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (inside a
   caching-allocator block an out-of-bounds access is invisible to memcheck).
4. ``bench``: the benchmark suite's logits-level ops at a published shape, one process per op
   under a time cap (what finished is kept): ledger, summary, plots, the backend="auto" table.
5. ``linear``: the fused-linear rows (the suite's linear_loss family and
   ``bench/bench_linear_loss.py --device cuda``).

Everything goes to OUT_DIR as four files (the device tool brings back at most 8): ``summary.md``
(one screen: pass/fail per test file, sanitizer verdicts, goal ratios; rewritten after every
stage), ``gpu_check.log`` (every command's output, appended), ``results.tar`` (junit XML,
sanitizer logs, ledgers, plots, auto table; appended per stage) and ``state.json`` (what the
summary is made from). ``--dry-run`` rehearses every stage on a machine without a GPU: GPU steps
are replaced by a stated skip, test files and sanitizer selections are collected (not run),
the benchmarks run at tiny CPU shapes; CI runs it so that the script is never debugged on GPU
time. Wheels for the offline GPU machine (Liger-Kernel, Cut Cross-Entropy): ``--wheels DIR``
or ``WHEELS=DIR`` (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "python_tests"
STAGES = {1: "build", 2: "tests", 3: "sanitizers", 4: "bench", 5: "linear"}
# Per-stage wall-clock caps (seconds).
STAGE_CAP = {1: 150, 2: 300, 3: 240, 4: 240, 5: 150}
# One invocation's whole budget (--budget): a stage gets what is left of it, at most its own
# cap, so any --stages list fits one device command (10 minutes at most).
BUDGET = 540
FILE_CAP = 120  # one test file
# Test files with nothing to check on a GPU (the training loop, the benchmark harness, the
# Triton compile check): CI runs them; the GPU check does not spend device time on them.
CPU_ONLY = ("test_train.py", "test_rmt.py", "test_bench.py", "test_triton_build.py",
            "test_gpu_check.py", "test_cuda_emu.py", "test_gpu_static.py", "test_layers.py",
            "test_source_tree.py", "test_flywheel_seeds.py")
# Files whose tests feed bad input to the kernels: last, so nothing after them can be hurt.
BAD_INPUT_LAST = ("test_errors.py", "test_validation.py")
# (tool, extra flags, test files, backends, tests per test function, cap): collected on the
# machine, then a few tests of every function whose parameters name one of the backends (ids
# like test_x[...-dtype0-cuda]; `-k cuda` would also match every test of test_cuda_build.py by
# its file name), plus test_cuda_build.py's CUDA-only tests, so the capped run is a spread of
# kernels and shapes rather than the first N tests of the first file.
SANITIZERS = [
    ("memcheck", ["--leak-check", "no"],
     ["test_cuda_build.py", "test_token_stats.py", "test_remit_weights.py",
      "test_weighted_ce.py", "test_remit_loss.py", "test_pg_loss.py",
      "test_linear_token_stats.py"], ("cuda", "triton"), 2, 150),
    ("racecheck", [], ["test_remit_weights.py", "test_token_stats.py"], ("cuda",), 2, 80),
    ("synccheck", [], ["test_remit_loss.py", "test_token_stats.py"], ("cuda",), 1, 45),
    ("initcheck", [], ["test_remit_loss.py", "test_remit_weights.py"], ("cuda",), 1, 45),
]
# Collection for the dry run: parametrise as if the GPU backends were here (conftest.py).
COLLECT_AS_GPU = {"REMIT_TEST_COLLECT_BACKENDS": "torch,triton,cuda"}
# Logits-level ops, most telling first (token_stats and remit_loss carry the goals).
BENCH_OPS = ["token_stats", "remit_loss", "ce_bwd", "weighted_ce", "pg_loss", "remit_loss_lp",
             "token_entropy", "remit_weights", "remit_weights_varlen"]
BENCH_SHAPE, LINEAR_SHAPE = "16384x128256", "16384x4096x128256"
# The suite's default providers run: eager (plain PyTorch) and compile of it, the kernels, and
# Liger, CCE and QuACK where importable (the reference runs for the gate only).
LINEAR_OPS = ["linear_remit_lp", "linear_ce", "linear_remit", "linear_token_stats"]
LINEAR_PROVIDERS = ["linear_logprobs", "linear", "linear_ntp", "stats_linear", "matmul_floor"]
# Goals (issues 3, 4): (provider, op, floor_frac at least, what it means).
GOALS = [
    ("triton", "token_stats", 0.85, ">= 85% of copy bandwidth"),
    ("triton", "remit_loss", 0.80, "fwd+bwd <= 1.25x of 4 passes"),
    ("cuda", "token_stats", 0.90, ">= 90% of copy bandwidth"),
    ("cuda", "ce_bwd", 0.85, "backward >= 85%"),
    ("cuda", "remit_loss", 1 / 1.15, "fwd+bwd <= 1.15x of 4 passes"),
]
MAX_FILES, MAX_BYTES = 8, 16 << 20


class Check:
    def __init__(self, out: Path, dry_run: bool, wheels: str | None):
        self.out, self.dry, self.wheels = out, dry_run, wheels
        self.log = out / "gpu_check.log"
        self.tar = out / "results.tar"
        self.state_path = out / "state.json"
        self.work = out / ".work"  # scratch; removed at the end (files come back, folders too)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "started": _now(), "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "dry_run": dry_run, "stages": {}}
        self.env = dict(os.environ)
        if dry_run:
            self.env.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU, as the tests run it
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 4))
        self.deadline = float("inf")  # main() sets the invocation's budget
        self.only: list = []  # --files: stage 2 runs only these

    # -- plumbing -------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log.open("a") as f:
            f.write(text + "\n")

    def run(self, cmd, cap: float, env=None, cwd=REPO) -> tuple[int, str, float]:
        """Run ``cmd`` for at most ``cap`` seconds (and never past the invocation's budget), its
        output appended to the log; returns (exit status, output, seconds). 124: stopped at the
        cap, with its whole process group (sanitizer targets, test subprocesses) killed."""
        cap = min(cap, self.deadline - time.monotonic())
        if cap < 5:
            self.say(f"$ {' '.join(map(str, cmd))}   [not run: the budget is spent]")
            return 124, "[not run: the budget is spent]\n", 0.0
        self.say(f"$ {' '.join(map(str, cmd))}   [cap {cap:.0f} s]")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env or self.env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except FileNotFoundError as err:
            return 127, f"{err}\n", 0.0
        try:
            text, _ = proc.communicate(timeout=cap)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            text, _ = proc.communicate()
            rc = 124
            text = (text or "") + f"\n[stopped at the {cap:.0f} s cap]\n"
        secs = time.monotonic() - t0
        with self.log.open("a") as f:
            f.write(text)
        return rc, text, secs

    def archive(self, *paths: Path) -> None:
        with tarfile.open(self.tar, "a") as tar:
            for p in paths:
                if p.exists():
                    tar.add(p, arcname=str(p.relative_to(self.work)))

    def record(self, stage: int, result: dict) -> None:
        self.state["stages"][str(stage)] = result
        self.state_path.write_text(json.dumps(self.state, indent=1))
        (self.out / "summary.md").write_text(summary(self.state))

    # -- stages -------------------------------------------------------------------------------
    def stage_build(self, cap: float) -> dict:
        res = {"name": "build", "ok": True, "steps": []}
        py = sys.executable
        if self.wheels:
            wheels = sorted(Path(self.wheels).glob("*.whl"))
            if self.dry:
                res["steps"].append(f"skip (dry run): would install {len(wheels)} wheels from "
                                    f"{self.wheels} into /tmp/site")
            elif wheels:
                rc, _, _ = self.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                     "--no-compile", "--target", "/tmp/site", *wheels], 120)
                self.env["PYTHONPATH"] = "/tmp/site" + os.pathsep + self.env.get("PYTHONPATH",
                                                                                   "")
                res["steps"].append(f"wheels: {len(wheels)} installed (exit {rc})")
                res["ok"] &= rc == 0
        if self.dry:
            res["steps"].append("skip (dry run): pip install -e . with REMIT_CUDA=ON, "
                                f"TORCH_CUDA_ARCH_LIST={self.env.get('TORCH_CUDA_ARCH_LIST', '9.0a')}")
        else:
            env = {**self.env, "REMIT_CUDA": "ON",
                   "TORCH_CUDA_ARCH_LIST": self.env.get("TORCH_CUDA_ARCH_LIST", "9.0a")}
            rc, text, secs = self.run([py, "-m", "pip", "install", "--no-build-isolation",
                                       "--no-deps", "-e", "."], cap, env=env)
            (self.work / "build.log").write_text(text)
            self.archive(self.work / "build.log")
            res["steps"].append(f"build: exit {rc} in {secs:.0f} s")
            res["ok"] &= rc == 0
            if rc != 0:
                res["steps"].append("build failed: " + _tail(text, 6))
                return res
        probe = ("import json, torch, triton, remit_ext; i = remit_ext.build_info(); "
                 "print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, "
                 "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else "
                 "'cpu', 'build_info': i, 'backends': remit_ext.available_backends()}))")
        rc, text, _ = self.run([py, "-c", probe], 120)
        info = _last_json(text)
        res["info"] = info
        if rc != 0 or info is None:
            res["ok"] = False
            res["steps"].append("import failed: " + _tail(text, 6))
        elif not self.dry and not info["build_info"].get("cuda"):
            res["ok"] = False
            res["steps"].append("the build has no CUDA kernels")
        else:
            res["steps"].append(f"import ok: {info['device']}, torch {info['torch']}, triton "
                                f"{info['triton']}, backends {info['backends']}")
        self.state["info"] = info
        if res["ok"] and not self.dry:
            # This machine's Triton (not CI's) compiling every kernel for sm_90, with the
            # no-FMA-contraction check: a finding, not a blocker for the stages after.
            rc, text, secs = self.run([py, "tools/triton_check.py", "--arch", "90"], 150)
            res["steps"].append(f"triton_check --arch 90 (this Triton): "
                                f"{'ok' if rc == 0 else 'FAILED (exit %d)' % rc} in {secs:.0f} s: "
                                f"{_tail(text, 1)}")
        return res

    def stage_tests(self, cap: float) -> dict:
        files = [f for f in test_files() if not self.only or f in self.only]
        res = {"name": "tests", "ok": True, "files": {}, "cpu_only": list(CPU_ONLY)}
        t_end = time.monotonic() + cap
        collected = {}
        if self.dry:  # one collection of every file (one process per file is the GPU run's)
            rc, text, _ = self.run([sys.executable, "-m", "pytest", "-q", "-p",
                                    "no:cacheprovider", "--collect-only",
                                    *[str(TESTS / f) for f in files]], cap)
            for line in text.splitlines():
                if "::" in line:
                    name = Path(line.split("::", 1)[0]).name
                    collected[name] = collected.get(name, 0) + 1
            res["ok"] = rc == 0
        for f in files:
            left = t_end - time.monotonic()
            if left < 15:
                res["files"][f] = {"verdict": "not run (stage cap)"}
                res["ok"] = False
                continue
            junit = self.work / f"junit_{Path(f).stem}.xml"
            base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    str(TESTS / f)]
            if self.dry:
                n = collected.get(f, 0)
                res["files"][f] = {"verdict": f"collected {n}" if n else "collected none",
                                   "ok": n > 0}
            else:
                rc, text, secs = self.run(base + ["-rfE", f"--junitxml={junit}"],
                                          min(FILE_CAP, left))
                counts = _junit_counts(junit)
                ok = rc == 0
                verdict = ("timed out" if rc == 124 else "pass" if ok else f"FAIL (exit {rc})")
                res["files"][f] = {"verdict": verdict, "seconds": round(secs, 1), "ok": ok,
                                   **counts}
                if not ok:
                    res["files"][f]["failed"] = _failed_names(text)[:8]
                self.archive(junit)
            res["ok"] &= res["files"][f]["ok"]
            self.record(2, res)
        return res

    def stage_sanitizers(self, cap: float) -> dict:
        res = {"name": "sanitizers", "ok": True, "tools": {}}
        sanitizer = find_sanitizer()
        env = {**self.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        t_end = time.monotonic() + cap
        files = sorted({f for _, _, fs, _, _, _ in SANITIZERS for f in fs})
        if not self.dry and sanitizer is None:
            res["ok"] = False
            res["tools"] = {"all": {"verdict": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, "
                                    "/usr/local/cuda/bin)", "ok": False}}
            return res
        rc, text, _ = self.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "--collect-only", "-m", "not slow",
                                *[str(TESTS / f) for f in files]], 120,
                               env={**env, **COLLECT_AS_GPU} if self.dry else env)
        ids = [line.strip() for line in text.splitlines() if "::" in line]
        for tool, flags, tool_files, backends, per_function, tool_cap in SANITIZERS:
            chosen = select_tests(ids, tool_files, backends, per_function)
            if self.dry:
                ok = bool(chosen)
                res["tools"][tool] = {"verdict": f"skip (dry run); would run {len(chosen)} tests "
                                      f"of {len(tool_files)} files", "ok": ok}
                res["ok"] &= ok
                continue
            left = t_end - time.monotonic()
            if left < 20 or not chosen:
                res["tools"][tool] = {"verdict": "not run (stage cap)" if chosen else
                                      "no test selected", "ok": False}
                res["ok"] = False
                continue
            cmd = [sanitizer, "--tool", tool, *flags, "--error-exitcode", "99",
                   "--target-processes", "all", "--print-limit", "20", sys.executable, "-m",
                   "pytest", "-q", "-p", "no:cacheprovider", *[str(REPO / i) for i in chosen]]
            rc, text, secs = self.run(cmd, min(tool_cap, left), env=env)
            (self.work / f"sanitizer_{tool}.log").write_text(text)
            self.archive(self.work / f"sanitizer_{tool}.log")
            verdict, ok = sanitizer_verdict(tool, rc, text)
            res["tools"][tool] = {"verdict": verdict, "ok": ok, "seconds": round(secs, 1),
                                  "tests": len(chosen)}
            res["ok"] &= ok
            self.record(3, res)
            if verdict.startswith("unsupported"):
                break  # the other tools would say the same
        return res

    def _bench(self, stage: int, ops, shape, cap: float, extra=()) -> dict:
        res = {"name": STAGES[stage], "ok": True, "ops": {}}
        out_dir = self.work / STAGES[stage]
        out_dir.mkdir(exist_ok=True)
        t_end = time.monotonic() + cap
        if stage == 4:
            # One measured bandwidth first: it replaces the static ledger's assumed one
            # (python tools/gpu_static.py --bandwidth-tbs <read_tbs>).
            bw = out_dir / "bandwidth.json"
            cmd = [sys.executable, str(REPO / "tools" / "gpu_bandwidth.py"), "--out", bw]
            if self.dry:
                cmd += ["--device", "cpu", "--gib", "0.01", "--repeats", "3"]
            rc, text, _ = self.run(cmd, 60)
            res["bandwidth"] = _tail(text, 1) if rc == 0 else f"exit {rc}: {_tail(text, 3)}"
        if self.dry:  # tiny CPU shapes through the same runner, ledger written
            shape = "32x16x256" if shape.count("x") == 2 else "32x256"
            extra = ["--device", "cpu", "--seq-len", "16", "--dtypes", "float32",
                     "--providers", "eager", "cpu", "triton", "--auto-table", ""]
        else:
            # The measured backend="auto" order goes to the stage's folder (seeded from the
            # shipped table: ready to commit as remit_ext/data/auto_table.json).
            extra = ["--dtypes", "bfloat16", "--auto-table", out_dir / "auto_table.json", *extra]
        for i, op in enumerate(ops):
            left = t_end - time.monotonic()
            if self.dry and i > 0:
                res["ops"][op] = "skip (dry run: the first op rehearses the stage)"
                continue
            if left < 20:
                res["ops"][op] = "not run (stage cap)"
                continue
            rc, text, secs = self.run([sys.executable, "-m", "remit_ext.bench", "--ops", op,
                                       "--shapes", shape, "--out-dir", out_dir, *extra], left)
            res["ops"][op] = (f"exit {rc} in {secs:.0f} s" if rc != 124
                              else f"stopped at the cap ({secs:.0f} s)")
            res["ok"] &= rc == 0
            if rc not in (0, 124):
                res["ops"][op] += ": " + _tail(text, 3)
        ledgers = sorted(out_dir.glob("*.csv"))
        for csv_path in ledgers:
            rc, _, _ = self.run([sys.executable, "-m", "remit_ext.bench", "plot", "--csv",
                                 csv_path, "--out-dir", out_dir / "plots"], 120)
        self.archive(out_dir)
        res["ledgers"] = [str(p.relative_to(self.work)) for p in ledgers]
        res["goals"] = goal_lines(ledgers)
        if "bandwidth" in res:
            res["goals"].insert(0, res["bandwidth"])
        return res

    def stage_bench(self, cap: float) -> dict:
        return self._bench(4, BENCH_OPS, BENCH_SHAPE, cap)

    def stage_linear(self, cap: float) -> dict:
        started = time.time()
        res = self._bench(5, LINEAR_OPS, LINEAR_SHAPE, cap * 0.5)
        # The issue-5 rows at one token count (each provider runs in its own process there;
        # the full sweep would not fit a stage).
        cmd = [sys.executable, "bench/bench_linear_loss.py"]
        cmd += (["--quick", "--device", "cpu"] if self.dry else
                ["--device", "cuda", "--ns", "16384", "--providers", *LINEAR_PROVIDERS])
        rc, text, secs = self.run(cmd, cap * 0.5)
        res["ops"]["bench_linear_loss.py"] = (f"exit {rc} in {secs:.0f} s" if rc != 124 else
                                              f"stopped at the cap ({secs:.0f} s)")
        res["ok"] &= rc == 0
        (self.work / "bench_linear_loss.txt").write_text(text)
        written = [self.work / "bench_linear_loss.txt"]
        if not self.dry:
            for p in (REPO / "bench" / "results").glob("*_linear_*.*"):  # loss, token_stats
                if p.stat().st_mtime >= started:  # written by this run
                    shutil.copy(p, self.work / p.name)
                    written.append(self.work / p.name)
        self.archive(*written)
        return res


def test_files() -> list:
    files = sorted(p.name for p in TESTS.glob("test_*.py") if p.name not in CPU_ONLY)
    return ([f for f in files if f not in BAD_INPUT_LAST]
            + [f for f in BAD_INPUT_LAST if f in files])


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found is None and root and os.access(Path(root, "bin", "compute-sanitizer"), os.X_OK):
            found = str(Path(root, "bin", "compute-sanitizer"))
    return found


def select_tests(ids, files, backends, per_function: int) -> list:
    """Node ids (as pytest --collect-only -q prints them) of ``files`` to run under a sanitizer:
    per test function, the first ``per_function`` whose parameters name one of ``backends``;
    test_cuda_build.py's CUDA-only tests (test_cuda_*, not the 64-bit one) when cuda is among
    them."""
    taken: dict = {}
    chosen = []
    for node in ids:
        path, _, name = node.partition("::")
        if Path(path).name not in files:
            continue
        func, _, params = name.partition("[")
        tokens = set(params.rstrip("]").split("-")) if params else set()
        cuda_only = (Path(path).name == "test_cuda_build.py" and func.startswith("test_cuda_")
                     and "64bit" not in func and "cuda" in backends)
        if not (tokens & set(backends) or cuda_only):
            continue
        key = (path, func)
        if taken.get(key, 0) < per_function:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(node)
    return chosen


def sanitizer_verdict(tool: str, rc: int, text: str) -> tuple[str, bool]:
    if "Device not supported" in text or "not supported on this platform" in text:
        return "unsupported on this machine", False
    errors = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    # "RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)": errors are the finding.
    hazards = [int(m) for m in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) "
                                          r"errors?", text)]
    n = sum(errors) + sum(hazards)
    tests = _pytest_line(text)
    if rc == 124:
        return f"stopped at the cap; {n} errors so far ({tests or 'no pytest summary'})", n == 0
    if n or rc == 99:
        return f"{n} errors/hazards (exit {rc})", False
    if rc != 0:
        return f"tests failed under {tool} (exit {rc}): {tests}", False
    return f"clean: 0 errors ({tests})", True


def goal_lines(ledgers) -> list:
    """The goals' ratios from the ledgers of this run (floor_frac of each kernel row), and the
    speed-ups over eager and compile for remit_loss."""
    import csv

    rows = [r for p in ledgers for r in csv.DictReader(p.open())]
    if not rows:
        return []
    sha = rows[-1]["git_sha"]
    rows = [r for r in rows if r["git_sha"] == sha]
    lines = []
    for provider, op, goal, what in GOALS:
        for r in rows:
            if r["provider"] == provider and r["op"] == op and r["floor_frac"]:
                f = float(r["floor_frac"])
                lines.append(f"{provider} {op} {r['shape']} {r['dtype']}: floor_frac {f:.2f} "
                             f"(goal {what}: {'met' if f >= goal else 'NOT met'})")
    for r in rows:
        if r["op"] == "remit_loss" and r["provider"] in ("triton", "cuda", "cpu"):
            comp = [c for c in rows if c["op"] == "remit_loss" and c["provider"] == "compile"
                    and c["shape"] == r["shape"] and c["dtype"] == r["dtype"]]
            vs_c = (f", {float(comp[0]['ms_p50']) / float(r['ms_p50']):.2f}x compile"
                    if comp else "")
            lines.append(f"{r['provider']} remit_loss {r['shape']} {r['dtype']}: "
                         f"{r['ms_p50']} ms, {r['speedup_vs_eager']}x eager reference{vs_c}")
    return lines


def summary(state: dict) -> str:
    info = state.get("info") or {}
    head = [f"# GPU check{' (dry run: no GPU step ran)' if state['dry_run'] else ''}", "",
            f"commit {state['commit']}{' (uncommitted changes)' if state['dirty'] else ''}; "
            f"started {state['started']}; device {info.get('device', '?')}; torch "
            f"{info.get('torch', '?')}; triton {info.get('triton', '?')}; build_info "
            f"{info.get('build_info', '?')}", ""]
    body = []
    for key in sorted(state["stages"], key=int):
        st = state["stages"][key]
        body.append(f"## {key}. {st['name']}: {'ok' if st.get('ok') else 'FAILED'}")
        body += [f"- {s}" for s in st.get("steps", [])]
        if "files" in st:
            body.append("")
            body.append("| test file | verdict | passed | failed | skipped | s |")
            body.append("|---|---|---:|---:|---:|---:|")
            for f, r in st["files"].items():
                body.append(f"| {f} | {r['verdict']} | {r.get('passed', '')} | "
                            f"{r.get('failed_n', '')} | {r.get('skipped', '')} | "
                            f"{r.get('seconds', '')} |")
                body += [f"|  | {name} | | | | |" for name in r.get("failed", [])]
            body.append(f"\nNot run on the GPU (CPU-only, CI runs them): "
                        f"{', '.join(st['cpu_only'])}")
        for tool, r in st.get("tools", {}).items():
            body.append(f"- {tool}: {r['verdict']}")
        for op, r in st.get("ops", {}).items():
            body.append(f"- {op}: {r}")
        if st.get("goals"):
            body.append("\nGoals (this run's ledger):")
            body += [f"- {g}" for g in st["goals"]]
        body.append("")
    return "\n".join(head + body) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tail(text: str, n: int) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _collected(text: str) -> int:
    m = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", text)
    return int(m.group(1)) if m else 0


def _pytest_line(text: str) -> str:
    lines = [line for line in text.splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    return lines[-1].strip("= ") if lines else ""


def _failed_names(text: str) -> list:
    return [line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # a file cut short by the cap
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    n = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": n - failed - skipped, "failed_n": failed, "skipped": skipped}


def check_out_dir(out: Path) -> list:
    """What the device tool would not bring back: over 8 files, a file over 16 MiB, a folder."""
    problems = []
    entries = list(out.iterdir())
    files = [p for p in entries if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out} (at most {MAX_FILES} come back)")
    problems += [f"{p.name}: {p.stat().st_size} bytes (over 16 MiB)" for p in files
                 if p.stat().st_size > MAX_BYTES]
    problems += [f"{p.name}/: a folder (only files are written)" for p in entries if p.is_dir()]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output directory (created; 4 files)")
    ap.add_argument("--stages", default="1,2,3",
                    help="comma-separated stages, e.g. 1,2,3 then 1,4,5 (stage 1 always runs)")
    ap.add_argument("--dry-run", action="store_true",
                    help="rehearse every stage without a GPU (GPU steps skipped, said so)")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for the whole invocation (default {BUDGET}); a stage gets "
                         "what is left, at most its own cap")
    ap.add_argument("--files", default="",
                    help="stage 2 only: comma-separated test files to run (a rerun of failures)")
    ap.add_argument("--wheels", default=os.environ.get("WHEELS"),
                    help="a folder of wheels to install first (default: $WHEELS)")
    args = ap.parse_args(argv)
    try:
        stages = sorted({1} | {int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--stages: expected numbers from {sorted(STAGES)}, got {args.stages!r}")
    if not set(stages) <= set(STAGES):
        ap.error(f"--stages: expected numbers from {sorted(STAGES)}, got {args.stages!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.dry_run, args.wheels)
    check.only = [f.strip() for f in args.files.split(",") if f.strip()]
    unknown = sorted(set(check.only) - set(test_files()))
    if unknown:
        ap.error(f"--files: expected files of {test_files()}, got {unknown}")
    check.say(f"== gpu_check {_now()}: stages {stages}{' (dry run)' if args.dry_run else ''}, "
              f"commit {check.state['commit'][:12]}")
    ok = True
    t_end = check.deadline = time.monotonic() + args.budget
    for stage in stages:
        left = t_end - time.monotonic()
        check.say(f"== stage {stage}: {STAGES[stage]} ({min(STAGE_CAP[stage], left):.0f} s)")
        if left < 30:
            check.record(stage, {"name": STAGES[stage], "ok": False,
                                 "steps": [f"not run: the {args.budget:.0f} s budget is spent"]})
            ok = False
            continue
        result = getattr(check, f"stage_{STAGES[stage]}")(min(STAGE_CAP[stage], left))
        check.record(stage, result)
        ok &= bool(result.get("ok"))
        if stage == 1 and not result["ok"]:
            check.say("== stage 1 failed: nothing else can run")
            break
    shutil.rmtree(check.work, ignore_errors=True)
    problems = check_out_dir(check.out)
    text = (check.out / "summary.md").read_text()
    if problems:
        text += "\nOutput directory problems: " + "; ".join(problems) + "\n"
        (check.out / "summary.md").write_text(text)
    print("\n" + text)
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
