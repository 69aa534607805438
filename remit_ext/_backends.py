"""Backends and the one dispatcher that picks among them.

Every backend implements the same flattened primitives (logits ``[N, V]``, per-token tensors
``[N]``, ``cu_seqlens`` offsets) and says *why* it refuses an input; ``select_backend`` returns
the first that accepts, or raises an error that lists every backend's reason. The public
functions in ``functional.py`` do validation, flattening and reductions around these.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference as ref
from ._grads import kd_grad, token_stats_grad

# Order in which backend="auto" tries backends, by the inputs' device type (names not
# registered are skipped). Triton is never auto-picked for CPU tensors: its CPU interpreter is a
# test vehicle, not a fast path. On GPUs Triton comes before the hand-written CUDA kernels until
# a measured row of AUTO_TABLE for the device says otherwise: the CUDA kernels have no GPU
# measurement yet, and an unmeasured kernel should not win by default.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# Per-device, per-op backend order measured by `remit-ext bench`, fastest first:
# {"devices": {"<torch.cuda.get_device_name()>": {"<op>": ["cuda", "triton"], ...}}, ...}.
# Read from the user's table (user_auto_table(), where the suite writes it) when there is one,
# else from the one shipped in the package (AUTO_TABLE); a missing or unreadable file means "no
# measurements".
AUTO_TABLE = Path(__file__).resolve().parent / "data" / "auto_table.json"


def user_auto_table() -> Path:
    """The measured table of this user: $REMIT_AUTO_TABLE, else auto_table.json under
    $XDG_CACHE_HOME/remit_ext (default ~/.cache/remit_ext); never inside the installed package."""
    if os.environ.get("REMIT_AUTO_TABLE"):
        return Path(os.environ["REMIT_AUTO_TABLE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "remit_ext" / "auto_table.json"


@functools.lru_cache(maxsize=None)
def load_auto_table(path: Optional[str] = None) -> dict:
    """{device name: {op: [backend, ...]}} from the benchmark's table ({} if there is none)."""
    if path is None:
        user = user_auto_table()
        path = str(user if user.is_file() else AUTO_TABLE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    devices = data.get("devices", {}) if isinstance(data, dict) else {}
    return {name: {op: tuple(order) for op, order in ops.items() if isinstance(order, list)}
            for name, ops in devices.items() if isinstance(ops, dict)}


def auto_order(op: str, device_type: str, device_name: Optional[str] = None,
               table: Optional[dict] = None) -> tuple:
    """The backends backend="auto" tries for `op` on a device: the measured order for this
    device name when the table has one (the rest of the default order after it, so a backend
    that refuses the inputs still has a fallback), else AUTO_ORDER's default for the type."""
    default = AUTO_ORDER.get(device_type, ("torch",))
    table = load_auto_table() if table is None else table
    measured = table.get(device_name, {}).get(op, ()) if device_name else ()
    if not measured:
        return default
    head = tuple(b for b in measured if b in default)
    return head + tuple(b for b in default if b not in head)


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@torch.compiler.assume_constant_result
def _traced_auto_order(op: str, device_type: str, index: int) -> str:
    """auto_order for a device as "a,b,c". Under torch.compile it runs once at trace time and is
    baked into the graph as a constant: the table is read from a file and the device name comes
    from the driver, neither of which dynamo can trace (fullgraph=True would fail on them)."""
    name = _cuda_device_name(index) if device_type == "cuda" else None
    return ",".join(auto_order(op, device_type, name))


class BackendUnavailableError(ValueError):
    """No backend can run the requested op on these inputs; the message lists every reason."""


class Backend:
    name = "?"

    def why_not(self, op: str, tensors: Sequence[Tensor], features: dict) -> Optional[str]:
        """None if this backend can run `op` on `tensors` with `features`, else the reason."""
        raise NotImplementedError


class TorchBackend(Backend):
    """The eager PyTorch references (``remit_ext.reference``): any device, any float dtype."""

    name = "torch"

    def why_not(self, op, tensors, features):
        return None

    def token_stats(self, logits, targets, scorer_logits, ignore_index, temperature, with_entropy,
                    topk=0, topk_renormalize=False):
        lse, logprob, entropy = ref.token_stats_ref(
            logits, targets, ignore_index=ignore_index, temperature=temperature,
            entropy=with_entropy)
        topk_ent = None
        if topk:
            topk_ent = ref.topk_entropy_ref(logits, topk, renormalize=topk_renormalize,
                                            temperature=temperature).detach()
            topk_ent = torch.where(targets != ignore_index, topk_ent, 0)
        scorer_lse = scorer_logprob = None
        if scorer_logits is not None:
            scorer_lse, scorer_logprob, _ = ref.token_stats_ref(
                scorer_logits, targets, ignore_index=ignore_index, temperature=temperature,
                entropy=False)
            # Like the kernels: scorer statistics in the policy's accumulation dtype.
            scorer_lse, scorer_logprob = scorer_lse.to(lse.dtype), scorer_logprob.to(lse.dtype)
        return (lse, logprob, entropy if with_entropy else None, topk_ent, scorer_lse,
                scorer_logprob)

    def remit_weights(self, logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps):
        w, delta_hat, diag = ref.remit_weights_ref(
            logprob, scorer_logprob, targets != ignore_index, cu_seqlens=cu_seqlens, eps=eps,
            detach=False)
        return w, delta_hat, torch.stack(tuple(diag))

    def weighted_ce(self, logits, targets, weights, ignore_index, inplace_backward):
        logprob = ref.target_logprob_ref(logits, targets, ignore_index=ignore_index)
        loss = -logprob
        if weights is not None:
            # Selected: a NaN/inf weight at an ignored position counts nothing.
            loss = torch.where(targets != ignore_index, loss * weights.to(logprob.dtype), 0)
        return loss, logprob.detach()

    def remit_loss(self, logits, targets, scorer_logits, scorer_logprobs, cu_seqlens,
                   ignore_index, eps, detach_weights, inplace_backward):
        per_token, w, diag = ref.remit_loss_ref(
            logits, targets, scorer_logits=scorer_logits, scorer_logprobs=scorer_logprobs,
            cu_seqlens=cu_seqlens, eps=eps, ignore_index=ignore_index, reduction="none",
            detach_weights=detach_weights)
        return per_token, w, torch.stack(tuple(diag))

    def pg_loss(self, logits, actions, advantages, scale, old_logprobs, ref_logprobs,
                ignore_index, clip_low, clip_high, kl_beta, inplace_backward):
        per_token = ref.pg_loss_ref(
            logits, actions, advantages, scale=scale, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, clip_low=clip_low, clip_high=clip_high, kl_beta=kl_beta,
            ignore_index=ignore_index, reduction="none")
        logprob = ref.target_logprob_ref(logits.detach(), actions, ignore_index=ignore_index)
        return per_token, logprob

    def kd(self, logits, teacher_logits, targets, ignore_index, temperature):
        return ref.kd_loss_ref(logits, teacher_logits, targets, temperature=temperature,
                               ignore_index=ignore_index, reduction="none")

    # The fused-linear engine's chunk primitives (remit_ext._linear_engine): the same
    # statistics and gradients as the ops backends', from the eager reference formulas.

    def chunk_logprob(self, z, y, ii):
        lse, a, _ = ref.token_stats_ref(z, y, ignore_index=ii, entropy=False)
        return lse, a

    def chunk_stats(self, z, y, ii, temperature, with_entropy):
        return ref.token_stats_ref(z, y, ignore_index=ii, temperature=temperature,
                                   entropy=with_entropy)

    def chunk_stats_grad_(self, z, y, lse, a, ent, g_lp, g_ent, g_lse, temperature, ii):
        # The gradient of the statistics, formed in the chunk buffer z (the caller's).
        return token_stats_grad(z, y, a, lse, ent, g_lp, g_ent, g_lse, temperature, ii,
                                overwrite=True)

    def chunk_ce_grad_(self, z, y, lse, a, coef, ii):
        # d(-coef * a)/dz = coef * (softmax(z) - onehot(y)), masked at invalid rows.
        return z.copy_(token_stats_grad(z, y, a, lse, None, -coef, None, None, 1.0, ii,
                                        overwrite=True))

    def chunk_kd(self, z, tz, y, ii, temperature):
        loss = ref.kd_loss_ref(z, tz, y, temperature=temperature, ignore_index=ii,
                               reduction="none")
        dt = ref.acc_dtype(z.dtype)
        lse = torch.logsumexp(z.to(dt) / temperature, -1)
        return loss, lse, torch.logsumexp(tz.to(dt) / temperature, -1)

    def chunk_kd_grad(self, z, tz, y, lse, tlse, coef, ii, temperature):
        return kd_grad(z, tz, lse, tlse, coef, y != ii, temperature)


class OpsBackend(Backend):
    """A backend made of registered ops with the schemas of csrc/registration.cpp (the C++
    library, or a Python backend mirroring it); autograd comes with the ops."""

    namespace = "?"

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def token_stats(self, logits, targets, scorer_logits, ignore_index, temperature, with_entropy,
                    topk=0, topk_renormalize=False):
        lse, logprob, entropy, topk_ent, s_lse, s_logprob = self.ops.token_stats(
            logits, targets, scorer_logits, ignore_index, temperature, with_entropy, topk,
            topk_renormalize)
        has_scorer = scorer_logits is not None
        return (lse, logprob, entropy if with_entropy else None, topk_ent if topk else None,
                s_lse if has_scorer else None, s_logprob if has_scorer else None)

    def remit_weights(self, logprob, scorer_logprob, targets, cu_seqlens, ignore_index, eps):
        dt = ref.acc_dtype(logprob.dtype)
        return self.ops.remit_weights(logprob.to(dt), scorer_logprob.to(dt), targets,
                                      cu_seqlens, ignore_index, eps)

    def weighted_ce(self, logits, targets, weights, ignore_index, inplace_backward):
        loss, _, logprob = self.ops.weighted_ce_fwd(logits, targets, weights, ignore_index,
                                                    inplace_backward)
        return loss, logprob

    def remit_loss(self, logits, targets, scorer_logits, scorer_logprobs, cu_seqlens,
                   ignore_index, eps, detach_weights, inplace_backward):
        if scorer_logprobs is not None:
            scorer_logprobs = scorer_logprobs.detach().to(ref.acc_dtype(logits.dtype))
        if scorer_logits is not None:
            scorer_logits = scorer_logits.detach()
        loss, w, _, _, _, diag = self.ops.remit_loss(
            logits, targets, scorer_logits, scorer_logprobs, cu_seqlens, ignore_index, eps,
            detach_weights, inplace_backward)
        return loss, w, diag

    def pg_loss(self, logits, actions, advantages, scale, old_logprobs, ref_logprobs,
                ignore_index, clip_low, clip_high, kl_beta, inplace_backward):
        dt = ref.acc_dtype(logits.dtype)

        def per_token(x):
            return None if x is None else x.detach().to(dt).contiguous()

        loss, _, logprob, _ = self.ops.pg_loss_fwd(
            logits, actions, per_token(advantages), per_token(scale), per_token(old_logprobs),
            per_token(ref_logprobs), ignore_index, clip_low, clip_high, kl_beta,
            inplace_backward)
        return loss, logprob

    def kd(self, logits, teacher_logits, targets, ignore_index, temperature):
        loss, _, _ = self.ops.kd_loss_fwd(logits, teacher_logits.detach(), targets,
                                          ignore_index, temperature)
        return loss

    # The fused-linear engine's chunk primitives (remit_ext._linear_engine): statistics and
    # gradients straight from the registered ops, the CE gradient written in place.

    def chunk_logprob(self, z, y, ii):
        lse, a = self.ops.token_stats(z, y, None, ii, 1.0, False, 0, False)[:2]
        return lse, a

    def chunk_stats(self, z, y, ii, temperature, with_entropy):
        lse, a, ent = self.ops.token_stats(z, y, None, ii, temperature, with_entropy, 0,
                                           False)[:3]
        return lse, a, ent

    def chunk_ce_grad_(self, z, y, lse, a, coef, ii):
        self.ops.weighted_ce_bwd_(z, y, lse, a, coef, ii)
        return z

    def chunk_stats_grad_(self, z, y, lse, a, ent, g_lp, g_ent, g_lse, temperature, ii):
        return token_stats_grad(z, y, a, lse, ent, g_lp, g_ent, g_lse, temperature, ii,
                                overwrite=True)

    def chunk_kd(self, z, tz, y, ii, temperature):
        return self.ops.kd_loss_fwd(z, tz, y, ii, temperature)

    def chunk_kd_grad(self, z, tz, y, lse, tlse, coef, ii, temperature):
        return self.ops.kd_loss_bwd(z, tz, y, lse, tlse, coef, ii, temperature)


class CpuBackend(OpsBackend):
    """The C++ CPU kernels (``csrc/cpu``), through ``torch.ops.remit_ext``."""

    name = "cpu"
    namespace = "remit_ext"

    def why_not(self, op, tensors, features):
        devices = {t.device.type for t in tensors}
        if devices != {"cpu"}:
            return f"needs CPU tensors, got tensors on {sorted(devices)}"
        return None

    def chunk_stats_grad_(self, z, y, lse, a, ent, g_lp, g_ent, g_lse, temperature, ii):
        # One C++ pass over the chunk, in place (csrc/cpu/rows.cpp, stats_grad).
        self.ops.token_stats_bwd_(z, y, lse, a, ent if g_ent is not None else None, g_lp, g_ent,
                                  g_lse, ii, temperature)
        return z


class TritonBackend(OpsBackend):
    """The Triton kernels (``remit_ext/triton``), through ``torch.ops.remit_ext_triton``: CUDA
    tensors, or CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""

    name = "triton"
    namespace = "remit_ext_triton"
    _import_error: Optional[str] = None
    _loaded = False

    def _load(self) -> Optional[str]:
        if not self._loaded:
            try:
                from . import triton as _triton  # noqa: F401  (registers the ops)
            except ImportError as err:
                TritonBackend._import_error = f"triton could not be imported ({err})"
            TritonBackend._loaded = True
        return self._import_error

    def why_not(self, op, tensors, features):
        topk, vocab = features.get("topk") or 0, tensors[0].shape[-1] if tensors else 0
        if 64 < topk < vocab:
            return f"the Triton kernel's top-k entropy takes topk <= 64 (or >= V), got {topk}"
        devices = {t.device.type for t in tensors}
        interpreted = devices == {"cpu"} and os.environ.get("TRITON_INTERPRET", "0") == "1"
        if devices != {"cuda"} and not interpreted:
            return (f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors "
                    f"on {sorted(devices)}")
        return self._load()


def _built_with_cuda() -> bool:
    from ._build import build_info

    return bool(build_info().get("cuda"))


class CudaBackend(OpsBackend):
    """The hand-written CUDA kernels (``csrc/cuda``), through ``torch.ops.remit_ext`` on CUDA
    tensors: built when the extension is compiled against a CUDA torch with nvcc present."""

    name = "cuda"
    namespace = "remit_ext"

    def why_not(self, op, tensors, features):
        if op == "kd_loss":
            return "no CUDA kernel for KD yet (use backend='cpu' or 'torch')"
        topk, vocab = features.get("topk") or 0, tensors[0].shape[-1] if tensors else 0
        if 0 < topk < vocab:
            return (f"the CUDA kernels take top-k entropy only for topk >= V (the full "
                    f"entropy), got topk={topk} < V={vocab}")
        devices = {t.device.type for t in tensors}
        if devices != {"cuda"}:
            return f"needs CUDA tensors, got tensors on {sorted(devices)}"
        if not _built_with_cuda():
            return ("remit_ext was built without its CUDA kernels (torch without CUDA, no nvcc, "
                    "or REMIT_CUDA=OFF); rebuild with a CUDA torch: "
                    "pip install --no-build-isolation -e .")
        return None


BACKENDS: dict[str, Backend] = {
    "torch": TorchBackend(), "cpu": CpuBackend(), "triton": TritonBackend(),
    "cuda": CudaBackend(),
}


def available_backends() -> list[str]:
    """The backends this install has (each may still refuse particular inputs)."""
    names = [name for name in ("cuda", "triton", "cpu", "torch") if name in BACKENDS]
    if importlib.util.find_spec("triton") is None:
        names.remove("triton")
    if not _built_with_cuda():
        names.remove("cuda")
    return names


def select_backend(op: str, backend: str, tensors: Sequence[Optional[Tensor]],
                   **features) -> Backend:
    """The backend that runs `op`: the named one, or for "auto" the first of `auto_order` (the
    measured order for this device, else AUTO_ORDER) that accepts the inputs. Raises
    BackendUnavailableError naming every candidate's reason."""
    present = [t for t in tensors if t is not None]
    if backend == "auto":
        if present:
            device = present[0].device
            index = -1 if device.type != "cuda" else (
                device.index if device.index is not None else torch.cuda.current_device())
            order = tuple(_traced_auto_order(op, device.type, index).split(","))
        else:
            order = ("torch",)
        candidates = [BACKENDS[n] for n in order if n in BACKENDS]
    elif backend in BACKENDS:
        candidates = [BACKENDS[backend]]
    else:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, "
                         f"got {backend!r}")
    reasons = []
    for candidate in candidates:
        reason = candidate.why_not(op, present, features)
        if reason is None:
            return candidate
        reasons.append(f"{candidate.name}: {reason}")
    raise BackendUnavailableError(f"no backend can run {op} (backend={backend!r}): "
                                  + "; ".join(reasons))
