"""Shared fixtures: the Triton interpreter on CPU, seeded inputs, the backend grid."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before anything imports triton (the Triton backend's tests run on CPU this way).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402

import remit_ext  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Every backend that can run on this machine; the torch backend (the eager reference run through
# the public API) is included so that flattening, segmentation and reductions are checked too.
# Triton runs on CPU tensors in its interpreter (TRITON_INTERPRET=1, set above). The CUDA
# kernels run where a GPU is and the extension was built with them (available_backends).
BACKENDS = [
    b for b in remit_ext.available_backends()
    if not (b == "cpu" and DEVICE.type != "cpu")
    and not (b == "cuda" and DEVICE.type != "cuda")
    and not (b == "triton" and DEVICE.type == "cpu" and os.environ["TRITON_INTERPRET"] != "1")
]
# Collection only (tools/gpu_check.py --dry-run): parametrise as if these backends were here, so
# that the GPU check's test selections can be checked on a machine without a GPU. Tests collected
# this way are not meant to run.
if os.environ.get("REMIT_TEST_COLLECT_BACKENDS"):
    BACKENDS = os.environ["REMIT_TEST_COLLECT_BACKENDS"].split(",")
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
KD_BACKENDS = [b for b in BACKENDS if b != "cuda"]  # no CUDA KD kernel yet
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
