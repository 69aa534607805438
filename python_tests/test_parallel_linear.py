"""Vocab-parallel fused-linear ops (``tp_group=`` on ``remit_linear_loss`` and
``linear_token_stats``, and the TorchTitan layout: a DTensor head ``Shard(0)`` with a Replicate
hidden) against the single-process unsharded call: loss / statistics, grad hidden, this
rank's grad weight and grad bias rows, in fp64 (bf16 at a loose tolerance), and the refusals.

One job of 2 gloo processes and one of 4 run every case once (test_parallel's harness); each
rank rebuilds the full inputs from a seed and holds its contiguous, uneven row shard of the
heads (torch.chunk's split)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import remit_ext
from test_parallel import _assert_case, _bounds, _close, _raises, _replicated, _run, case

F64 = torch.float64
CASES_2: dict = {}
CASES_4: dict = {}


# ------------------------------------------------------------------------------- helpers


def _inputs(b=2, t=5, d=6, ds=4, v=11, dtype=F64, seed=0):
    """hidden [b, t, d], head [v, d] + bias, scorer hidden [b, t, ds] + head [v, ds] + bias,
    targets with an ignored position, id 0 and the last id."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    x = dict(h=rnd(b, t, d), w=rnd(v, d, scale=0.8), bias=rnd(v, scale=0.5), sh=rnd(b, t, ds),
             sw=rnd(v, ds, scale=0.8), sbias=rnd(v, scale=0.5))
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 1] = -100
    y[-1, 0] = v - 1
    y[0, 0] = 0
    x["y"] = y
    return x


def _rows(x, rank, world):
    """This rank's rows of a head weight [V, D] or bias [V]."""
    bd = _bounds(x.shape[0], world)
    return x[bd[rank]:bd[rank + 1]]


def _leaves(x, rank=None, world=None):
    """Fresh leaves (hidden, weight, bias) requiring grad: full, or this rank's rows."""
    cut = (lambda t: t) if rank is None else (lambda t: _rows(t, rank, world))
    return [t.detach().clone().requires_grad_(True)
            for t in (x["h"], cut(x["w"]), cut(x["bias"]))]


def _scorer(x, rank=None, world=None, bias=True):
    cut = (lambda t: t) if rank is None else (lambda t: _rows(t, rank, world))
    return dict(scorer_hidden=x["sh"], scorer_weight=cut(x["sw"]),
                scorer_bias=cut(x["sbias"]) if bias else None)


def _compare(fn, x, rank, world, group, name, atol=1e-10, rtol=1e-9, with_bias=True):
    """fn(hidden, weight, bias, tp_group) -> tensor; value, grad hidden, grad weight rows and
    grad bias rows of the sharded call against the unsharded one, for a random cotangent."""
    hf, wf, bf = _leaves(x)
    hl, wl, bl = _leaves(x, rank, world)
    full = fn(hf, wf, bf if with_bias else None, None)
    part = fn(hl, wl, bl if with_bias else None, group)
    cot = torch.randn(full.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    (full.double() * cot).sum().backward()
    (part.double() * cot).sum().backward()
    kw = dict(atol=atol, rtol=rtol)
    _close(part.detach().double(), full.detach().double(), f"{name} value", **kw)
    _close(hl.grad.double(), hf.grad.double(), f"{name} grad hidden", **kw)
    _close(wl.grad.double(), _rows(wf.grad, rank, world).double(), f"{name} grad weight", **kw)
    if with_bias:
        _close(bl.grad.double(), _rows(bf.grad, rank, world).double(), f"{name} grad bias", **kw)
    else:
        assert bl.grad is None
    _replicated(part.detach(), group)
    _replicated(hl.grad, group)


# ----------------------------------------------------------------- linear_token_stats


def _stats_cases(rank, world, group):
    x = _inputs()
    for backend in ("cpu", "torch"):
        for temp, ent, chunk in ((1.0, True, 3), (0.7, True, None), (1.0, False, 4)):
            def stats(h, w, b, g, field):
                st = remit_ext.linear_token_stats(h, w, x["y"], bias=b, entropy=ent,
                                                  temperature=temp, chunk_size=chunk,
                                                  backend=backend, tp_group=g)
                return getattr(st, field)

            for field in ("logprob", "lse") + (("entropy",) if ent else ()):
                _compare(lambda h, w, b, g: stats(h, w, b, g, field), x, rank, world, group,
                         f"stats {backend} T={temp} chunk={chunk} {field}")

            # All three outputs differentiated at once (the general backward).
            def all_three(h, w, b, g):
                st = remit_ext.linear_token_stats(h, w, x["y"], bias=b, entropy=ent,
                                                  temperature=temp, chunk_size=chunk,
                                                  backend=backend, tp_group=g)
                return torch.stack([st.logprob, st.lse] + ([st.entropy] if ent else []))

            _compare(all_three, x, rank, world, group, f"stats {backend} T={temp} all",
                     with_bias=temp == 1.0)


@case(CASES_2)
def linear_token_stats_tp(rank, world, groups):
    _stats_cases(rank, world, groups["world"])


@case(CASES_4)
def linear_token_stats_tp4(rank, world, groups):
    _stats_cases(rank, world, groups["world"])


# -------------------------------------------------------------------- remit_linear_loss


def _loss_cases(rank, world, group, backends=("cpu", "torch")):
    x = _inputs()
    y = x["y"]
    b_full = remit_ext.linear_token_stats(x["sh"], x["sw"], y, bias=x["sbias"]).logprob
    cu = torch.tensor([0, 3, 7, 10])
    for backend in backends:
        for method, src in (("ntp", None), ("remit", "live"), ("remit", "logprobs"),
                            ("rho1", "live"), ("rho1", "logprobs"), ("kd", "live")):
            for reduction in ("mean", "sum", "none"):
                extra = [{}]
                if method == "remit":
                    extra = [{}, {"cu_seqlens": cu}]
                if method == "kd":
                    extra = [{}, {"temperature": 0.7}]
                if reduction == "mean":
                    extra.append({"num_items_in_batch": torch.tensor(13.0)})
                for kw in extra:
                    def loss(h, w, b, g):
                        sc = {}
                        if src == "live":
                            sc = _scorer(x, *((rank, world) if g is not None else ()))
                        elif src == "logprobs":
                            sc = {"scorer_logprobs": b_full}
                        return remit_ext.remit_linear_loss(
                            h, w, y, bias=b, method=method, reduction=reduction,
                            chunk_size=4, eps=0.1, backend=backend, tp_group=g, **sc, **kw)

                    _compare(loss, x, rank, world, group,
                             f"loss {backend} {method} {src} {reduction} {kw}")
        # Weights and diagnostics (return_details) are the unsharded ones.
        for method in ("remit", "rho1"):
            full = remit_ext.remit_linear_loss(x["h"], x["w"], y, bias=x["bias"], method=method,
                                               return_details=True, backend=backend,
                                               **_scorer(x))
            part = remit_ext.remit_linear_loss(x["h"], _rows(x["w"], rank, world), y,
                                               bias=_rows(x["bias"], rank, world),
                                               method=method, return_details=True,
                                               backend=backend, tp_group=group,
                                               **_scorer(x, rank, world))
            _close(part.weights, full.weights, f"{method} weights")
            if method == "remit":
                for f, got, want in zip(full.diagnostics._fields, part.diagnostics,
                                        full.diagnostics):
                    _close(got, want, f"diagnostics {f}")
            else:
                assert part.diagnostics is None


@case(CASES_2)
def remit_linear_loss_tp(rank, world, groups):
    _loss_cases(rank, world, groups["world"])


@case(CASES_2)
def kd_tp_nan_hidden_at_ignored_position(rank, world, groups):
    # A NaN hidden state at a padded position reaches no gradient (KD's chunk gradient selects
    # the valid rows, on every backend), sharded as unsharded.
    x = _inputs()
    x["h"][0, 1] = float("nan")  # y[0, 1] is ignored
    for backend in ("cpu", "torch"):
        h, w, b = _leaves(x, rank, world)
        loss = remit_ext.remit_linear_loss(h, w, x["y"], bias=b, method="kd", backend=backend,
                                           tp_group=groups["world"],
                                           **_scorer(x, rank, world))
        loss.backward()
        assert bool(torch.isfinite(loss)), f"kd tp {backend}: loss {loss}"
        for name, g in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
            assert bool(torch.isfinite(g).all()), f"kd tp {backend}: NaN in grad {name}"


@case(CASES_4)
def remit_linear_loss_tp4(rank, world, groups):
    _loss_cases(rank, world, groups["world"], backends=("cpu",))


@case(CASES_4)
def remit_linear_loss_tp_pairs(rank, world, groups):
    """Two tp groups of 2 ranks side by side (tp x dp): each pair its own shards."""
    x = _inputs(seed=1)
    sub = groups["tp"]
    r, w = dist.get_rank(sub), dist.get_world_size(sub)
    for method in ("ntp", "kd"):
        _compare(lambda h, wt, b, g: remit_ext.remit_linear_loss(
            h, wt, x["y"], bias=b, method=method, chunk_size=3, tp_group=g,
            **({} if method == "ntp" else _scorer(x, *((r, w) if g is not None else ())))),
            x, r, w, sub, f"pairs {method}")


@case(CASES_2)
def triton_tp(rank, world, groups):
    """The Triton backend's kernels (the interpreter on CPU) on the shards; no KD kernel."""
    if ("triton" not in remit_ext.available_backends()
            or os.environ.get("TRITON_INTERPRET") != "1"):  # CPU tensors: the interpreter only
        return
    g = groups["world"]
    x = _inputs()
    for ent, temp in ((True, 0.7), (False, 1.0)):
        for field in ("logprob", "lse") + (("entropy",) if ent else ()):
            _compare(lambda h, w, b, grp: getattr(remit_ext.linear_token_stats(
                h, w, x["y"], bias=b, entropy=ent, temperature=temp, chunk_size=3,
                backend="triton", tp_group=grp), field), x, rank, world, g,
                f"triton stats T={temp} {field}")
    for method in ("ntp", "remit", "rho1"):
        def loss(h, w, b, grp):
            sc = {} if method == "ntp" else _scorer(x, *(() if grp is None else (rank, world)))
            return remit_ext.remit_linear_loss(h, w, x["y"], bias=b, method=method,
                                               chunk_size=4, backend="triton", tp_group=grp,
                                               **sc)

        _compare(loss, x, rank, world, g, f"triton {method}")


@case(CASES_2)
def bf16_tp(rank, world, groups):
    g = groups["world"]
    x = _inputs(dtype=torch.bfloat16, v=37, d=16, ds=8, t=9)
    tol = dict(atol=3e-2, rtol=3e-2)
    for method in ("ntp", "remit", "kd"):
        def loss(h, w, b, grp):
            sc = {} if method == "ntp" else _scorer(x, *(() if grp is None else (rank, world)))
            return remit_ext.remit_linear_loss(h, w, x["y"], bias=b, method=method,
                                               chunk_size=5, tp_group=grp, **sc)

        _compare(loss, x, rank, world, g, f"bf16 {method}", **tol)
    _compare(lambda h, w, b, grp: remit_ext.linear_token_stats(
        h, w, x["y"], bias=b, entropy=True, chunk_size=5, tp_group=grp).entropy,
        x, rank, world, g, "bf16 entropy", **tol)
    _compare(lambda h, w, b, grp: remit_ext.remit_linear_loss(
        h, w, x["y"], bias=b, method="ntp", chunk_size=5, grad_weight_fp32=False,
        tp_group=grp), x, rank, world, g, "bf16 grad_weight_fp32=False", **tol)
    # fp32 chunk logits: sharded as unsharded, to fp32 rounding of the logits (the gradients
    # still come back in bf16).
    for method in ("remit", "kd"):
        def loss32(h, w, b, grp):
            sc = _scorer(x, *(() if grp is None else (rank, world)))
            return remit_ext.remit_linear_loss(h, w, x["y"], bias=b, method=method,
                                               chunk_size=5, tp_group=grp,
                                               chunk_dtype=torch.float32, **sc)

        _compare(loss32, x, rank, world, g, f"bf16, fp32 chunk logits {method}", **tol)


# --------------------------------------------------------------------------- DTensor


@case(CASES_2)
def dtensor_colwise_tp(rank, world, groups):
    """TorchTitan's ColwiseParallel output layer: the head a DTensor Shard(0) (uneven rows),
    hidden a Replicate DTensor, or Shard(1) (sequence parallel: redistributed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x = _inputs()
    y = x["y"]
    for method in ("remit", "kd", "stats"):
        for h_place in (Replicate(), Shard(1)):
            hf, wf, bf = _leaves(x)
            if method == "stats":
                full = remit_ext.linear_token_stats(hf, wf, y, bias=bf, entropy=True).entropy
            else:
                full = remit_ext.remit_linear_loss(hf, wf, y, bias=bf, method=method,
                                                   chunk_size=4, **_scorer(x))
            full.sum().backward()
            hd = distribute_tensor(x["h"], mesh, [h_place]).requires_grad_(True)
            wd = distribute_tensor(x["w"], mesh, [Shard(0)]).requires_grad_(True)
            bd = distribute_tensor(x["bias"], mesh, [Shard(0)]).requires_grad_(True)
            if method == "stats":
                part = remit_ext.linear_token_stats(hd, wd, y, bias=bd, entropy=True).entropy
            else:
                sw = distribute_tensor(x["sw"], mesh, [Shard(0)])
                sb = distribute_tensor(x["sbias"], mesh, [Shard(0)])
                # The frozen scorer's hidden: plain, or (KD) a Replicate DTensor.
                shd = (distribute_tensor(x["sh"], mesh, [Replicate()]) if method == "kd"
                       else x["sh"])
                part = remit_ext.remit_linear_loss(hd, wd, y, bias=bd, method=method,
                                                   chunk_size=4, scorer_hidden=shd,
                                                   scorer_weight=sw, scorer_bias=sb)
            assert not isinstance(part, DTensor), "a plain, replicated result"
            part.sum().backward()
            name = f"dtensor {method} {h_place}"
            _close(part.detach(), full.detach(), f"{name} value")
            assert isinstance(wd.grad, DTensor) and wd.grad.placements == (Shard(0),)
            _close(wd.grad.to_local(), _rows(wf.grad, rank, world), f"{name} grad weight")
            _close(bd.grad.to_local(), _rows(bf.grad, rank, world), f"{name} grad bias")
            _close(hd.grad.full_tensor(), hf.grad, f"{name} grad hidden")
    # The layouts it refuses.
    hd = distribute_tensor(x["h"], mesh, [Replicate()])
    wr = distribute_tensor(x["w"], mesh, [Replicate()])
    _raises(lambda: remit_ext.remit_linear_loss(hd, wr, y, method="ntp"), ValueError,
            "lm_head_weight", "Shard(0)")
    _raises(lambda: remit_ext.linear_token_stats(hd, x["w"], y), ValueError, "weight",
            "DTensor hidden")
    # Local rows that do not make up the DTensor's global shape.
    wl = _rows(x["w"], rank, world)
    bad = DTensor.from_local(wl, mesh, [Shard(0)], run_check=False,
                             shape=(x["w"].shape[0] + 1, x["w"].shape[1]), stride=(6, 1))
    _raises(lambda: remit_ext.remit_linear_loss(hd, bad, y, method="ntp"), ValueError,
            "lm_head_weight", "sum to the global size 12")


@case(CASES_2)
def collectives_per_call(rank, world, groups):
    """A constant number of collectives per call, whatever the number of chunks: forward the
    handshake and one gather, backward one all_reduce of grad hidden."""
    import unittest.mock

    g = groups["world"]
    x = _inputs()
    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for method in ("ntp", "remit", "kd", "stats"):
        for chunk in (1, 4, None):
            h, w, b = _leaves(x, rank, world)
            with unittest.mock.patch.object(dist, "all_gather",
                                            counted("all_gather", dist.all_gather)), \
                    unittest.mock.patch.object(dist, "all_reduce",
                                               counted("all_reduce", dist.all_reduce)):
                calls.clear()
                if method == "stats":
                    out = remit_ext.linear_token_stats(h, w, x["y"], bias=b, entropy=True,
                                                       chunk_size=chunk, tp_group=g).entropy
                else:
                    out = remit_ext.remit_linear_loss(
                        h, w, x["y"], bias=b, method=method, chunk_size=chunk, tp_group=g,
                        **({} if method == "ntp" else _scorer(x, rank, world)))
                fwd = list(calls)
                out.sum().backward()
                bwd = calls[len(fwd):]
            assert fwd == ["all_gather", "all_gather"], (method, chunk, fwd)
            assert bwd == ["all_reduce"], (method, chunk, bwd)


@case(CASES_2)
def compile_tp(rank, world, groups):
    """torch.compile runs the vocab-parallel path eagerly (a graph break) with the same result."""
    x = _inputs()
    g = groups["world"]

    def step(h, w, b):
        return remit_ext.remit_linear_loss(h, w, x["y"], bias=b, method="remit", chunk_size=4,
                                           tp_group=g, **_scorer(x, rank, world))

    compiled = torch.compile(step, backend="aot_eager")
    eager_in, compiled_in = _leaves(x, rank, world), _leaves(x, rank, world)
    step(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b_ in zip(compiled_in, eager_in):
        _close(a.grad, b_.grad, "compiled grad")


# -------------------------------------------------------------------------- refusals


@case(CASES_2)
def bad_inputs_linear_tp(rank, world, groups):
    g = groups["world"]
    x = _inputs()
    h, y = x["h"], x["y"]
    wl, bl = _rows(x["w"], rank, world), _rows(x["bias"], rank, world)
    bad = y.clone()
    bad[1, 2] = x["w"].shape[0]
    _raises(lambda: remit_ext.remit_linear_loss(h, wl, bad, method="ntp", tp_group=g),
            ValueError, "targets", "[0, 11)")
    _raises(lambda: remit_ext.linear_token_stats(h, wl, bad, tp_group=g), ValueError,
            "targets", "[0, 11)")
    # Ranks that disagree on the positions, or on the hidden size.
    hs, ys = (h, y) if rank == 0 else (h[:, :4], y[:, :4])
    _raises(lambda: remit_ext.linear_token_stats(hs, wl, ys, tp_group=g), ValueError,
            "hidden", "number of positions")
    hd, wd = (h, wl) if rank == 0 else (h[..., :5], wl[:, :5])
    _raises(lambda: remit_ext.remit_linear_loss(hd, wd, y, method="ntp", tp_group=g),
            ValueError, "hidden", "hidden size")
    # A scorer head not split like the policy's; a bias not of this rank's rows.
    sw_bad = x["sw"][:wl.shape[0] - 1]
    _raises(lambda: remit_ext.remit_linear_loss(h, wl, y, scorer_hidden=x["sh"],
                                                scorer_weight=sw_bad, tp_group=g),
            ValueError, "scorer_weight")
    _raises(lambda: remit_ext.remit_linear_loss(h, wl, y, bias=x["bias"], method="ntp",
                                                tp_group=g), ValueError, "bias")
    # One rank alone refusing its inputs: the other raises too instead of waiting for it.
    for fn in (lambda b: remit_ext.remit_linear_loss(h, wl, y, bias=b, method="ntp",
                                                      tp_group=g),
               lambda b: remit_ext.linear_token_stats(h, wl, y, bias=b, tp_group=g)):
        if rank == 1:
            _raises(lambda: fn(x["bias"]), ValueError, "bias")
        else:
            _raises(lambda: fn(bl), ValueError, "tp_group", "rank(s) [1]", "refused")
    s_one = x["sw"][:wl.shape[0] - 1] if rank == 0 else _rows(x["sw"], rank, world)
    if rank == 0:
        _raises(lambda: remit_ext.remit_linear_loss(h, wl, y, scorer_hidden=x["sh"],
                                                    scorer_weight=s_one, tp_group=g),
                ValueError, "scorer_weight")
    else:
        _raises(lambda: remit_ext.remit_linear_loss(h, wl, y, scorer_hidden=x["sh"],
                                                    scorer_weight=s_one, tp_group=g),
                ValueError, "tp_group", "rank(s) [0]")
    _raises(lambda: remit_ext.linear_token_stats(h, wl, y, tp_group="world"), TypeError,
            "tp_group")
    _raises(lambda: remit_ext.remit_linear_loss(h, wl, y, method="ntp", reduction="sum",
                                                num_items_in_batch=4, tp_group=g),
            ValueError, "num_items_in_batch")
    # Not a silent no-op: a tp result with bl is still the sharded one.
    assert remit_ext.remit_linear_loss(h, wl, y, bias=bl, method="ntp", tp_group=g).dim() == 0


@case(CASES_4)
def bad_group_linear_tp4(rank, world, groups):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    x = _inputs()
    sub = groups["tp"]
    wl = _rows(x["w"], dist.get_rank(sub), 2)
    _raises(lambda: remit_ext.linear_token_stats(x["h"], wl, x["y"], tp_group=groups["other_tp"]),
            ValueError, "tp_group", "not a member")
    mesh = init_device_mesh("cpu", (world,))
    wd = distribute_tensor(x["w"], mesh, [Shard(0)])
    _raises(lambda: remit_ext.linear_token_stats(x["h"], wd, x["y"], tp_group=sub), ValueError,
            "weight", "not tp_group")


@case(CASES_2)
def module_and_independent_reference_tp(rank, world, groups):
    """LinearReMiTLoss(tp_group=...) passes the group through, and the vocab-parallel call
    matches an independent fp64 reference (full logits, F.cross_entropy / log_softmax, autograd),
    not remit_ext's own unsharded path: loss, grad hidden (full, on every rank), this rank's
    rows of grad W and grad b; ReMiT against remit_ext.reference on the full logits."""
    from torch.nn import functional as F

    from remit_ext import reference as ref

    group = groups["world"]
    x = _inputs()
    y = x["y"]
    for method in ("ntp", "remit"):
        hf, wf, bf = _leaves(x)
        hl, wl, bl = _leaves(x, rank, world)
        kw_s = {} if method == "ntp" else _scorer(x, rank, world)
        mod = remit_ext.LinearReMiTLoss(method=method, chunk_size=3, backend="cpu",
                                        tp_group=group)
        got = mod(hl, wl, y, bias=bl, **kw_s)
        z = hf @ wf.T + bf
        if method == "ntp":
            want = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
        else:
            sz = (x["sh"] @ x["sw"].T + x["sbias"]).detach()
            want = ref.remit_loss_ref(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                                      scorer_logits=sz.reshape(-1, sz.shape[-1]),
                                      cu_seqlens=torch.tensor([0, 5, 10]))[0]
        got.backward()
        want.backward()
        _close(got.detach(), want.detach(), f"module {method} loss")
        _close(hl.grad, hf.grad, f"module {method} grad hidden")
        _close(wl.grad, _rows(wf.grad, rank, world), f"module {method} grad weight")
        _close(bl.grad, _rows(bf.grad, rank, world), f"module {method} grad bias")
    assert "tp_group" in repr(mod)


# -------------------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _run(2, CASES_2, tmp_path_factory)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _run(4, CASES_4, tmp_path_factory)


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks(results2, name):
    _assert_case(results2, name)


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks(results4, name):
    _assert_case(results4, name)


def test_without_process_group():
    x = _inputs()
    with pytest.raises(ValueError, match="tp_group: torch.distributed is not initialised"):
        remit_ext.remit_linear_loss(x["h"], x["w"], x["y"], method="ntp", tp_group=object())
    with pytest.raises(ValueError, match="tp_group: torch.distributed is not initialised"):
        remit_ext.linear_token_stats(x["h"], x["w"], x["y"], tp_group=object())


def test_fsdp_layout_dispatch(tmp_path, monkeypatch):
    """A DTensor head (or bias alone) with plain hidden (FSDP2's layout, no tp_group) goes to
    remit_ext.distributed.fsdp with every argument but tp_group, as keywords; a DTensor
    scorer_hidden alone is a ValueError naming it rather than DTensor's mixed-tensor error."""
    import inspect
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from remit_ext import linear

    seen = {}
    stub = types.SimpleNamespace(remit_linear_loss=lambda **kw: seen.setdefault("loss", kw),
                                 linear_token_stats=lambda **kw: seen.setdefault("stats", kw))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        x = _inputs()
        wd = distribute_tensor(x["w"], init_device_mesh("cpu", (1,)), [Shard(0)])
        with monkeypatch.context() as m:
            m.setattr(linear, "_fsdp", stub)
            remit_ext.remit_linear_loss(x["h"], wd, x["y"], method="ntp", chunk_size=3)
            remit_ext.linear_token_stats(x["h"], wd, x["y"], entropy=True)
        for key, fn in (("loss", remit_ext.remit_linear_loss),
                        ("stats", remit_ext.linear_token_stats)):
            params = set(inspect.signature(fn).parameters) - {"tp_group"}
            assert set(seen[key]) == params, key
        assert seen["loss"]["lm_head_weight"] is wd and seen["loss"]["chunk_size"] == 3
        assert seen["stats"]["weight"] is wd and seen["stats"]["entropy"] is True

        # The bias alone a DTensor: the FSDP2 layout too.
        bd = distribute_tensor(x["bias"], wd.device_mesh, [Shard(0)])
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(linear, "_fsdp", stub)
            remit_ext.remit_linear_loss(x["h"], x["w"], x["y"], bias=bd, method="ntp")
            remit_ext.linear_token_stats(x["h"], x["w"], x["y"], bias=bd)
        assert seen["loss"]["bias"] is bd and seen["stats"]["bias"] is bd
        # A DTensor scorer_hidden with everything else plain: a ValueError naming it, not
        # DTensor's mixed-tensor RuntimeError from inside the op.
        from torch.distributed.tensor import Replicate

        shd = distribute_tensor(x["sh"], wd.device_mesh, [Replicate()])
        for method in ("remit", "kd"):
            with pytest.raises(ValueError, match="scorer_hidden: a DTensor"):
                remit_ext.remit_linear_loss(x["h"], x["w"], x["y"], method=method,
                                            scorer_hidden=shd, scorer_weight=x["sw"])
    finally:
        dist.destroy_process_group()
