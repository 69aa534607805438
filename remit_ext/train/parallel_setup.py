"""``midtrain --fsdp / --tp N / --cp N`` under ``torchrun``: a (dp, cp, tp) device mesh, the
model sharded or wrapped over it, and the mid-training losses with the library's process groups.

The mesh is ``init_device_mesh(device, (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))`` with
``dp = world / (cp * tp)``. Ranks that differ in dp hold different rows of each global batch;
ranks that differ in cp hold the same rows and different positions of them; ranks that differ
in tp hold the same tokens. Gradients are therefore averaged over the flattened ``dp x cp``
mesh (``data``), and the loss divides by the global valid-token count over ``dp * cp``
(``global_num_items(..., per_rank=True)``), so that the averaged gradient is the global batch
mean's.

- ``--fsdp``: FSDP2 ``fully_shard`` of every block, of the LM head (its own unit) and of the
  whole model over the ``data`` mesh, instead of DDP. The logits path runs the head's module
  forward (FSDP2 gathers it); the fused-linear path passes ``model.head.weight``, a DTensor
  ``Shard(0)`` (the head's forward is never run, so it stays sharded), to
  ``remit_linear_loss``, which goes through ``remit_ext.fsdp`` (gathered in forward and
  backward, gradient reduce-scattered with averaging over the same mesh).
- ``--tp N``: the LM head vocab-parallel (Megatron's ColumnParallel output layer, the simplest
  form): each tp rank holds its contiguous rows of the head (``torch.chunk`` split), computes
  its vocab shard of the logits and the losses take ``tp_group=``; the rest of the model is
  replicated over tp. The head's input goes through an identity whose backward all-reduces
  (sums) the gradient over tp (each rank's logits shard gives a partial d hidden); the fused
  path's ``remit_linear_loss(tp_group=)`` returns the full d hidden itself. The replicated
  parameters' gradients are then equal on every tp rank and are not reduced over tp; the
  gradient-norm clip adds the head shards' squared norms over tp.
- ``--cp N``: loss-level context parallelism, *not* ring attention: every cp rank runs the full
  forward over the whole sequence (attention needs every earlier position) and computes the
  loss only on its contiguous slice of positions (``seq_len / N`` each); ReMiT's per-sequence
  centring is reduced over cp (``remit_loss(cp_group=)``). It divides the loss kernels' work,
  not the model's, nor its activation memory.

``dp x cp`` ranks are DDP over the ``data`` group when not ``--fsdp``. ``--fsdp`` with
``--tp`` is refused, as are ``--cp`` with ``--fused-linear --method remit`` (the fused loss has
no ``cp_group``) and ``--cp`` with ``--method rho1`` (its top-k selection is per call). Rank 0
evaluates and saves a full, unsharded copy of the model (gathered from every rank); a
checkpoint of a ``--fsdp`` / ``--tp`` run holds that model without the (sharded) optimizer
state and is not resumable (start again with ``--overwrite``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

import remit_ext
from remit_ext.parallel import global_num_items, reduce_diagnostics

from . import data as D
from .loop import frozen_logprobs
from .model import TinyGPT
from .runtime import Dist, unwrap


def _is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tp group (the input of a
    vocab-parallel head: each rank's logits shard contributes a part of d hidden)."""

    @staticmethod
    def forward(ctx, h, group):
        ctx.group = group
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class VocabShardHead(nn.Module):
    """This tp rank's rows ``[V_r, D]`` of an LM head without bias; ``forward`` gives the
    vocab shard of the logits."""

    def __init__(self, rows: Tensor, group, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(rows.detach().clone())
        self.bias = None
        self.group, self.vocab = group, vocab

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(_CopyToTP.apply(h, self.group), self.weight)


def _split(v: int, n: int) -> list[int]:
    """Rows per rank of a torch.chunk split of ``v`` rows in ``n`` pieces."""
    c = -(-v // n)
    return [max(0, min(c, v - i * c)) for i in range(n)]


class ParallelDist(Dist):
    """The job's Dist seen through a (dp, cp, tp) mesh (module docstring)."""

    def __init__(self, base: Dist, fsdp: bool = False, tp: int = 1, cp: int = 1):
        from torch.distributed.device_mesh import init_device_mesh

        self.__dict__.update(base.__dict__)
        self.owns_group = False
        if self.world == 1:
            raise ValueError("--fsdp / --tp / --cp: launch with torchrun --nproc_per_node N "
                             "(N > 1)")
        if tp < 1 or cp < 1:
            raise ValueError(f"--tp / --cp: expected sizes >= 1, got {tp} / {cp}")
        if self.world % (tp * cp):
            raise ValueError(f"--tp {tp} --cp {cp}: the world size {self.world} must divide by "
                             f"tp * cp = {tp * cp}")
        if fsdp and tp > 1:
            raise ValueError("--fsdp with --tp: not supported (shard the head over tp or the "
                             "model over dp, not both)")
        self.fsdp, self.tp, self.cp = fsdp, tp, cp
        self.dp = self.world // (tp * cp)
        self.mesh = init_device_mesh(self.device.type, (self.dp, cp, tp),
                                     mesh_dim_names=("dp", "cp", "tp"))
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.cp_rank = self.mesh.get_local_rank("cp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        self.tp_group = self.mesh.get_group("tp") if tp > 1 else None
        self.cp_group = self.mesh.get_group("cp") if cp > 1 else None
        self.dp_group = self.mesh.get_group("dp") if self.dp > 1 else None
        self.data_mesh = self.mesh["dp", "cp"]._flatten("dp_cp")
        self.data_group = self.data_mesh.get_group()
        self.n_data = self.dp * cp

    @property
    def sharded(self) -> bool:
        return self.fsdp or self.tp > 1

    # ------------------------------------------------------------------ data

    def shard(self, x: Tensor) -> Tensor:
        """This dp rank's rows of a global batch (the same on every cp and tp rank)."""
        if x.shape[0] % self.dp:
            raise ValueError(f"batch: expected a size divisible by the data-parallel size "
                             f"{self.dp}, got {x.shape[0]}")
        return x[self.dp_rank::self.dp]

    def cols(self, t: int) -> slice:
        """This cp rank's contiguous slice of ``t`` positions."""
        if t % self.cp:
            raise ValueError(f"--cp {self.cp}: seq_len {t} must divide by the context-parallel "
                             f"size")
        n = t // self.cp
        return slice(self.cp_rank * n, (self.cp_rank + 1) * n)

    # ------------------------------------------------------------------ model

    def wrap(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        """Shard or wrap ``model`` in place (module docstring); the optimizer's parameter
        groups are pointed at the new parameters."""
        names = {id(p): n for n, p in model.named_parameters()}
        if self.tp > 1:
            w = model.head.weight
            if model.head.bias is not None:
                raise ValueError("--tp: expected an LM head without bias")
            sizes = _split(w.shape[0], self.tp)
            start = sum(sizes[:self.tp_rank])
            model.head = VocabShardHead(w[start:start + sizes[self.tp_rank]], self.tp_group,
                                        w.shape[0])
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block, mesh=self.data_mesh)
            fully_shard(model.head, mesh=self.data_mesh)
            fully_shard(model, mesh=self.data_mesh)
            wrapped = model
        elif self.n_data > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                          process_group=self.data_group)
        else:
            wrapped = model
        if optimizer is not None:
            if optimizer.state:
                raise ValueError("--fsdp / --tp / --cp: expected a fresh optimizer (resuming "
                                 "a sharded run is not supported)")
            after = dict(model.named_parameters())
            for g in optimizer.param_groups:
                g["params"] = [after[names[id(p)]] for p in g["params"]]
        return wrapped

    @torch.no_grad()
    def full_state(self, model: nn.Module) -> Optional[dict]:
        """The unsharded model's state dict (CPU tensors) on rank 0, None elsewhere; every rank
        must call (gathers)."""
        model = unwrap(model)
        out = {}
        for k, v in model.state_dict().items():
            if _is_dtensor(v):
                v = v.full_tensor()
            if k == "head.weight" and self.tp > 1:
                v = self._gather_rows(v, model.head.vocab)
            out[k] = v.detach().cpu().clone()
        return out if self.is_main else None

    def _gather_rows(self, w: Tensor, vocab: int) -> Tensor:
        sizes = _split(vocab, self.tp)
        c = max(sizes)
        pad = torch.cat([w, w.new_zeros((c - w.shape[0],) + w.shape[1:])]) if w.shape[0] < c else w
        parts = [torch.empty_like(pad) for _ in range(self.tp)]
        dist.all_gather(parts, pad.contiguous(), group=self.tp_group)
        full = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        return full

    def eval_model(self, model: nn.Module) -> Optional[TinyGPT]:
        """A plain, unsharded copy of the model on rank 0 (None elsewhere); every rank must
        call."""
        state = self.full_state(model)
        if not self.is_main:
            return None
        replica = TinyGPT(unwrap(model).cfg)
        replica.load_state_dict(state)
        return replica.to(self.device).train(unwrap(model).training)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        return None if self.sharded else optimizer.state_dict()

    # ------------------------------------------------------------------ step

    def clip_and_step(self, model: nn.Module, opt: torch.optim.Optimizer) -> Tensor:
        """Clip to global norm 1, step, zero; returns the pre-clip global norm."""
        params = [p for p in unwrap(model).parameters() if p.grad is not None]
        if self.tp > 1:
            head = unwrap(model).head.weight
            body = [p for p in params if p is not head]
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for p in body:
                sq += p.grad.double().pow(2).sum()
            h = head.grad.double().pow(2).sum() if head.grad is not None else torch.zeros_like(sq)
            dist.all_reduce(h, group=self.tp_group)
            norm = (sq + h).sqrt().to(torch.float32)
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if _is_dtensor(norm):
                norm = norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm.detach()

    def reduce_counts(self, t: Tensor) -> None:
        """Sum per-token counts over the ranks that hold different tokens (dp x cp)."""
        dist.all_reduce(t, group=self.data_group)

    # ------------------------------------------------------------------ losses

    def check_method(self, method: str, fused: bool) -> None:
        if self.cp > 1 and method == "rho1":
            raise ValueError("--cp with --method rho1: not supported (Rho-1's top-k selection "
                             "is per call)")
        if self.cp > 1 and fused and method == "remit":
            raise ValueError("--cp with --fused-linear --method remit: not supported "
                             "(remit_linear_loss takes no cp_group); drop --fused-linear")

    def midtrain_loss(self, ddp, model, teacher, x, y, b, method, p, backend, fused):
        """(loss, ReMiT details or None, this rank's targets [B, T/cp], their column slice):
        the full forward, the loss on this rank's positions, divided by the global count."""
        cols = self.cols(y.shape[1])
        ys = y[:, cols].contiguous()
        bs = None if b is None else b[:, cols].contiguous()
        num_items = (global_num_items(ys, self.data_group, ignore_index=D.IGNORE_INDEX,
                                      per_rank=True) if method != "rho1" else None)
        tp, cp = self.tp_group, self.cp_group
        rows = None
        if tp is not None:
            sizes = _split(unwrap(model).head.vocab, self.tp)
            s0 = sum(sizes[:self.tp_rank])
            rows = slice(s0, s0 + sizes[self.tp_rank])
        if fused:
            h = ddp(x, hidden_only=True)[:, cols]
            s_h = s_w = None
            if teacher is not None and method in ("remit", "rho1") and bs is None:
                bs = frozen_logprobs(teacher, x, y, backend)[:, cols]
            elif teacher is not None:
                with torch.no_grad():
                    s_h = teacher(x, hidden_only=True)[:, cols]
                    s_w = teacher.head.weight if rows is None else teacher.head.weight[rows]
            kw = {"eps": p.eps} if method == "remit" else (
                {"keep_ratio": p.keep_ratio} if method == "rho1" else
                {"temperature": p.kd_temperature} if method == "kd" else {})
            res = remit_ext.remit_linear_loss(
                h, unwrap(model).head.weight, ys, scorer_hidden=s_h, scorer_weight=s_w,
                scorer_logprobs=bs if method in ("remit", "rho1") else None, method=method,
                num_items_in_batch=num_items, return_details=method == "remit",
                backend=backend, tp_group=tp, **kw)
            if method != "remit":
                return res, None, ys, cols
            if self.dp_group is not None:  # cp is refused here: dp ranks hold the rest
                res = res._replace(diagnostics=reduce_diagnostics(
                    res.diagnostics, ys, self.dp_group, ignore_index=D.IGNORE_INDEX))
            return res.loss, res, ys, cols
        logits = ddp(x)[:, cols].float()
        t_logits = None
        if teacher is not None and method in ("remit", "rho1") and bs is None:
            bs = frozen_logprobs(teacher, x, y, backend)[:, cols]
        elif teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)[:, cols].float()
                if rows is not None:
                    t_logits = t_logits[..., rows].contiguous()
        if method == "ntp":
            return remit_ext.weighted_cross_entropy(
                logits, ys, num_items_in_batch=num_items, tp_group=tp,
                backend=backend), None, ys, cols
        if method == "remit":
            if tp is None and cp is None:
                out = remit_ext.remit_loss(logits, ys, scorer_logprobs=bs, eps=p.eps,
                                           num_items_in_batch=num_items, return_details=True,
                                           backend=backend)
                out = out._replace(diagnostics=reduce_diagnostics(
                    out.diagnostics, ys, self.data_group, ignore_index=D.IGNORE_INDEX))
            else:
                out = remit_ext.remit_loss(logits, ys, scorer_logprobs=bs, eps=p.eps,
                                           num_items_in_batch=num_items, return_details=True,
                                           backend=backend, tp_group=tp, cp_group=cp,
                                           dp_group=self.dp_group)
            return out.loss, out, ys, cols
        if method == "rho1":
            return remit_ext.rho1_loss(logits, ys, ref_logprobs=bs, keep_ratio=p.keep_ratio,
                                       tp_group=tp, backend=backend), None, ys, cols
        return remit_ext.kd_loss(logits, t_logits, ys, temperature=p.kd_temperature,
                                 num_items_in_batch=num_items, tp_group=tp,
                                 backend=backend), None, ys, cols


def parallel_dist(base: Dist, fsdp: bool, tp: int, cp: int) -> Dist:
    """``base`` unchanged when no parallel option is given, else its ParallelDist."""
    if not fsdp and tp == 1 and cp == 1:
        return base
    return ParallelDist(base, fsdp, tp, cp)
