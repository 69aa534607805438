"""Loads the compiled extension and refuses, with a message saying what to do, to run against
a torch or a CPU other than the ones it was built for (its ops use torch's non-stable C++ API)."""

from __future__ import annotations

import torch

_REBUILD = "rebuild it in this environment: pip install --no-build-isolation -e ."


def _base(version: str) -> str:
    return version.split("+")[0]


def load_extension():
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(
            f"remit_ext: the compiled extension remit_ext._C could not be loaded ({err}). "
            f"Install torch first, then {_REBUILD}") from err
    info = _C.build_info()
    if _base(info["torch_version"]) != _base(torch.__version__):
        raise ImportError(
            f"remit_ext was built against torch {info['torch_version']} but torch "
            f"{torch.__version__} is imported; {_REBUILD}")
    return _C


_C = load_extension()


def build_info() -> dict:
    """What was built and what runs: torch version built against, CUDA kernels on/off and the
    TORCH_CUDA_ARCH_LIST they were compiled for ("" without them), the instruction set of the
    CPU row kernels in use (``cpu_capability``) and every one compiled (``cpu_capabilities``,
    worst to best; the best one this CPU supports runs unless REMIT_CPU_CAPABILITY caps it)."""
    info = dict(_C.build_info())
    info.setdefault("cuda_archs", "")  # extensions built before the CUDA backend existed
    return info
