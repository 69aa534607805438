"""remit_ext.parallel against the single-process results: vocab parallel (tp_group, plain shards
and DTensor Shard(-1)), context-parallel ReMiT centring (cp_group), data-parallel diagnostics and
token counts, and the refusals. Gloo process groups on CPU, started by torch.multiprocessing.spawn:
one job of 2 processes and one of 4 run every case once (a module fixture), and each test reads
its case's outcome on every rank. Each rank rebuilds the full inputs from a seed, so the
single-process result is the same call without a group on the full tensors."""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import remit_ext
from remit_ext import parallel

F64 = torch.float64
CASES_2: dict = {}
CASES_4: dict = {}


def case(*registries):
    def deco(fn):
        for reg in registries:
            reg[fn.__name__] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------- helpers


def _bounds(v: int, world: int) -> list[int]:
    """Uneven contiguous shards (torch.chunk's split): [0, b1, ..., v]."""
    size = -(-v // world)
    return [min(r * size, v) for r in range(world)] + [v]


def _shard(x, rank, world):
    b = _bounds(x.shape[-1], world)
    return x[..., b[rank]:b[rank + 1]].detach().clone().requires_grad_(x.requires_grad)


def _inputs(b=2, t=5, v=11, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).to(dtype)
    s = (torch.randn(b, t, v, generator=g, dtype=F64) * 2).to(dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 1] = -100
    y[-1, 0] = v - 1  # the last shard's last id
    y[0, 0] = 0
    return z, s, y


def _close(got, want, name, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _replicated(x, group=None):
    """x is bitwise the same on every rank of the group."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    for p in parts:
        assert torch.equal(p, parts[0]), "results differ across ranks"


def _grad_pair(fn_full, fn_shard, z, rank, world, extra=None):
    """(sharded result, its local grad) and (full result, full grad sliced)."""
    zf = z.clone().requires_grad_(True)
    full = fn_full(zf)
    zl = _shard(z, rank, world).requires_grad_(True)
    part = fn_shard(zl)
    return full, zf, part, zl


def _check_grad(full, zf, part, zl, rank, world, name, atol=1e-10):
    g = torch.Generator().manual_seed(7)
    cot = torch.randn(full.shape, generator=g, dtype=full.dtype)
    (full * cot).sum().backward()
    (part * cot).sum().backward()
    b = _bounds(zf.shape[-1], world)
    _close(part.detach(), full.detach(), f"{name} value", atol=atol)
    _close(zl.grad, zf.grad[..., b[rank]:b[rank + 1]], f"{name} grad", atol=atol)
    _replicated(part.detach())


def _raises(fn, exc, *words):
    try:
        fn()
    except exc as err:
        for w in words:
            assert w in str(err), f"{w!r} not in {err}"
        return
    raise AssertionError(f"expected {exc.__name__} naming {words}")


# --------------------------------------------------------------- vocab parallel (2 ranks)


@case(CASES_2)
def token_stats_tp(rank, world, groups):
    z, _, y = _inputs()
    for backend in ("cpu", "torch"):
        for temp, ent in ((1.0, True), (0.7, True), (1.0, False)):
            def full(zz, field):
                st = remit_ext.token_stats(zz, y, entropy=ent, temperature=temp, backend=backend)
                return getattr(st, field)

            def part(zz, field):
                st = remit_ext.token_stats(zz, y, entropy=ent, temperature=temp, backend=backend,
                                           tp_group=groups["world"])
                return getattr(st, field)

            fields = ("lse", "logprob", "entropy") if ent else ("lse", "logprob")
            for field in fields:
                res = _grad_pair(lambda q: full(q, field), lambda q: part(q, field), z, rank,
                                 world)
                _check_grad(*res, rank, world, f"{backend} T={temp} {field}")


@case(CASES_2)
def token_stats_tp_float32_scorer(rank, world, groups):
    z, s, y = _inputs(dtype=torch.float32)
    full = remit_ext.token_stats(z, y, scorer_logits=s, entropy=True)
    part = remit_ext.token_stats(_shard(z, rank, world), y, scorer_logits=_shard(s, rank, world),
                                 entropy=True, tp_group=groups["world"])
    for f in ("lse", "logprob", "entropy", "scorer_lse", "scorer_logprob"):
        _close(getattr(part, f), getattr(full, f), f, atol=2e-5, rtol=2e-5)
    assert part.topk_entropy is None


@case(CASES_2)
def weighted_ce_tp(rank, world, groups):
    z, _, y = _inputs()
    w = torch.rand(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    for reduction in ("mean", "sum", "none"):
        wf, wl = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        res = _grad_pair(
            lambda q: remit_ext.weighted_cross_entropy(q, y, wf, reduction=reduction),
            lambda q: remit_ext.weighted_cross_entropy(q, y, wl, reduction=reduction,
                                                       tp_group=groups["world"]),
            z, rank, world)
        _check_grad(*res, rank, world, f"wce {reduction}")
        _close(wl.grad, wf.grad, "weights grad")
    n = torch.tensor(40)
    got = remit_ext.weighted_cross_entropy(_shard(z, rank, world), y, num_items_in_batch=n,
                                           tp_group=groups["world"])
    _close(got, remit_ext.weighted_cross_entropy(z, y, num_items_in_batch=n), "num_items")


@case(CASES_2)
def remit_loss_tp(rank, world, groups):
    z, s, y = _inputs()
    cu = torch.tensor([0, 3, 7, 10])
    for kw in ({}, {"cu_seqlens": cu}):
        for src in ("logits", "logprobs"):
            b = remit_ext.token_stats(s, y).logprob

            def scorer(sharded):
                if src == "logprobs":
                    return {"scorer_logprobs": b}
                return {"scorer_logits": _shard(s, rank, world) if sharded else s}

            res = _grad_pair(
                lambda q: remit_ext.remit_loss(q, y, **scorer(False), eps=0.1, **kw),
                lambda q: remit_ext.remit_loss(q, y, **scorer(True), eps=0.1,
                                               tp_group=groups["world"], **kw),
                z, rank, world)
            _check_grad(*res, rank, world, f"remit {src} {kw}")
            full = remit_ext.remit_loss(z, y, **scorer(False), eps=0.1, return_details=True, **kw)
            part = remit_ext.remit_loss(_shard(z, rank, world), y, **scorer(True), eps=0.1,
                                        return_details=True, tp_group=groups["world"], **kw)
            _close(part.weights, full.weights, "weights")
            for k, v in full.diagnostics._asdict().items():
                _close(getattr(part.diagnostics, k), v, k)


@case(CASES_2)
def rho1_tp(rank, world, groups):
    z, s, y = _inputs()
    res = _grad_pair(
        lambda q: remit_ext.rho1_loss(q, y, ref_logits=s, keep_ratio=0.5),
        lambda q: remit_ext.rho1_loss(q, y, ref_logits=_shard(s, rank, world), keep_ratio=0.5,
                                      tp_group=groups["world"]),
        z, rank, world)
    _check_grad(*res, rank, world, "rho1")


@case(CASES_2)
def pg_tp(rank, world, groups):
    z, _, y = _inputs()
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(y.shape, generator=g, dtype=F64)
    old = remit_ext.token_stats(z, y).logprob + 0.3 * torch.randn(y.shape, generator=g, dtype=F64)
    refl = old - 0.1
    for kw in ({}, {"old_logprobs": old, "ref_logprobs": refl, "kl_beta": 0.1,
                    "clip_eps_high": 0.28}):
        res = _grad_pair(
            lambda q: remit_ext.policy_gradient_loss(q, y, adv, **kw),
            lambda q: remit_ext.policy_gradient_loss(q, y, adv, tp_group=groups["world"], **kw),
            z, rank, world)
        _check_grad(*res, rank, world, f"pg {sorted(kw)}")
        full = remit_ext.policy_gradient_loss(z, y, adv, return_details=True, **kw)
        part = remit_ext.policy_gradient_loss(_shard(z, rank, world), y, adv, return_details=True,
                                              tp_group=groups["world"], **kw)
        _close(part.logprobs, full.logprobs, "logprobs")
        _close(part.clip_frac, full.clip_frac, "clip_frac")


@case(CASES_2)
def kd_tp(rank, world, groups):
    z, s, y = _inputs()
    for temp in (1.0, 2.0):
        res = _grad_pair(
            lambda q: remit_ext.kd_loss(q, s, y, temperature=temp, reduction="none"),
            lambda q: remit_ext.kd_loss(q, _shard(s, rank, world), y, temperature=temp,
                                        reduction="none", tp_group=groups["world"]),
            z, rank, world)
        _check_grad(*res, rank, world, f"kd T={temp}")


@case(CASES_2)
def dtensor_shard_tp(rank, world, groups):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    z, s, y = _inputs()
    zf = z.clone().requires_grad_(True)
    full = remit_ext.remit_loss(zf, y, scorer_logits=s)
    full.backward()
    zl = _shard(z, rank, world).requires_grad_(True)
    zd = DTensor.from_local(zl, mesh, [Shard(2)], run_check=False)
    sd = DTensor.from_local(_shard(s, rank, world), mesh, [Shard(-1)], run_check=False)
    part = remit_ext.remit_loss(zd, y, scorer_logits=sd)
    part.backward()
    _close(part, full, "dtensor loss")
    b = _bounds(z.shape[-1], world)
    _close(zl.grad, zf.grad[..., b[rank]:b[rank + 1]], "dtensor grad")
    rep = DTensor.from_local(z, mesh, [Replicate()], run_check=False)
    _raises(lambda: remit_ext.weighted_cross_entropy(rep, y), ValueError, "logits", "Shard(-1)")


@case(CASES_2)
def compile_tp(rank, world, groups):
    """torch.compile runs the distributed entry points eagerly (a graph break each)."""
    z, s, y = _inputs()
    g = groups["world"]

    def step(q):
        return (remit_ext.weighted_cross_entropy(q, y, tp_group=g)
                + remit_ext.remit_loss(q, y, scorer_logits=_shard(s, rank, world), tp_group=g))

    compiled = torch.compile(step, backend="aot_eager")
    ze, zc = _shard(z, rank, world).requires_grad_(True), _shard(z, rank, world).requires_grad_(True)
    step(ze).backward()
    compiled(zc).backward()
    _close(zc.grad, ze.grad, "compiled grad")


@case(CASES_2)
def bad_inputs_tp(rank, world, groups):
    z, s, y = _inputs()
    zl = _shard(z, rank, world)
    g = groups["world"]
    # Targets beyond the global vocab (every rank sees the same table, so every rank raises).
    bad = y.clone()
    bad[1, 2] = z.shape[-1]
    _raises(lambda: remit_ext.weighted_cross_entropy(zl, bad, tp_group=g), ValueError,
            "targets", "[0, 11)")
    _raises(lambda: remit_ext.policy_gradient_loss(zl, bad, torch.ones(y.shape, dtype=F64),
                                                   tp_group=g), ValueError, "actions")
    # A target valid for the shard but not for the whole vocab is fine; one valid globally
    # but beyond the local shard is what tp_group is for: checked in the other cases.
    # Ranks that disagree on the positions.
    zs, ys = (zl, y) if rank == 0 else (zl[:, :4], y[:, :4])
    _raises(lambda: remit_ext.token_stats(zs, ys, tp_group=g), ValueError, "logits",
            "number of positions")
    # Scorer shards that do not match the policy's.
    s_bad = s[..., :5] if rank == 0 else s[..., 5:]
    if s_bad.shape == zl.shape:
        s_bad = s[..., :zl.shape[-1] - 1]
    _raises(lambda: remit_ext.remit_loss(zl, y, scorer_logits=s_bad, tp_group=g), ValueError,
            "scorer_logits")
    _raises(lambda: remit_ext.token_stats(zl, y, tp_group="world"), TypeError, "tp_group")
    _raises(lambda: remit_ext.token_stats(zl, y, tp_group=g, topk=4), ValueError, "topk")
    _raises(lambda: remit_ext.remit_loss(zl, y, scorer_logits=_shard(s, rank, world),
                                         tp_group=g, detach_weights=False),
            ValueError, "detach_weights")
    _raises(lambda: remit_ext.weighted_cross_entropy(zl, y[:, :3], tp_group=g), ValueError,
            "targets")


# ------------------------------------------------------------ context / data parallel


def _cp_split(x, rank, world, dim=1):
    """This rank's slice of the time dim (contiguous, uneven allowed)."""
    b = _bounds(x.shape[dim], world)
    return x.narrow(dim, b[rank], b[rank + 1] - b[rank])


@case(CASES_2)
def remit_cp_rows(rank, world, groups):
    z, s, y = _inputs(b=3, t=7)
    y[2] = -100  # a row with no valid position
    y[1, :4] = -100  # a row valid on one rank's slice only
    zf = z.clone().requires_grad_(True)
    full = remit_ext.remit_loss(zf, y, scorer_logits=s, reduction="none", return_details=True)
    full.loss.sum().backward()
    zl = _cp_split(z, rank, world).clone().requires_grad_(True)
    yl = _cp_split(y, rank, world)
    part = remit_ext.remit_loss(zl, yl, scorer_logits=_cp_split(s, rank, world),
                                reduction="none", return_details=True, cp_group=groups["world"])
    part.loss.sum().backward()
    _close(part.loss, _cp_split(full.loss, rank, world), "cp per-token loss")
    _close(part.weights, _cp_split(full.weights, rank, world), "cp weights")
    _close(zl.grad, _cp_split(zf.grad, rank, world), "cp grad")
    for k, v in full.diagnostics._asdict().items():
        _close(getattr(part.diagnostics, k), v, k)
    # remit_weights with cp_group, from log-probs.
    a, b = remit_ext.token_stats(z, y).logprob, remit_ext.token_stats(s, y).logprob
    fw = remit_ext.remit_weights(a, b, y)
    pw = remit_ext.remit_weights(_cp_split(a, rank, world), _cp_split(b, rank, world), yl,
                                 cp_group=groups["world"])
    _close(pw.weights, _cp_split(fw.weights, rank, world), "remit_weights cp")
    _close(pw.delta_hat, _cp_split(fw.delta_hat, rank, world), "delta_hat cp")
    # Non-finite scorer log-probs at ignored positions change nothing (not a NaN sequence mean).
    b_bad = torch.where(y == -100, torch.tensor(float("nan")), b)
    b_bad[1, 0] = float("inf")
    pw = remit_ext.remit_weights(_cp_split(a, rank, world), _cp_split(b_bad, rank, world), yl,
                                 cp_group=groups["world"])
    _close(pw.weights, _cp_split(fw.weights, rank, world), "remit_weights cp, NaN at ignored")
    for k, v in fw.diagnostics._asdict().items():
        _close(getattr(pw.diagnostics, k), v, k)


@case(CASES_2)
def remit_cp_cu_seqlens(rank, world, groups):
    # Two packed documents [0, 6) and [6, 10) of one stream; each rank holds half of each.
    z, s, y = _inputs(b=1, t=10)
    z, s, y = z[0], s[0], y[0]
    halves = [list(range(0, 3)) + list(range(6, 8)), list(range(3, 6)) + list(range(8, 10))]
    idx = torch.tensor(halves[rank])
    cu_full = torch.tensor([0, 6, 10])
    cu_local = torch.tensor([0, 3, 5])
    zf = z.clone().requires_grad_(True)
    full = remit_ext.remit_loss(zf, y, scorer_logits=s, cu_seqlens=cu_full, reduction="none",
                                return_details=True)
    full.loss.sum().backward()
    zl = z[idx].clone().requires_grad_(True)
    part = remit_ext.remit_loss(zl, y[idx], scorer_logits=s[idx], cu_seqlens=cu_local,
                                reduction="none", return_details=True, cp_group=groups["world"])
    part.loss.sum().backward()
    _close(part.weights, full.weights[idx], "cp docs weights")
    _close(zl.grad, zf.grad[idx], "cp docs grad")
    for k, v in full.diagnostics._asdict().items():
        _close(getattr(part.diagnostics, k), v, k)
    # Mean over the global batch: the local sums over the count of all ranks.
    n = parallel.global_num_items(y[idx], groups["world"])
    assert int(n) == int((y != -100).sum())
    m = remit_ext.remit_loss(z[idx], y[idx], scorer_logits=s[idx], cu_seqlens=cu_local,
                             num_items_in_batch=n, cp_group=groups["world"]).reshape(1)
    dist.all_reduce(m, group=groups["world"])
    _close(m[0], remit_ext.remit_loss(z, y, scorer_logits=s, cu_seqlens=cu_full), "cp mean")
    # Ranks that disagree on the number of documents.
    cu_bad = cu_local if rank == 0 else torch.tensor([0, 5])
    _raises(lambda: remit_ext.remit_loss(z[idx], y[idx], scorer_logits=s[idx],
                                         cu_seqlens=cu_bad, cp_group=groups["world"]),
            ValueError, "targets", "number of sequences", "cp_group")


@case(CASES_2)
def dp_diagnostics_and_count(rank, world, groups):
    z, s, y = _inputs(b=4, t=5)
    y[3, 1:] = -100  # rank 1 holds fewer valid tokens
    rows = slice(rank * 2, rank * 2 + 2)
    full = remit_ext.remit_loss(z, y, scorer_logits=s, return_details=True)
    for backend in ("cpu", "torch"):
        part = remit_ext.remit_loss(z[rows], y[rows], scorer_logits=s[rows], return_details=True,
                                    dp_group=groups["world"], backend=backend)
        for k, v in full.diagnostics._asdict().items():
            _close(getattr(part.diagnostics, k), v, f"dp {k}", atol=1e-6, rtol=1e-6)
        _close(part.weights, full.weights[rows], "dp weights (per row: centring is local)")
    a = remit_ext.token_stats(z[rows], y[rows]).logprob
    b = remit_ext.token_stats(s[rows], y[rows]).logprob
    rw = remit_ext.remit_weights(a, b, y[rows], dp_group=groups["world"])
    _close(rw.diagnostics.w_std, full.diagnostics.w_std, "remit_weights dp w_std")
    # The global count, and per_rank for averaging engines: DDP-averaged grads == one batch.
    n = parallel.global_num_items(y[rows], groups["world"])
    assert n.dim() == 0 and int(n) == int((y != -100).sum())
    per_rank = parallel.global_num_items(y[rows], groups["world"], per_rank=True)
    zl = z[rows].clone().requires_grad_(True)
    remit_ext.weighted_cross_entropy(zl, y[rows], num_items_in_batch=per_rank).backward()
    zf = z.clone().requires_grad_(True)
    remit_ext.weighted_cross_entropy(zf, y).backward()
    grad = zl.grad.clone()
    parts = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(parts, grad)
    # Each rank's loss is sum_r / (N / W): its rows' grads are W times the one-batch grads,
    # which DDP's average over W ranks (of a shared parameter) divides out.
    _close(torch.cat(parts) / world, zf.grad, "per_rank count")
    _raises(lambda: parallel.global_num_items(y, "g"), TypeError, "group")


# ------------------------------------------------------------------ 4 ranks: tp x cp


@case(CASES_4)
def remit_tp_cp_4(rank, world, groups):
    """A 2 x 2 mesh: tp over the vocab, cp over the time dim, one remit_loss call."""
    tp_rank, cp_rank = rank % 2, rank // 2
    z, s, y = _inputs(b=2, t=6, v=9)
    zf = z.clone().requires_grad_(True)
    full = remit_ext.remit_loss(zf, y, scorer_logits=s, reduction="none", return_details=True)
    full.loss.sum().backward()

    def local(x):
        return _shard(_cp_split(x, cp_rank, 2), tp_rank, 2)

    zl = local(z).clone().requires_grad_(True)
    yl = _cp_split(y, cp_rank, 2)
    part = remit_ext.remit_loss(zl, yl, scorer_logits=local(s), reduction="none",
                                return_details=True, tp_group=groups["tp"],
                                cp_group=groups["cp"])
    part.loss.sum().backward()
    _close(part.loss, _cp_split(full.loss, cp_rank, 2), "tp x cp loss")
    _close(zl.grad, local(zf.grad), "tp x cp grad")
    for k, v in full.diagnostics._asdict().items():
        _close(getattr(part.diagnostics, k), v, k)


@case(CASES_4)
def token_stats_tp_4(rank, world, groups):
    z, _, y = _inputs(v=10)  # shards 3, 3, 3, 1
    res = _grad_pair(lambda q: remit_ext.token_stats(q, y, entropy=True).entropy,
                     lambda q: remit_ext.token_stats(q, y, entropy=True,
                                                     tp_group=groups["world"]).entropy,
                     z, rank, world)
    _check_grad(*res, rank, world, "entropy 4-way")
    outsider = groups["tp"]  # a group this rank belongs to: fine; now one it does not
    other = groups["other_tp"]
    _raises(lambda: remit_ext.token_stats(_shard(z, rank, world), y, tp_group=other), ValueError,
            "tp_group", "not a member")
    assert outsider is not None


# -------------------------------------------------------------------------- the harness


def _groups(rank, world):
    """This file's per-process context: the world group and, on 4 ranks, tp and cp pairs."""
    groups = {"world": dist.group.WORLD}
    if world == 4:
        # tp pairs {0, 1}, {2, 3}; cp pairs {0, 2}, {1, 3}. Every rank creates every group.
        tps = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        cps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        groups["tp"], groups["other_tp"] = tps[rank // 2], tps[1 - rank // 2]
        groups["cp"] = cps[rank % 2]
    return groups


def _worker(rank, world, init, out_dir, registry, setup):
    os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    # A bounded timeout: a rank failing before a collective must not leave its peers waiting
    # for gloo's 30-minute default.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    context = setup(rank, world)
    results = {}
    for name in registry:
        try:
            registry[name](rank, world, context)
            results[name] = None
        except Exception:  # noqa: BLE001  (reported per case by the tests)
            results[name] = traceback.format_exc()
        dist.barrier()  # a failing case must not leave a peer waiting in a collective
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, registry, tmp_path_factory, setup=_groups):
    """Every case of ``registry`` (name -> module-level function, pickled by reference: other
    test files run theirs through this harness too) on ``world`` gloo processes; each case is
    called as ``case(rank, world, setup(rank, world))``."""
    out = tmp_path_factory.mktemp(f"parallel{world}")
    init = f"file://{out}/rendezvous"
    mp.spawn(_worker, args=(world, init, str(out), registry, setup), nprocs=world, join=True)
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


def test_without_process_group():
    z, _, y = _inputs()
    with pytest.raises(ValueError, match="tp_group: torch.distributed is not initialised"):
        remit_ext.token_stats(z, y, tp_group=object())
    with pytest.raises(ValueError, match="cp_group"):
        remit_ext.remit_weights(torch.zeros(y.shape), torch.zeros(y.shape), y, cp_group=object())
