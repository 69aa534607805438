"""The flywheel's results: a table in the shape of the ReMiT paper's Table 1 (models as rows,
per-difficulty answer accuracy, their average and held-out NLL as columns), and two figures."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(stage_dir: Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def table_markdown(rows: list[dict], max_k: int) -> str:
    cols = [f"acc_k{k}" for k in range(1, max_k + 1)]
    head = (["model"] + [f"acc k={k}" for k in range(1, max_k + 1)]
            + ["acc avg", "NLL", "NLL results+answers"])
    has_sampled = any("acc_sampled" in r["eval"] for r in rows)
    if has_sampled:
        head.append("acc sampled")
    has_post = any("post_rl_acc" in r for r in rows)
    if has_post:
        head += ["acc after RL", "NLL r+a after RL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["eval"]
        cells = [r["name"]] + [f"{100 * e[c]:.1f}" for c in cols]
        cells += [f"**{100 * e['acc']:.1f}**", f"{e['nll']:.4f}", f"{e['nll_critical']:.4f}"]
        if has_sampled:
            cells.append(f"{100 * e['acc_sampled']:.1f}" if "acc_sampled" in e else "")
        if has_post:
            post = r.get("post_rl", {})
            cells.append(f"{100 * r['post_rl_acc']:.1f}" if "post_rl_acc" in r else "")
            cells.append(f"{post['nll_critical']:.4f}" if "nll_critical" in post else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def probe_markdown(rows: list[dict], names: list[str]) -> str:
    """RMT's probe table: direct / think accuracy per tier, overall, and thought length."""
    head = (["model"] + [f"{n} direct / think" for n in names]
            + ["all direct / think", "thought length"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    for r in rows:
        pr = r["probe"]
        cells = [r["name"]]
        cells += [f"{pct(pr[f'tok_acc_{n}'])} / {pct(pr[f'tok_acc_think_{n}'])}" for n in names]
        cells += [f"{pct(pr['tok_acc'])} / {pct(pr['tok_acc_think'])}",
                  f"{pr['think_len']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rmt(out: Path, stage_dir: Path, base_probe: dict | None = None) -> Path:
    """rmt.png: over RMT mid-training, held-out next-token accuracy per entropy tier (direct
    and after a thought), the mean thought length (training rollouts and greedy held-out ones)
    against the budget, and the reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(stage_dir)
    ev = [r for r in recs if "probe_tok_acc" in r]
    if base_probe:
        ev = [{"step": 0, **{f"probe_{k}": v for k, v in base_probe.items()}}] + ev
    tr = [r for r in recs if "think_len" in r]
    tiers = [k[len("probe_tok_acc_think_"):] for k in (ev[0] if ev else {})
             if k.startswith("probe_tok_acc_think_")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, name in enumerate(tiers):
        steps = [r["step"] for r in ev if r.get(f"probe_tok_acc_{name}") is not None]
        direct = [100 * r[f"probe_tok_acc_{name}"] for r in ev
                  if r.get(f"probe_tok_acc_{name}") is not None]
        think = [100 * r[f"probe_tok_acc_think_{name}"] for r in ev
                 if r.get(f"probe_tok_acc_{name}") is not None]
        axes[0].plot(steps, direct, "o-", color=f"C{i}", label=f"{name} direct")
        axes[0].plot(steps, think, "s--", color=f"C{i}", label=f"{name} think")
    axes[0].set_title("held-out next-token accuracy (%) by entropy tier")
    axes[0].legend(fontsize=8)
    axes[1].plot([r["step"] for r in tr], [r["think_len"] for r in tr], label="training rollouts")
    axes[1].plot([r["step"] for r in tr], [r["budget"] for r in tr], "k:", label="budget B_t")
    axes[1].plot([r["step"] for r in ev], [r["probe_think_len"] for r in ev], "o-",
                 label="held-out (greedy)")
    axes[1].set_title("mean thought length (tokens)")
    axes[1].legend(fontsize=8)
    axes[2].plot([r["step"] for r in tr], [r["reward"] for r in tr], label="reward")
    axes[2].plot([r["step"] for r in tr], [r["match"] for r in tr], label="next-token match")
    axes[2].set_title("RL rollouts")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("mid-training step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / "rmt.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(out: Path, stage_dirs: dict[str, Path], weights: dict | None,
         base_eval: dict | None = None) -> list[Path]:
    """curves.png: mid-training loss and held-out accuracy/NLL per method (from the base
    model's evaluation at step 0); weights.png: the distribution of ReMiT weights and their
    mean per token role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, sdir in stage_dirs.items():
        recs = read_metrics(sdir)
        tr = [r for r in recs if "loss" in r]
        ev = [r for r in recs if "eval_acc" in r]
        if base_eval:
            ev = [{"step": 0, **{f"eval_{k}": v for k, v in base_eval.items()}}] + ev
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
        axes[1].plot([r["step"] for r in ev], [100 * r["eval_acc"] for r in ev], "o-", label=name)
        axes[2].plot([r["step"] for r in ev], [r["eval_nll"] for r in ev], "o-", label=name)
    for ax, title in zip(axes, ("training loss (each method's own objective)",
                                "held-out answer accuracy (%)", "held-out NLL per token")):
        ax.set_title(title)
        ax.set_xlabel("mid-training step")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if weights:
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
        bins, hist = weights["bins"], weights["hist"]
        total = sum(hist) or 1.0
        a0.bar(bins[:-1], [h / total for h in hist], width=bins[1] - bins[0], align="edge")
        a0.set_title("ReMiT token weights over mid-training")
        a0.set_xlabel("weight w = clip(2 sigmoid(delta_hat), 1-eps, 1+eps)")
        a0.set_ylabel("fraction of valid tokens")
        roles = {k: v for k, v in weights["role_mean"].items() if not math.isnan(v)}
        a1.bar(list(roles), list(roles.values()))
        a1.axhline(1.0, color="k", lw=0.8)
        a1.set_ylim(min(roles.values()) - 0.02, max(roles.values()) + 0.02)
        a1.set_title("mean weight by token role")
        fig.tight_layout()
        path = Path(out) / "weights.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
