"""``import remit_ext`` in the root of a checkout installed without ``-e``: the checkout's
``remit_ext/`` (first on sys.path, no compiled ``_C``) gives way to the installed copy
(``remit_ext/_source_tree.py``), so ``python -m remit_ext.bench`` and ``python -m pytest bench``
work there."""

from __future__ import annotations

import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

from remit_ext import _source_tree
from remit_ext._build import _C

REPO = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(root: Path, with_c: bool) -> Path:
    pkg = root / "remit_ext"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if with_c:
        (pkg / f"_C{SUFFIX}").write_bytes(b"")
    return pkg


def test_installed_copy_is_the_next_built_package_on_the_path(tmp_path):
    checkout = _package(tmp_path / "checkout", with_c=False)
    _package(tmp_path / "half", with_c=False)  # no _C: not a built copy
    (tmp_path / "c_only" / "remit_ext").mkdir(parents=True)  # an editable install's _C only
    (tmp_path / "c_only" / "remit_ext" / f"_C{SUFFIX}").write_bytes(b"")
    site = _package(tmp_path / "site", with_c=True)
    path = [str(tmp_path / d) for d in ("checkout", "half", "c_only", "site")]
    assert _source_tree.installed_copy(str(checkout), path) == str(site)
    assert _source_tree.installed_copy(str(checkout), path[:3]) is None
    assert _source_tree.installed_copy(str(site), path[3:]) is None  # itself is not another


def test_the_checkout_root_imports_the_installed_copy(tmp_path):
    """A plain install simulated: the package's Python files and its built _C copied to a
    site directory; Python started in a checkout root without _C (no site hooks, so the
    editable install of this environment stays out of it) imports the site's copy, and its
    submodules, and runs python -m remit_ext.bench --help."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "remit_ext", site / "remit_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(_C.__file__, site / "remit_ext")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "remit_ext", checkout / "remit_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    torch_site = str(Path(__import__("torch").__file__).parents[1])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{torch_site}",
           "TRITON_INTERPRET": "1", "HOME": str(tmp_path)}
    code = ("import remit_ext, remit_ext.bench.runner as r; "
            "print(remit_ext.__file__); print(r.__file__); print(remit_ext.build_info())")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == str(site / "remit_ext" / "__init__.py")
    assert lines[1] == str(site / "remit_ext" / "bench" / "runner.py")
    proc = subprocess.run([sys.executable, "-S", "-m", "remit_ext.bench", "--help"],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m remit_ext.bench" in proc.stdout and "--out-dir" in proc.stdout
