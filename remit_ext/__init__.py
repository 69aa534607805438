import torch  # noqa: F401  (the extension has no RUNPATH: libtorch must be loaded first)
from . import _C  # noqa: F401
