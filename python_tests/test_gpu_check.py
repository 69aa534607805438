"""tools/gpu_check.py, the staged GPU check: its parsing, ordering and output limits on CPU, and
a dry run of its first stage (CI runs the full dry run)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def test_every_test_file_is_placed_and_bad_input_files_come_last():
    files = gpu_check.test_files()
    on_disk = {p.name for p in (REPO / "python_tests").glob("test_*.py")}
    assert set(files) | set(gpu_check.CPU_ONLY) == on_disk
    assert not set(files) & set(gpu_check.CPU_ONLY)
    assert files[-len(gpu_check.BAD_INPUT_LAST):] == list(gpu_check.BAD_INPUT_LAST)
    for _, _, sel_files, _, _, _ in gpu_check.SANITIZERS:
        assert set(sel_files) <= on_disk


def test_sanitizer_selection_spreads_over_functions_and_names_backends():
    ids = ["python_tests/test_remit_loss.py::test_a[dtype0-cuda]",
           "python_tests/test_remit_loss.py::test_a[dtype1-cuda]",
           "python_tests/test_remit_loss.py::test_a[dtype2-cuda]",
           "python_tests/test_remit_loss.py::test_a[dtype0-triton]",
           "python_tests/test_remit_loss.py::test_a[dtype0-cpu]",
           "python_tests/test_remit_loss.py::test_b[cuda_graph-dtype0-torch]",
           "python_tests/test_remit_loss.py::test_c[cuda]",
           "python_tests/test_cuda_build.py::test_nvcc_check_passes_a_good_kernel",
           "python_tests/test_cuda_build.py::test_cuda_opcheck[dtype0]",
           "python_tests/test_cuda_build.py::test_cuda_64bit_offsets",
           "python_tests/test_other.py::test_a[cuda]"]
    got = gpu_check.select_tests(ids, ["test_remit_loss.py", "test_cuda_build.py"], ("cuda",), 2)
    assert got == [ids[0], ids[1], ids[6], ids[8]]
    both = gpu_check.select_tests(ids, ["test_remit_loss.py"], ("cuda", "triton"), 1)
    assert both == [ids[0], ids[6]]


@pytest.mark.parametrize("tool, rc, text, ok, phrase", [
    ("memcheck", 0, "========= ERROR SUMMARY: 0 errors\n3 passed in 9.1s", True, "clean"),
    ("memcheck", 99, "========= Invalid __global__ read of size 4\n"
                     "========= ERROR SUMMARY: 2 errors\n", False, "2 errors"),
    ("racecheck", 0, "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n",
     False, "1 errors"),
    ("racecheck", 0, "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n"
                     "4 passed in 9s", True, "clean"),
    ("memcheck", 1, "========= ERROR SUMMARY: 0 errors\n1 failed, 2 passed in 3s", False,
     "tests failed"),
    ("memcheck", 124, "5 passed in 100s\n", True, "stopped at the cap"),
    ("initcheck", 1, "========= Error: Device not supported\n", False, "unsupported"),
])
def test_sanitizer_verdicts(tool, rc, text, ok, phrase):
    verdict, got_ok = gpu_check.sanitizer_verdict(tool, rc, text)
    assert got_ok is ok and phrase in verdict


def test_junit_counts(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert False\n"
        "@pytest.mark.skip(reason='r')\n"
        "def test_c(): pass\n")
    junit = tmp_path / "j.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", str(tmp_path / "test_x.py")], capture_output=True,
                   cwd=tmp_path, timeout=120)
    assert gpu_check._junit_counts(junit) == {"passed": 1, "failed_n": 1, "skipped": 1}
    assert gpu_check._junit_counts(tmp_path / "missing.xml") == {}


def test_goal_lines(tmp_path):
    path = tmp_path / "h200.csv"
    rows = [dict(op="token_stats", provider="cuda", shape="16384x128256", dtype="bfloat16",
                 floor_frac="0.93", ms_p50="1.0", speedup_vs_eager="9", git_sha="abc"),
            dict(op="remit_loss", provider="triton", shape="16384x128256", dtype="bfloat16",
                 floor_frac="0.5", ms_p50="4.0", speedup_vs_eager="6", git_sha="abc"),
            dict(op="remit_loss", provider="compile", shape="16384x128256", dtype="bfloat16",
                 floor_frac="0.2", ms_p50="10.0", speedup_vs_eager="2", git_sha="abc"),
            dict(op="token_stats", provider="cuda", shape="16384x128256", dtype="bfloat16",
                 floor_frac="0.10", ms_p50="9.0", speedup_vs_eager="1", git_sha="old")]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([rows[3]] + rows[:3])  # an older run first: only the newest sha counts
    lines = gpu_check.goal_lines([path])
    assert "cuda token_stats 16384x128256 bfloat16: floor_frac 0.93 (goal >= 90% of copy " \
           "bandwidth: met)" in lines
    assert any(line.startswith("triton remit_loss") and "NOT met" in line for line in lines)
    assert any("4.0 ms, 6x eager reference, 2.50x compile" in line for line in lines)
    assert not any("0.10" in line for line in lines)


def test_out_dir_limits(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}").write_text("x")
    (tmp_path / "sub").mkdir()
    problems = gpu_check.check_out_dir(tmp_path)
    assert any("9 files" in p for p in problems) and any("sub/" in p for p in problems)


def _gpu_check(*args, timeout=600):
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_of_the_sanitizer_selections(tmp_path):
    """Every sanitizer's selection finds tests (collected as if on a GPU: conftest.py)."""
    out = tmp_path / "out"
    proc = _gpu_check("--dry-run", "--stages", "1,3", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text = (out / "summary.md").read_text()
    for tool, *_ in gpu_check.SANITIZERS:
        n = int(text.split(f"- {tool}: skip (dry run); would run ")[1].split(" ")[0])
        assert n > 0, tool


def test_dry_run_of_the_build_stage(tmp_path):
    out = tmp_path / "out"
    proc = _gpu_check("--dry-run", "--stages", "1", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Stage 1 archives nothing in a dry run: results.tar appears with the first stage that does.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "state.json", "summary.md"]
    text = (out / "summary.md").read_text()
    assert "dry run" in text and "## 1. build: ok" in text and "skip (dry run)" in text
    bad = _gpu_check("--stages", "9", out, timeout=120)
    assert bad.returncode == 2 and "--stages: expected numbers from [1, 2, 3, 4, 5]" in bad.stderr
    bad = _gpu_check("--files", "test_nothing.py", out, timeout=120)
    assert bad.returncode == 2 and "--files: expected files of" in bad.stderr
