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
import datetime
import gc
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import remit_ext
from remit_ext import fsdp as rfsdp
from remit_ext import parallel

F64 = torch.float64
V, D, B, T = 13, 6, 2, 5  # V = 13: uneven shards over 2 (7 + 6) and 4 (4 + 4 + 4 + 1) ranks
CASES_2: dict = {}
CASES_4: dict = {}


def case(*registries):
    def deco(fn):
        for reg in registries:
            reg[fn.__name__] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------- helpers


class Tiny(nn.Module):
    """embedding -> linear -> tanh: the backbone; lm_head is read by the loss, not called."""

    def __init__(self, seed: int, bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D, dtype=F64)
        self.proj = nn.Linear(D, D, dtype=F64)
        self.lm_head = nn.Linear(D, V, bias=bias, dtype=F64)

    def forward(self, ids):
        return torch.tanh(self.proj(self.emb(ids)))


def _shard_model(model, mesh, head_own_group=True):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(model)
    fully_shard(model.emb, mesh=mesh)
    fully_shard(model.proj, mesh=mesh)
    if head_own_group:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
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
            if not isinstance(obj, torch.Tensor) or isinstance(obj, DTensor) or id(obj) in skip:
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


def _scorer_args(kind, scorer_ref, scorer_sh, ids_r, y_r, ids_all, y_all, rank, sharded):
    """(kwargs for rank r's call, kwargs for the reference call on rows rows)."""
    if kind == "ntp":
        return {"method": "ntp"}
    if kind == "precomputed":
        with torch.no_grad():
            b = remit_ext.linear_token_stats(scorer_ref(ids_all), scorer_ref.lm_head.weight,
                                             y_all, bias=scorer_ref.lm_head.bias).logprob
        return {"scorer_logprobs": b if not sharded else _rows(b, rank)}
    model = scorer_sh if sharded else scorer_ref
    with torch.no_grad():
        sh = model(ids_r if sharded else ids_all)
    return {"scorer_hidden": sh, "scorer_weight": model.lm_head.weight,
            "scorer_bias": model.lm_head.bias}


def _slice_kw(kw, rank):
    return {k: (_rows(v, rank) if k in ("scorer_hidden", "scorer_logprobs") else v)
            for k, v in kw.items()}


def _functional(rank, world, mesh, kind, global_mean, form="functional", steps=2):
    """One model, one scorer, two SGD steps, sharded vs the reference; ``form`` picks the
    public function (through linear.py's hook), remit_ext.fsdp's directly, or the module."""
    ids_all, y_all = _data(world)
    ids, y = _rows(ids_all, rank), _rows(y_all, rank)
    ref = Tiny(0)
    scorer_ref = Tiny(1).requires_grad_(False)
    if form == "module":
        ref_head = copy.deepcopy(ref)
        ref_head.lm_head = rfsdp.ReMiTLinearHead(
            ref_head.lm_head, scorer_head=copy.deepcopy(scorer_ref.lm_head)
            if kind == "live" else None, method="ntp" if kind == "ntp" else "remit",
            backend="cpu", return_details=True)
        ref = ref_head
    sh_model = _shard_model(ref, mesh)
    scorer_sh = _shard_model(scorer_ref, mesh)
    opt = torch.optim.SGD(sh_model.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    what = f"{form} {kind} global_mean={global_mean} W={world}"
    ni = parallel.global_num_items(y, per_rank=True) if global_mean else None
    fn = {"functional": remit_ext.remit_linear_loss, "direct": rfsdp.remit_linear_loss}.get(form)
    for step in range(steps):
        kw_sh = _scorer_args(kind, scorer_ref, scorer_sh, ids, y, ids_all, y_all, rank, True)
        kw_ref = _scorer_args(kind, scorer_ref, scorer_sh, ids, y, ids_all, y_all, rank, False)
        # sharded
        h = sh_model(ids)
        with _SavedSizes() as saved:
            if form == "module":
                out = sh_model.lm_head(h, y, scorer_hidden=kw_sh.get("scorer_hidden"),
                                       scorer_logprobs=kw_sh.get("scorer_logprobs"),
                                       num_items_in_batch=ni)
            else:
                out = fn(h, sh_model.lm_head.weight, y, bias=sh_model.lm_head.bias,
                         num_items_in_batch=ni, backend="cpu", return_details=True, **kw_sh)
        saved.check(f"{what} step {step}")
        out.loss.backward()
        # reference: the same rows on one process
        h_all = ref(ids_all)

        def ref_loss(rows_h, rows_y, kw, n_items):
            if form == "module":
                return ref.lm_head(rows_h, rows_y, scorer_hidden=kw.get("scorer_hidden"),
                                   scorer_logprobs=kw.get("scorer_logprobs"),
                                   num_items_in_batch=n_items)
            return remit_ext.remit_linear_loss(
                rows_h, ref.lm_head.weight, rows_y, bias=ref.lm_head.bias, backend="cpu",
                return_details=True, num_items_in_batch=n_items, **kw)

        if global_mean:
            full = ref_loss(h_all, y_all, kw_ref, None)
            total = full.loss
            mine_loss = None
        else:
            per_rank = [ref_loss(_rows(h_all, r), _rows(y_all, r), _slice_kw(kw_ref, r), None)
                        for r in range(world)]
            total = sum(o.loss for o in per_rank) / world
            mine = per_rank[rank]
            mine_loss = mine.loss
        total.backward()
        if mine_loss is not None:
            _close(out.loss, mine_loss.detach(), f"{what} step {step} loss")
            _close(out.weights, mine.weights, f"{what} step {step} weights")
            if mine.diagnostics is not None:
                for k, v in mine.diagnostics._asdict().items():
                    _close(getattr(out.diagnostics, k), v, f"{what} {k}")
        else:
            got = out.loss.detach().clone()
            dist.all_reduce(got)
            _close(got / world, total.detach(), f"{what} step {step} mean loss")
        _check_grads(sh_model, ref, f"{what} step {step}")
        for p in scorer_sh.parameters():
            assert p.grad is None, f"{what}: the frozen scorer got a gradient"
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        _check_params(sh_model, ref, f"{what} after step {step}")
        del out, h, saved, kw_sh, kw_ref, h_all, total
        _no_full_size_storage(_ref_refs(ref, scorer_ref),
                              f"{what} after step {step}")


@case(CASES_2, CASES_4)
def functional_ntp(rank, world, mesh):
    _functional(rank, world, mesh, "ntp", False)


@case(CASES_2, CASES_4)
def functional_remit_live_scorer(rank, world, mesh):
    _functional(rank, world, mesh, "live", False)


@case(CASES_2)
def functional_remit_precomputed_global_mean(rank, world, mesh):
    _functional(rank, world, mesh, "precomputed", True)


@case(CASES_2)
def direct_ntp_global_mean(rank, world, mesh):
    _functional(rank, world, mesh, "ntp", True, form="direct", steps=1)


@case(CASES_2, CASES_4)
def module_remit_live_scorer(rank, world, mesh):
    _functional(rank, world, mesh, "live", False, form="module")


@case(CASES_2)
def module_ntp_global_mean(rank, world, mesh):
    _functional(rank, world, mesh, "ntp", True, form="module", steps=1)


# ------------------------------------------------------------------------------ harness


def _worker(rank, world, init, out_dir, names):
    torch.set_num_threads(1)
    # A bounded timeout: a rank failing before a collective must not leave its peers waiting
    # for gloo's 30-minute default.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    registry = CASES_4 if world == 4 else CASES_2
    results = {}
    for name in names:
        try:
            registry[name](rank, world, mesh)
            results[name] = None
        except Exception:  # noqa: BLE001  (reported per case by the tests)
            results[name] = traceback.format_exc()
        dist.barrier()  # a failing case must not leave a peer waiting in a collective
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run(world, registry, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    init = f"file://{out}/rendezvous"
    mp.spawn(_worker, args=(world, init, str(out), list(registry)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _run(2, CASES_2, tmp_path_factory)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _run(4, CASES_4, tmp_path_factory)


def _assert_case(results, name):
    errors = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks(results2, name):
    _assert_case(results2, name)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks(results4, name):
    _assert_case(results4, name)
