"""remit_ext.fsdp: fused-linear losses with an FSDP2-sharded LM head (functional and module
forms) against one unsharded process. Gloo on CPU, torch.multiprocessing.spawn: one job of 2
processes and one of 4 run every case once (a module fixture), each test reads its case's
outcome on every rank (the pattern of test_parallel.py).

The equivalence checked. Rank r holds rows r*B..(r+1)*B of a global batch and computes its loss
L_r on its own tokens (mean over its valid tokens). FSDP2 reduce-scatters each parameter's
gradient with averaging, so every parameter (embedding, projection, LM head) steps with
(1/W) sum_r dL_r/dtheta: the gradient of L = (1/W) sum_r L_r. The unsharded model therefore runs
the concatenation of all ranks' tokens once and differentiates (1/W) sum_r loss(rows of r);
the loss each rank returns is its own L_r. With ``num_items_in_batch =
global_num_items(per_rank=True)`` (N_global / W) the same average is the plain mean over all
N_global tokens, so there the unsharded model is one call on the concatenation. The comparison
covers the loss, the ReMiT weights, every parameter's gradient (``full_tensor()`` of the
sharded gradients, for the comparison only) and the parameters after an SGD step, then a
second step's loss and gradients.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import remit_ext
from remit_ext import fsdp as rfsdp
from remit_ext.distributed import fsdp as dfsdp  # the module that issues the collectives
from remit_ext import parallel
from test_parallel import _assert_case, _run, case

F64 = torch.float64
V, D, B, T = 13, 6, 2, 5  # V = 13: uneven shards over 2 (7 + 6) and 4 (4 + 4 + 4 + 1) ranks
CASES_2: dict = {}
CASES_4: dict = {}


# ------------------------------------------------------------------------------- helpers


class Tiny(nn.Module):
    """embedding -> linear -> tanh: the backbone; lm_head is read by the loss, not called."""

    def __init__(self, seed: int, bias: bool = True, dtype=F64):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D, dtype=dtype)
        self.proj = nn.Linear(D, D, dtype=dtype)
        self.lm_head = nn.Linear(D, V, bias=bias, dtype=dtype)

    def forward(self, ids):
        return torch.tanh(self.proj(self.emb(ids)))


def _shard_model(model, mesh, head_own_group=True, scorer_own_group=False, root_kw=None,
                 **fsdp_kw):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(model)
    if scorer_own_group:
        fully_shard(model.lm_head.scorer_head, mesh=mesh, **fsdp_kw)
    fully_shard(model.emb, mesh=mesh, **fsdp_kw)
    fully_shard(model.proj, mesh=mesh, **fsdp_kw)
    if head_own_group:
        fully_shard(model.lm_head, mesh=mesh, **fsdp_kw)
    fully_shard(model, mesh=mesh, **dict(fsdp_kw, **(root_kw or {})))
    return model


def _data(world, seed=0):
    """ids, targets [W*B, T]; each rank a different number of ignored positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (world * B, T), generator=g)
    y = torch.randint(0, V, (world * B, T), generator=g)
    for r in range(world):
        y[r * B, : r + 1] = -100
    y[-1, -1] = V - 1  # the last shard's last row
    return ids, y


def _rows(x, rank):
    return x[rank * B:(rank + 1) * B]


def _close(got, want, name, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_grads(sharded, ref, what):
    from torch.distributed.tensor import DTensor, Shard

    for (name, p), (_, q) in zip(sharded.named_parameters(), ref.named_parameters()):
        if not q.requires_grad:
            assert p.grad is None, f"{what}: frozen {name} got a gradient"
            continue
        assert isinstance(p.grad, DTensor), f"{what}: {name}.grad is {type(p.grad).__name__}"
        assert p.grad.placements == p.placements and p.grad.placements[-1] == Shard(0), name
        assert p.grad.to_local().shape == p.to_local().shape, name
        _close(p.grad.full_tensor(), q.grad, f"{what}: {name}.grad")


def _check_params(sharded, ref, what):
    for (name, p), (_, q) in zip(sharded.named_parameters(), ref.named_parameters()):
        _close(p.full_tensor(), q.detach(), f"{what}: {name}")


def _no_full_size_storage(exclude, what):
    """No plain [*, D] tensor of this process holds a [V, D]-sized storage, but the unsharded
    reference's (by id): the gathered heads and their full-size gradients are gone. FSDP2's own
    unsharded parameters keep their tensor objects with a freed (0-byte) storage."""
    gc.collect()
    full = V * D * 8
    skip = {id(t) for t in exclude}
    from torch.distributed.tensor import DTensor

    for obj in gc.get_objects():
        try:
            # type(), not isinstance(): no __class__ lookups on arbitrary objects.
            if (not issubclass(type(obj), torch.Tensor) or issubclass(type(obj), DTensor)
                    or id(obj) in skip):
                continue
            if (obj.dim() == 2 and obj.shape[1] == D
                    and obj.untyped_storage().nbytes() >= full):
                raise AssertionError(f"{what}: a tensor {tuple(obj.shape)} holds "
                                     f"{obj.untyped_storage().nbytes()} bytes")
        except (RuntimeError, ReferenceError):
            continue


class _SavedSizes:
    """saved_tensors_hooks recording what autograd keeps for backward; after the forward no
    plain saved tensor may hold a [V, D]-sized storage."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    def check(self, what):
        from torch.distributed.tensor import DTensor

        assert self.saved, f"{what}: nothing saved"
        for t in self.saved:
            if isinstance(t, DTensor):
                t = t.to_local()
            assert t.untyped_storage().nbytes() < V * D * 8, (
                f"{what}: a saved {tuple(t.shape)} holds {t.untyped_storage().nbytes()} bytes")


def _ref_refs(*models):
    out = []
    for m in models:
        for p in m.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
    return out


# ---------------------------------------------------------------------------- the runs


def _scorer_args(kind, scorer_ref, scorer_sh, ids, y_all, ids_all, sharded, rank):
    """Scorer kwargs for this rank's sharded call (``sharded``) or for the reference's call on
    all rows: none (ntp), precomputed log-probs, or a live frozen model's hidden + head."""
    if kind is None:
        return {}
    if kind == "precomputed":
        with torch.no_grad():
            b = remit_ext.linear_token_stats(scorer_ref(ids_all), scorer_ref.lm_head.weight,
                                             y_all, bias=scorer_ref.lm_head.bias).logprob
        return {"scorer_logprobs": _rows(b, rank) if sharded else b}
    model = scorer_sh if sharded else scorer_ref
    with torch.no_grad():
        sh = model(ids if sharded else ids_all)
    return {"scorer_hidden": sh, "scorer_weight": model.lm_head.weight,
            "scorer_bias": model.lm_head.bias}


def _slice_kw(kw, rank):
    return {k: (_rows(v, rank) if k in ("scorer_hidden", "scorer_logprobs") else v)
            for k, v in kw.items()}


class _Counts:
    """Counts remit_ext.distributed.fsdp's all-gathers and reduce-scatters of DTensor heads."""

    def __enter__(self):
        self.gathers = self.reduces = 0
        self.saved = dfsdp._gather, dfsdp._reduce
        gather, reduce = self.saved

        def counting_gather(t, lay):
            self.gathers += t is not None and lay is not None
            return gather(t, lay)

        def counting_reduce(*args):
            self.reduces += 1
            return reduce(*args)

        dfsdp._gather, dfsdp._reduce = counting_gather, counting_reduce
        return self

    def __exit__(self, *exc):
        dfsdp._gather, dfsdp._reduce = self.saved


def _run_case(rank, world, mesh, *, method="remit", scorer="live", global_mean=False,
              form="functional", reduction="mean", steps=2, divide_factor=None, counts=None,
              extra=None, head_own_group=True, scorer_own_group=False, empty_rank=None,
              scan=False, root_kw=None):
    """One policy model and one frozen scorer, ``steps`` SGD steps, sharded vs the reference.
    ``form``: ``functional`` (the public remit_linear_loss, through linear.py's DTensor hook),
    ``direct`` (remit_ext.fsdp.remit_linear_loss) or ``module`` (ReMiTLinearHead, its own
    fully_shard group holding the frozen scorer head too). ``divide_factor``: FSDP2's
    set_gradient_divide_factor on every module and gradient_divide_factor= on the call (the
    reference divides the summed loss by it instead of by W). ``counts``: the expected
    (gathers, reduce-scatters) of remit_ext.fsdp per step. ``head_own_group=False``: the head
    in the root's FSDP2 group; ``scorer_own_group``: the module's scorer head sharded apart.
    ``empty_rank``: that rank's targets all ignored (loss 0, no gradient of its own; it still
    joins every collective). ``scan``: also the gc scans for full-size storages (slow)."""
    extra = dict(extra or {})
    ids_all, y_all = _data(world)
    if empty_rank is not None:
        y_all[empty_rank * B:(empty_rank + 1) * B] = -100
    ids, y = _rows(ids_all, rank), _rows(y_all, rank)
    ref = Tiny(0)
    scorer_ref = Tiny(1).requires_grad_(False)
    if form == "module":
        ref.lm_head = rfsdp.ReMiTLinearHead(
            ref.lm_head, scorer_head=copy.deepcopy(scorer_ref.lm_head) if scorer == "live"
            else None, method=method, reduction=reduction, backend="cpu",
            return_details=True, **extra)
    sh_model = _shard_model(ref, mesh, head_own_group, scorer_own_group, root_kw)
    scorer_sh = _shard_model(scorer_ref, mesh)
    factor = world if divide_factor is None else divide_factor
    if divide_factor is not None:
        for m in sh_model.modules():
            if hasattr(m, "set_gradient_divide_factor"):
                m.set_gradient_divide_factor(float(divide_factor))
        extra["gradient_divide_factor"] = float(divide_factor)
    opt = torch.optim.SGD(sh_model.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    what = f"{form} {method} {scorer} {reduction} global_mean={global_mean} W={world}"
    ni = parallel.global_num_items(y, per_rank=True) if global_mean else None
    fn = rfsdp.remit_linear_loss if form == "direct" else remit_ext.remit_linear_loss
    cot = torch.rand(y_all.shape, dtype=F64, generator=torch.Generator().manual_seed(9))

    def objective(loss, rows_cot):  # reduction="none": a fixed per-token cotangent
        return (loss * rows_cot).sum() if reduction == "none" else loss

    def call(model, h, yy, kw, n_items):
        if form == "module":
            return model.lm_head(h, yy, scorer_hidden=kw.get("scorer_hidden"),
                                 scorer_logprobs=kw.get("scorer_logprobs"),
                                 num_items_in_batch=n_items)
        call_fn = fn if model is sh_model else remit_ext.remit_linear_loss
        kw = dict(kw, **extra) if model is sh_model else dict(
            kw, **{k: v for k, v in extra.items() if k != "gradient_divide_factor"})
        return call_fn(h, model.lm_head.weight, yy, bias=model.lm_head.bias, method=method,
                       reduction=reduction, num_items_in_batch=n_items, backend="cpu",
                       return_details=True, **kw)

    for step in range(steps):
        kw_sh = _scorer_args(scorer, scorer_ref, scorer_sh, ids, y_all, ids_all, True, rank)
        kw_ref = _scorer_args(scorer, scorer_ref, scorer_sh, ids, y_all, ids_all, False, rank)
        h = sh_model(ids)
        with _Counts() as counted:
            with _SavedSizes() as saved:
                out = call(sh_model, h, y, kw_sh, ni)
            if head_own_group and (form != "module" or extra.get("recompute", True)):
                # The one-pass schedule keeps its full-size fp32 dW buffer until the backward
                # (and a head in the root's group is a plain, unsharded tensor after the root's
                # forward: FSDP2 does not reshard the root, the call takes that one-pass path).
                saved.check(f"{what} step {step}")
                if scan and step == 0:  # ... nor anything else between forward and backward
                    _no_full_size_storage(_ref_refs(ref, scorer_ref), f"{what} forward")
            objective(out.loss, _rows(cot, rank)).backward()
        if counts is not None:
            assert (counted.gathers, counted.reduces) == counts, (
                f"{what}: (gathers, reduce-scatters) {(counted.gathers, counted.reduces)}, "
                f"expected {counts}")
        # The reference: the same rows in one process.
        h_all = ref(ids_all)
        if global_mean:
            total = objective(call(ref, h_all, y_all, kw_ref, None).loss, cot) / (factor / world)
            mine = None
        else:
            per_rank = [call(ref, _rows(h_all, r), _rows(y_all, r), _slice_kw(kw_ref, r), None)
                        for r in range(world)]
            total = sum(objective(o.loss, _rows(cot, r)) for r, o in enumerate(per_rank)) / factor
            mine = per_rank[rank]
        total.backward()
        if mine is not None:
            _close(out.loss, mine.loss.detach(), f"{what} step {step} loss")
            _close(out.weights, mine.weights, f"{what} step {step} weights")
            if mine.diagnostics is not None:
                for k, v in mine.diagnostics._asdict().items():
                    _close(getattr(out.diagnostics, k), v, f"{what} {k}")
        else:
            got = out.loss.detach().clone()
            dist.all_reduce(got)
            _close(got / world, total.detach() * (factor / world), f"{what} step {step} loss")
        _check_grads(sh_model, ref, f"{what} step {step}")
        for p in scorer_sh.parameters():
            assert p.grad is None, f"{what}: the frozen scorer got a gradient"
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        _check_params(sh_model, ref, f"{what} after step {step}")
        del out, h, saved, kw_sh, kw_ref, h_all, total, mine
        per_rank = None
    if scan:
        _no_full_size_storage(_ref_refs(ref, scorer_ref), f"{what} after the last step")


# Per step with a bias on both heads: ReMiT / Rho-1 gather W, b, W_s, b_s in the forward and
# W, b again in the backward (the scorer's log-probs are kept, not its head); KD also gathers
# the teacher again; two reduce-scatters (W, b), none for the frozen heads.


@case(CASES_2, CASES_4)
def functional_ntp(rank, world, mesh):
    _run_case(rank, world, mesh, method="ntp", scorer=None, counts=(4, 2), scan=True)


@case(CASES_2, CASES_4)
def functional_remit_live_scorer(rank, world, mesh):
    _run_case(rank, world, mesh, counts=(6, 2), scan=True)


@case(CASES_2)
def functional_remit_precomputed_global_mean(rank, world, mesh):
    _run_case(rank, world, mesh, scorer="precomputed", global_mean=True, counts=(4, 2))


@case(CASES_2)
def functional_rho1_kd_sum_none(rank, world, mesh):
    _run_case(rank, world, mesh, method="rho1", steps=1, extra={"keep_ratio": 0.5},
              counts=(6, 2))
    _run_case(rank, world, mesh, method="kd", steps=1, extra={"temperature": 1.5},
              counts=(8, 2))
    _run_case(rank, world, mesh, method="remit", reduction="sum", steps=1)
    _run_case(rank, world, mesh, method="remit", reduction="none", steps=1,
              extra={"chunk_size": 3})
    # Packed documents over each rank's 10 tokens, chunks shorter than a document (two passes).
    _run_case(rank, world, mesh, steps=1, counts=(6, 2),
              extra={"cu_seqlens": torch.tensor([0, 3, 7, 10]), "chunk_size": 3})
    _run_case(rank, world, mesh, steps=1, empty_rank=0, counts=(6, 2))


@case(CASES_2)
def direct_ntp_global_mean_divide_factor(rank, world, mesh):
    _run_case(rank, world, mesh, method="ntp", scorer=None, global_mean=True, form="direct",
              steps=1)
    _run_case(rank, world, mesh, method="ntp", scorer=None, form="direct", steps=1,
              divide_factor=1)


@case(CASES_2, CASES_4)
def module_remit_live_scorer(rank, world, mesh):
    # FSDP2 gathers and reduces the module's heads itself: remit_ext.fsdp does no collective.
    _run_case(rank, world, mesh, form="module", counts=(0, 0), scan=True)


@case(CASES_2)
def module_ntp_global_mean_and_one_pass(rank, world, mesh):
    _run_case(rank, world, mesh, method="ntp", scorer=None, global_mean=True, form="module",
              steps=1)
    _run_case(rank, world, mesh, method="remit", scorer="precomputed", form="module", steps=1,
              extra={"recompute": False})


@case(CASES_2)
def head_in_root_group_and_scorer_apart(rank, world, mesh):
    # The head in the root's group: the functional call after the root's forward.
    _run_case(rank, world, mesh, method="ntp", scorer=None, steps=1, head_own_group=False)
    # ... with the root resharded after its forward: the head is a DTensor again, this path's.
    _run_case(rank, world, mesh, scorer="live", steps=2, head_own_group=False,
              root_kw={"reshard_after_forward": True}, counts=(6, 2))
    # The module's frozen scorer head in a group of its own, whose forward never runs: it stays
    # a DTensor inside the module's forward, gathered there once (W_s, b_s) and never reduced;
    # the policy head is FSDP2's (unsharded by the module's group).
    _run_case(rank, world, mesh, form="module", steps=1, scorer_own_group=True,
              counts=(2, 0))


@case(CASES_2)
def token_stats_functional(rank, world, mesh):
    """linear_token_stats with a sharded head: per-token log-prob, entropy and lse of this
    rank's tokens, and for random cotangents on all three the gradients of
    (1/W) sum_r <cotangents, stats_r>."""
    ids_all, y_all = _data(world)
    ids, y = _rows(ids_all, rank), _rows(y_all, rank)
    ref = Tiny(0)
    sh_model = _shard_model(ref, mesh)
    g = torch.Generator().manual_seed(4)
    cots = [torch.randn(y_all.shape, dtype=F64, generator=g) for _ in range(3)]
    for temp in (1.0, 0.7):
        with _Counts() as counted:
            st = remit_ext.linear_token_stats(sh_model(ids), sh_model.lm_head.weight, y,
                                              bias=sh_model.lm_head.bias, entropy=True,
                                              temperature=temp, backend="cpu")
            sum((s * _rows(c, rank)).sum() for s, c in zip(st, cots)).backward()
        assert (counted.gathers, counted.reduces) == (4, 2), (counted.gathers, counted.reduces)
        want = remit_ext.linear_token_stats(ref(ids_all), ref.lm_head.weight, y_all,
                                            bias=ref.lm_head.bias, entropy=True,
                                            temperature=temp, backend="cpu")
        (sum((s * c).sum() for s, c in zip(want, cots)) / world).backward()
        for name, got, exp in zip(("logprob", "entropy", "lse"), st, want):
            _close(got, _rows(exp, rank).detach(), f"T={temp} {name}")
        _check_grads(sh_model, ref, f"token_stats T={temp}")
        for m in (sh_model, ref):
            m.zero_grad()
        # Log-prob cotangents alone (the fast path of the primitive's backward).
        st = remit_ext.linear_token_stats(sh_model(ids), sh_model.lm_head.weight, y,
                                          backend="cpu", bias=sh_model.lm_head.bias)
        (st.logprob * _rows(cots[0], rank)).sum().backward()
        want = remit_ext.linear_token_stats(ref(ids_all), ref.lm_head.weight, y_all,
                                            bias=ref.lm_head.bias, backend="cpu")
        ((want.logprob * cots[0]).sum() / world).backward()
        _check_grads(sh_model, ref, f"token_stats logprob only T={temp}")
        for m in (sh_model, ref):
            m.zero_grad()
        del st, want
    _no_full_size_storage(_ref_refs(ref), "token_stats")


@case(CASES_2)
def gradient_accumulation(rank, world, mesh):
    """Two micro-batches, backward after each, one step: the DTensor gradients accumulate on the
    parameters (each backward reduce-scatters its own; the sum is the one reduction of both)."""
    ref, scorer = Tiny(0), Tiny(1).requires_grad_(False)
    sh_model, sh_scorer = _shard_model(ref, mesh), _shard_model(scorer, mesh)
    for seed in (3, 4):
        ids_all, y_all = _data(world, seed)
        ids, y = _rows(ids_all, rank), _rows(y_all, rank)
        with torch.no_grad():
            s_h, s_all = sh_scorer(ids), scorer(ids_all)
        remit_ext.remit_linear_loss(
            sh_model(ids), sh_model.lm_head.weight, y, bias=sh_model.lm_head.bias,
            scorer_hidden=s_h, scorer_weight=sh_scorer.lm_head.weight,
            scorer_bias=sh_scorer.lm_head.bias, backend="cpu").backward()
        h_all = ref(ids_all)
        sum(remit_ext.remit_linear_loss(
            _rows(h_all, r), ref.lm_head.weight, _rows(y_all, r), bias=ref.lm_head.bias,
            scorer_hidden=_rows(s_all, r), scorer_weight=scorer.lm_head.weight,
            scorer_bias=scorer.lm_head.bias, backend="cpu") / world
            for r in range(world)).backward()
    _check_grads(sh_model, ref, "two micro-batches")


@case(CASES_2)
def full_tensor_pitfall_is_caught(rank, world, mesh):
    """Test the tester: the naive ``weight.full_tensor()`` (its backward takes the gradient as
    replicated and keeps this rank's rows of this rank's own gradient) must fail the gradient
    comparison that remit_ext.fsdp passes."""
    ids_all, y_all = _data(world)
    ids, y = _rows(ids_all, rank), _rows(y_all, rank)
    ref = Tiny(0)
    sh_model = _shard_model(ref, mesh)
    head = sh_model.lm_head
    remit_ext.remit_linear_loss(sh_model(ids), head.weight.full_tensor(), y,
                                bias=head.bias.full_tensor(), method="ntp",
                                backend="cpu").backward()
    h_all = ref(ids_all)
    (sum(remit_ext.remit_linear_loss(_rows(h_all, r), ref.lm_head.weight, _rows(y_all, r),
                                     bias=ref.lm_head.bias, method="ntp", backend="cpu")
         for r in range(world)) / world).backward()
    with pytest.raises(AssertionError, match="lm_head.weight.grad"):
        _check_grads(sh_model, ref, "full_tensor()")


@case(CASES_2)
def mixed_precision(rank, world, mesh):
    """FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards, bf16
    activations. The heads are gathered and computed in bf16, their gradients reduced in fp32
    and returned fp32, like every other parameter's. Reference: a bf16 copy of the model on
    one process (bf16 tolerances: the reference sums the ranks' bf16 gradients in bf16, FSDP2
    in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = torch.bfloat16
    mp_policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
    ids_all, y_all = _data(world)
    ids, y = _rows(ids_all, rank), _rows(y_all, rank)
    for method in ("ntp", "remit"):
        ref = Tiny(0, dtype=torch.float32)
        scorer = Tiny(1, dtype=torch.float32).requires_grad_(False)
        sh_model = _shard_model(ref, mesh, mp_policy=mp_policy)
        sh_scorer = _shard_model(scorer, mesh, mp_policy=mp_policy)
        ref16, scorer16 = copy.deepcopy(ref).to(bf16), copy.deepcopy(scorer).to(bf16)

        def kw(sc, s_ids):
            if method == "ntp":
                return {"method": "ntp"}
            with torch.no_grad():
                return {"scorer_hidden": sc(s_ids), "scorer_weight": sc.lm_head.weight,
                        "scorer_bias": sc.lm_head.bias}

        h = sh_model(ids)
        assert h.dtype == bf16
        out = remit_ext.remit_linear_loss(h, sh_model.lm_head.weight, y,
                                          bias=sh_model.lm_head.bias, backend="cpu",
                                          **kw(sh_scorer, ids))
        out.backward()
        h_all, kw16 = ref16(ids_all), kw(scorer16, ids_all)
        losses = [remit_ext.remit_linear_loss(_rows(h_all, r), ref16.lm_head.weight,
                                              _rows(y_all, r), bias=ref16.lm_head.bias,
                                              backend="cpu", **_slice_kw(kw16, r))
                  for r in range(world)]
        (sum(losses) / world).backward()
        _close(out, losses[rank].detach(), f"mp {method} loss", atol=1e-3, rtol=1e-3)
        for (name, p), (_, q) in zip(sh_model.named_parameters(), ref16.named_parameters()):
            assert p.grad.dtype == torch.float32 and p.grad.placements == p.placements, name
            _close(p.grad.full_tensor(), q.grad.float(), f"mp {method} {name}.grad",
                   atol=2e-3, rtol=1e-2)  # seen: 5e-4 on entries of 0.2


@case(CASES_2)
def refusals(rank, world, mesh):
    from torch.distributed.tensor import DTensor, Partial, Shard

    def raises(fn, *words):
        try:
            fn()
        except ValueError as err:
            for w in words:
                assert w in str(err), f"{w!r} not in {err}"
            return
        raise AssertionError(f"expected a ValueError naming {words}")

    h = torch.randn(B, T, D, dtype=F64)
    y = torch.randint(0, V, (B, T))
    w = torch.randn(V, D, dtype=F64)
    def dt(x, placement):  # no collective: each rank's piece of the same tensor
        local = (placement._split_tensor(x, world, with_padding=False)[0][rank]
                 if isinstance(placement, Shard) else x)
        return DTensor.from_local(local, mesh, [placement], run_check=False, shape=x.shape,
                                  stride=x.stride())

    for placement in (Shard(1), Partial()):
        raises(lambda: rfsdp.remit_linear_loss(h, dt(w, placement), y, method="ntp"),
               "lm_head_weight", "Shard(0)")
    raises(lambda: rfsdp.linear_token_stats(dt(h, Shard(0)), dt(w, Shard(0)), y),
           "hidden", "plain tensor")
    # A rank-local error (a target out of range on rank 0 only) is raised before any gather,
    # and rank 0 joins the handshake refusing: its peers raise a ValueError too instead of
    # waiting in the gather rank 0 never reaches (before the fix they hung until the timeout).
    bad = y.clone()
    if rank == 0:
        bad[0, 0] = V
    for fn, kw in ((rfsdp.remit_linear_loss, {"method": "ntp"}), (rfsdp.linear_token_stats, {}),
                   (remit_ext.remit_linear_loss, {"method": "ntp"})):
        raises(lambda: fn(h, dt(w, Shard(0)), bad, **kw),
               *(("targets",) if rank == 0 else ("peer rank", "refused")))
    # Ranks whose calls would issue different gathers (rank 0: precomputed scorer log-probs,
    # the others a live scorer head of the policy's shape: their scorer gather would pair
    # with rank 0's policy gather) all raise instead.
    if rank == 0:
        kw = {"scorer_logprobs": torch.randn(B, T, dtype=F64)}
    else:
        kw = {"scorer_hidden": h, "scorer_weight": dt(w, Shard(0))}
    raises(lambda: remit_ext.remit_linear_loss(h, dt(w, Shard(0)), y, **kw), "same call")
    # The same call on every rank passes the handshake.
    remit_ext.remit_linear_loss(h, dt(w, Shard(0)), y, method="ntp")


def _dshard(x, mesh, requires_grad=True):
    """A Shard(0) DTensor leaf of ``x`` (the same full tensor on every rank)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(x.detach().clone(), mesh, [Shard(0)]).requires_grad_(requires_grad)


@case(CASES_2)
def independent_reference_and_partial_dtensors(rank, world, mesh):
    """Against an fp64 reference that shares no code with remit_ext's kernels: full logits
    h @ W.T + b, F.cross_entropy / log_softmax / remit_ext.reference, autograd, on every rank's
    tokens; FSDP2's average (1/W) sum_r dL_r for each DTensor head, the local gradient for a
    plain one. Any one head argument may be the DTensor: weight and bias, bias alone (the
    weight plain), scorer_bias alone (the scorer weight plain); linear_token_stats with a
    DTensor bias alone. Before the fix, the bias-only calls hit DTensor's mixed-tensor error."""
    from torch.nn import functional as F

    from remit_ext import reference as ref

    g = torch.Generator().manual_seed(11)
    h_all = torch.randn(world * B, T, D, dtype=F64, generator=g)
    sh_all = torch.randn(world * B, T, D, dtype=F64, generator=g)
    w0, b0 = torch.randn(V, D, dtype=F64, generator=g), torch.randn(V, dtype=F64, generator=g)
    sw0, sb0 = torch.randn(V, D, dtype=F64, generator=g), torch.randn(V, dtype=F64, generator=g)
    _, y_all = _data(world, seed=5)
    h_loc, y, s_loc = _rows(h_all, rank), _rows(y_all, rank), _rows(sh_all, rank)

    def reference(method, what):
        """(per-rank losses, grads of (1/W) sum_r L_r) by plain autograd on full logits."""
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        h = h_all.clone().requires_grad_()
        losses = []
        for r in range(world):
            z = (_rows(h, r) @ w.T + b).reshape(-1, V)
            yr = _rows(y_all, r).reshape(-1)
            if method == "ntp":
                losses.append(F.cross_entropy(z, yr, ignore_index=-100))
            elif method == "remit":
                sz = (_rows(sh_all, r) @ sw0.T + sb0).reshape(-1, V)
                losses.append(ref.remit_loss_ref(z, yr, scorer_logits=sz,
                                                 cu_seqlens=torch.arange(0, B * T + 1, T))[0])
            else:  # token stats: <logprob, 1> + <lse, 0.5>
                lse, lp, _ = ref.token_stats_ref(z, yr, entropy=False)
                losses.append(lp.sum() + 0.5 * lse.sum())
        (sum(losses) / world).backward()
        return losses[rank].detach(), _rows(h.grad, rank) * world, w.grad, b.grad

    def check(got, want, grads, w_full, b_full, w_local, b_local, what):
        loss, gh, gw, gb = want
        _close(got.detach(), loss, f"{what} loss")
        hg, wg, bg = grads
        _close(hg, gh, f"{what} grad hidden")
        for name, t, full, local in (("weight", wg, gw, w_local), ("bias", bg, gb, b_local)):
            if hasattr(t, "full_tensor"):
                _close(t.full_tensor(), full, f"{what} grad {name} (averaged)")
            else:  # a plain head: this rank's own gradient, not reduced
                _close(t, local, f"{what} grad {name} (local)")

    def local_grads(method):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        z = (h_loc @ w.T + b).reshape(-1, V)
        if method == "ntp":
            loss = F.cross_entropy(z, y.reshape(-1), ignore_index=-100)
        elif method == "remit":
            sz = (s_loc @ sw0.T + sb0).reshape(-1, V)
            loss = ref.remit_loss_ref(z, y.reshape(-1), scorer_logits=sz,
                                      cu_seqlens=torch.arange(0, B * T + 1, T))[0]
        else:
            lse, lp, _ = ref.token_stats_ref(z, y.reshape(-1), entropy=False)
            loss = lp.sum() + 0.5 * lse.sum()
        return torch.autograd.grad(loss, (w, b))

    for method, layout in (("ntp", "both"), ("ntp", "bias"), ("remit", "both"),
                           ("remit", "bias"), ("remit", "scorer_bias"), ("stats", "bias")):
        what = f"{method} {layout}-DTensor"
        want = reference(method, what)
        lw, lb = local_grads(method)
        h = h_loc.clone().requires_grad_()
        w = _dshard(w0, mesh) if layout == "both" else w0.clone().requires_grad_()
        b = _dshard(b0, mesh) if layout in ("both", "bias") else b0.clone().requires_grad_()
        sb = _dshard(sb0, mesh, False) if layout == "scorer_bias" else sb0
        if method == "stats":
            st = remit_ext.linear_token_stats(h, w, y, bias=b, backend="cpu", chunk_size=3)
            got = st.logprob.sum() + 0.5 * st.lse.sum()
        else:
            kw = ({} if method == "ntp" else
                  {"scorer_hidden": s_loc, "scorer_weight": sw0, "scorer_bias": sb})
            got = remit_ext.remit_linear_loss(h, w, y, bias=b, method=method, backend="cpu",
                                              chunk_size=3, **kw)
        got.backward()
        check(got, want, (h.grad, w.grad, b.grad), None, None, lw, lb, what)


@case(CASES_4)
def hsdp_ntp(rank, world, mesh):
    """HSDP: a (2 replicas x 2 shards) mesh, heads [Replicate, Shard(0)]; the gradient is
    reduce-scattered over the shard dim, all-reduced over the replicas, divided by 4."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    _run_case(rank, world, mesh2, method="ntp", scorer=None, steps=1, counts=(4, 2))
    _run_case(rank, world, mesh2, scorer="live", steps=1, counts=(6, 2))


# ------------------------------------------------------------------------------ harness


def _mesh(rank, world):
    """This file's per-process context: a 1-D device mesh over every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _run(2, CASES_2, tmp_path_factory, setup=_mesh)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _run(4, CASES_4, tmp_path_factory, setup=_mesh)


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks(results2, name):
    _assert_case(results2, name)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks(results4, name):
    _assert_case(results4, name)


# ------------------------------------------------------------- one process, plain heads


@pytest.mark.parametrize("recompute", [True, False])
def test_head_module_plain_matches_remit_linear_loss(recompute):
    """ReMiTLinearHead without FSDP2: the loss and gradients of remit_linear_loss on the same
    parameters (the recompute path is remit_ext.fsdp's, with plain heads used as they are), and
    without targets the logits of the nn.Linear it took."""
    torch.manual_seed(0)
    lin, s_lin = nn.Linear(D, V, dtype=F64), nn.Linear(D, V, dtype=F64)
    head = rfsdp.ReMiTLinearHead(lin, scorer_head=copy.deepcopy(s_lin), backend="cpu",
                                 return_details=True, recompute=recompute)
    assert head.weight is lin.weight and not head.scorer_head.weight.requires_grad
    h = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    sh = torch.randn(B, T, D, dtype=F64)
    _, y = _data(1)
    torch.testing.assert_close(head(h), lin(h))
    out = head(h, y, scorer_hidden=sh)
    g = torch.autograd.grad(out.loss, (h, lin.weight, lin.bias))
    want = remit_ext.remit_linear_loss(h, lin.weight, y, bias=lin.bias, scorer_hidden=sh,
                                       scorer_weight=s_lin.weight, scorer_bias=s_lin.bias,
                                       backend="cpu", return_details=True)
    g_want = torch.autograd.grad(want.loss, (h, lin.weight, lin.bias))
    _close(out.loss, want.loss, "loss")
    _close(out.weights, want.weights, "weights")
    for got, exp, name in zip(g, g_want, ("hidden", "weight", "bias")):
        _close(got, exp, f"grad {name}")


def test_functions_without_dtensors_match_linear():
    """remit_ext.fsdp's functions on plain tensors: remit_ext's (no process group needed)."""
    torch.manual_seed(1)
    h = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, dtype=F64, requires_grad=True)
    _, y = _data(1)
    for fn_fsdp, fn in ((rfsdp.linear_token_stats, remit_ext.linear_token_stats),
                        (rfsdp.remit_linear_loss, remit_ext.remit_linear_loss)):
        kw = {"entropy": True} if fn is remit_ext.linear_token_stats else {"method": "ntp"}
        got, want = fn_fsdp(h, w, y, backend="cpu", **kw), fn(h, w, y, backend="cpu", **kw)
        obj = (lambda o: o.logprob.sum() + o.entropy.sum()) if "entropy" in kw else (lambda o: o)
        _close(obj(got), obj(want), fn.__name__)
        for a, b in zip(torch.autograd.grad(obj(got), (h, w)),
                        torch.autograd.grad(obj(want), (h, w))):
            _close(a, b, f"{fn.__name__} grad")


def test_head_module_refuses():
    with pytest.raises(TypeError, match="lm_head"):
        rfsdp.ReMiTLinearHead(torch.zeros(V, D))
    with pytest.raises(TypeError, match="scorer_head"):
        rfsdp.ReMiTLinearHead(nn.Linear(D, V), scorer_head=nn.Parameter(torch.zeros(V, D)))
