"""The numbers to beat: today's best public results, as the ledger's ``vs_best`` column.

``vs_best = best_ms / ms_p50`` (1.0: as fast as the best published result; above 1: faster),
beside ``floor_frac`` (against the hardware floor measured in the same run):

- **fused-linear ops**: the best published fwd+bwd rate on that GPU, in TFLOP/s of the
  publisher's own count, applied to the op's matmul flops (the suite's count: 6 N D V for plain
  CE and ReMiT with cached scorer log-probs, 8 N D V with the live scorer's logits or with the
  statistics' recompute). Only for the GPUs below; other devices get no ``vs_best``.
- **logits-level ops**: one read of every ``[N, V]`` input the op takes (the policy's logits,
  and the scorer's where it takes them) at the read bandwidth measured in the same run: what
  the best one-read kernels approach (QuACK's CE at ~3.0 TB/s on H100; a fused Triton
  log-prob + entropy at ~2.8 TB/s, TRL#7244). A loss that must also write its gradient cannot
  reach 1; the target says how far from one read it is, on any device.

The published numbers are the authors' (``shared/research/anchors_2026-12.md`` section 6.3),
never re-measured here: QuACK's CuTe-DSL runtime wheel (~92 MB) cannot always be brought to the
GPU machine, so its published time stands in for a ``quack`` row where that row is missing.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Published(NamedTuple):
    gpu: str  # matched against torch.cuda.get_device_name()
    who: str
    ms: float  # fwd + bwd
    shape: tuple  # (N, D, V)
    matmuls: int  # the publisher's flop count, in units of 2 N D V
    source: str

    @property
    def tflops(self) -> float:
        n, d, v = self.shape
        return 2.0 * self.matmuls * n * d * v / (self.ms * 1e-3) / 1e12

    def label(self) -> str:
        n, d, v = self.shape
        return (f"{self.who} {self.ms:g} ms fwd+bwd at {n}x{d}x{v} on {self.gpu} "
                f"({self.tflops:.0f} TFLOP/s at {2 * self.matmuls} NDV; {self.source})")


PUBLISHED = (
    Published("H200", "QuACK 0.6.1 chunked_linear_cross_entropy", 17.33, (4096, 4096, 128256),
              3, "Liger fused_linear_cross_entropy_sm90.py docstring"),
    Published("H100", "Liger FLSCE (CuTe SM90, per-token NLL + entropy)", 104.77,
              (16384, 4096, 131072), 4, "Liger-Kernel README"),
    Published("B200", "Liger CuTe SM100 FLCE", 17.51, (8192, 4096, 128256), 3,
              "Liger-Kernel#1339"),
)


def published_for(device: str) -> Optional[Published]:
    """The best published fused-linear result on this device (None: nothing published)."""
    for p in PUBLISHED:
        if p.gpu in device:
            return p
    return None


def linear_best(device: str, flops: float) -> tuple[Optional[float], str]:
    """(best ms for an op of ``flops`` matmul flops on ``device``, what it is); (None, "") where
    nothing was published for the device."""
    p = published_for(device)
    if p is None:
        return None, ""
    return flops / (p.tflops * 1e12) * 1e3, p.label()


def read_best(reads: int, nbytes: int, read_rate: float, read_what: str
              ) -> tuple[Optional[float], str]:
    """(best ms for reading ``reads`` inputs of ``nbytes`` each once at ``read_rate`` bytes/s,
    what it is); (None, "") for an op with no [N, V] input."""
    if reads < 1:
        return None, ""
    return (reads * nbytes / read_rate * 1e3,
            f"one read of {reads} N x V input{'s' if reads > 1 else ''} at the measured "
            f"{read_what}")
