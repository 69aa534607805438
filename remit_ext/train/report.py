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
    has_post = any("post_rl_acc" in r for r in rows)
    if has_post:
        head.append("acc after RL")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["eval"]
        cells = [r["name"]] + [f"{100 * e[c]:.1f}" for c in cols]
        cells += [f"**{100 * e['acc']:.1f}**", f"{e['nll']:.4f}", f"{e['nll_critical']:.4f}"]
        if has_post:
            cells.append(f"{100 * r['post_rl_acc']:.1f}" if "post_rl_acc" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
