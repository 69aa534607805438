"""What every training stage shares: the options (``Common``), model and optimiser set-up, the
data and batch schedule, held-out evaluation, per-step logging and the stage's finish.

``stages.py`` (pretrain, rl, score, midtrain) and ``rmt_stage.py`` (RMT mid-training) both
build on these; neither imports the other's loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import remit_ext

from . import data as D
from .model import ModelConfig, TinyGPT
from .presets import Preset
from .runtime import load, step_generator, unwrap


@dataclass
class Common:
    """Options every stage takes from the command line."""

    preset: Preset
    out: Path
    backend: str = "auto"  # remit_ext loss backend
    device: Optional[str] = None
    progress: bool = True
    fused_linear: bool = False  # midtrain: hidden states + LM head into remit_linear_loss
    # midtrain under torchrun: FSDP2 instead of DDP, vocab-parallel head, loss-level context
    # parallelism (remit_ext.train.parallel_setup)
    fsdp: bool = False
    tp: int = 1
    cp: int = 1


# ----------------------------------------------------------------------------- helpers


def apply_threads(p: Preset) -> None:
    """Fix torch's intra-op thread count for this process (``p.threads``; 0 leaves torch's
    default). CPU reductions split work by thread, so the thread count changes float rounding
    and with it every trained number; fixing it makes a run reproduce bit for bit on the same
    torch build and CPU kind, whatever the machine's core count."""
    if p.threads > 0 and torch.get_num_threads() != p.threads:
        torch.set_num_threads(p.threads)


def new_model(p: Preset, device: torch.device) -> TinyGPT:
    torch.manual_seed(p.seed)
    return TinyGPT(p.model_config()).to(device)


def load_model(path: Path, device: torch.device) -> TinyGPT:
    """A model from a stage's ``final.pt`` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "final.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: expected a stage's final.pt, got missing {path}")
    state = load(path)
    model = TinyGPT(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def dataset(p: Preset, split: str) -> tuple[Tensor, Tensor]:
    n = p.n_pretrain if split == "pretrain" else p.n_midtrain
    return D.pack_rows(D.generate_texts(split, n, p.seed, p.max_k, p.noise), p.seq_len)


def batch_rows(p: Preset, stage: str, step: int, n_rows: int, size: int) -> Tensor:
    """The global batch's row indices at ``step`` (a function of seed and step only)."""
    return torch.randint(0, n_rows, (size,), generator=step_generator(p.seed, stage, step))


def midtrain_batch(p: Preset, d, opt, inputs: Tensor, targets: Tensor,
                   step: int) -> tuple[Tensor, Tensor, Tensor]:
    """A mid-training step's schedule and data, shared by every method: the rate decayed
    linearly to zero, and this rank's shard of the global batch (rows, inputs, targets)."""
    set_lr(opt, p.lr * (1 - step / p.midtrain_steps))
    rows = d.shard(batch_rows(p, "midtrain", step, len(inputs), p.batch))
    return rows, inputs[rows].to(d.device), targets[rows].to(d.device)


def clip_and_step(model, opt) -> Tensor:
    """Clip to norm 1, step, zero; returns the pre-clip norm as a tensor (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach()


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work (step timings on a GPU would otherwise
    measure kernel launches only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: TinyGPT, p: Preset, device: torch.device, backend: str = "auto") -> dict:
    """Answer accuracy (greedy decoding) per difficulty and overall, NLL per token on held-out
    worked solutions, and NLL on the reasoning-critical tokens (step results and answers).

    Also (issue 24) ``correct``, the greedy outcome of every held-out problem as a string of
    0/1 in a fixed order (for per-problem paired tests between models), and, with
    ``eval_samples`` > 0, ``acc_sampled``: the mean over that many completions per problem at
    ``rl_temperature``, drawn from a stream fixed by the seed alone (every model of a seed sees
    the same random numbers), the metric RL optimises."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    problems = D.generate_problems("eval", p.n_eval, p.seed, p.max_k)
    out: dict = {}
    correct = think = 0
    outcome = {}  # problem index -> greedy hit
    sampled_hits = 0
    n_samples = getattr(p, "eval_samples", 0)
    for k in range(1, p.max_k + 1):
        idx = [i for i, q in enumerate(problems) if q.difficulty == k]
        group = [problems[i] for i in idx]
        prompts = torch.tensor([[D.NEWLINE_ID] + D.encode(q.prompt()) for q in group],
                               device=device)
        max_new = len(group[0].text()) - len(group[0].prompt())
        gen = model.generate(prompts, max_new).cpu()
        texts = [D.decode(g) for g in gen]
        hit = [D.parse_answer(t) == q.answer for t, q in zip(texts, group)]
        outcome.update(zip(idx, hit))
        hits = sum(hit)
        think += sum(">" in t or "<" in t for t in texts)
        out[f"acc_k{k}"] = hits / len(group)
        correct += hits
        if n_samples > 0:
            gen = model.generate(prompts.repeat_interleave(n_samples, dim=0), max_new,
                                 temperature=p.rl_temperature,
                                 generator=step_generator(p.seed, "eval-sample", k, 0, device))
            answers = [D.parse_answer(D.decode(g)) for g in gen.cpu()]
            sampled_hits += sum(a == group[i // n_samples].answer
                                for i, a in enumerate(answers))
    out["acc"] = correct / len(problems)
    out["correct"] = "".join("1" if outcome[i] else "0" for i in range(len(problems)))
    if n_samples > 0:
        out["acc_sampled"] = sampled_hits / (n_samples * len(problems))
    # Greedy completions that use the think format ('<' or '>'), which clean mid-training
    # text never does: the measure of RMT's format leaking into ordinary text.
    out["think_frac"] = think / len(problems)
    inputs, targets = D.pack_rows([q.text() for q in problems], p.seq_len)
    roles = D.token_roles(inputs)
    nll_sum = torch.zeros(2, dtype=torch.float64)  # all valid tokens, critical tokens
    counts = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(problems), 256):
        x, y = inputs[i:i + 256].to(device), targets[i:i + 256].to(device)
        per_tok = remit_ext.weighted_cross_entropy(model(x).float(), y, reduction="none",
                                                   backend=backend).double().cpu()
        valid = targets[i:i + 256] != D.IGNORE_INDEX
        critical = valid & (roles[i:i + 256] > 0)
        nll_sum += torch.stack([per_tok.sum(), (per_tok * critical).sum()])
        counts += torch.tensor([valid.sum(), critical.sum()], dtype=torch.float64)
    out["nll"] = float(nll_sum[0] / counts[0])
    out["nll_critical"] = float(nll_sum[1] / counts[1])
    model.train(was_training)
    return out


def frozen_logprobs(model, x: Tensor, y: Tensor, backend: str = "auto") -> Tensor:
    """log p(y_t) ``[B, T]`` of a frozen model (the scorer / reference) from its hidden states
    and LM head through ``linear_token_stats`` under no_grad: the ``[B, T, V]`` logits are never
    held and the head gets no gradient buffer."""
    model = unwrap(model)
    with torch.no_grad():
        h = model(x, hidden_only=True)
        return remit_ext.linear_token_stats(h, model.head.weight, y, bias=model.head.bias,
                                            backend=backend).logprob


def log_step(run, d, step, every, metrics, model, p, c, probe=None) -> None:
    """Log every 10th step (and the last); evaluate every ``every`` steps on rank 0 (and run
    ``probe(model)``, RMT's per-tier next-token accuracy, when given). Metric values may be
    device tensors: they are read (a host sync) only on the steps logged."""
    last = step + 1 == run.total
    if (step + 1) % 10 and not last and not (every and (step + 1) % every == 0):
        return
    rec = {"step": step + 1, **{k: d.mean(float(v)) for k, v in metrics.items()}}
    if every and ((step + 1) % every == 0 or last):
        m = d.eval_model(model)  # every rank: a sharded model is gathered
        if d.is_main:
            rec.update({f"eval_{k}": v for k, v in evaluate(m, p, d.device, c.backend).items()
                        if k != "correct"})
            if probe is not None:
                rec.update({f"probe_{k}": v for k, v in probe(m).items()})
    run.log(rec)
    d.barrier()


def finish_stage(run, d, model, p, c, extra: Optional[dict] = None) -> None:
    result = None
    m = d.eval_model(model)  # every rank: a sharded model is gathered
    if d.is_main:
        result = evaluate(m, p, d.device, c.backend)
    run.finish(model, {"eval": result, "world_size": d.world, **(extra or {})})


def median(xs: list) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]
