"""The RL recipe study behind the flywheel's RL stage (issue 24): RL variants run from the same
NTP-annealed checkpoint of each seed, compared on the metric the table reports.

Per seed: ``pretrain`` -> the NTP anneal (``midtrain --method ntp``) -> one RL run per variant
from that anneal. The stages land in the flywheel's own layout (``<out>/seed<s>/pretrain``,
``midtrain-ntp``, and ``rl`` for the default recipe), so a later ``remit-ext flywheel --seeds K
--out <out>`` reuses them instead of training them again; the other variants go to
``rl-recipe-<name>``. Then ``rl_recipe.json`` / ``rl_recipe.md``: per variant and seed, greedy
accuracy before -> after with the exact McNemar test of the per-problem outcomes, sampled
accuracy, the NLL of step results and answers before -> after; over seeds, the paired change
with a 95% t-interval and the McNemar test pooled over seeds.

    python bench/flywheel_rl_recipe.py --out runs/flywheel8 --seeds 0 1 2 3 --jobs 2 \\
        --results bench/results/flywheel_default
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (directory under seed<s>, preset overrides, what it is)
VARIANTS = {
    "ours": ("rl", [], "the flywheel's recipe (ours): 1e-4, 10-step warm-up then linear decay to "
                       "0, advantages clipped at 0, weight A_i / (B G max_new)"),
    "grpo": ("rl-recipe-grpo", ["rl_lr=2e-4", "rl_warmup=0", "rl_decay=0", "rl_advantage=whiten",
                                "rl_normalize=length"],
             "the papers' GRPO as the flywheel ran it before: constant 2e-4 from a fresh AdamW, "
             "whitened +/- advantages, A_i / (G L_i)"),
    "rate": ("rl-recipe-rate", ["rl_advantage=whiten", "rl_normalize=length"],
             "the rate schedule alone (1e-4, warm-up, decay) with GRPO's +/- advantages and "
             "A_i / (G L_i)"),
}

# The post-RL stage (RL of every mid-trained model, stream "post-rl"): name -> (directory
# prefix under seed<s>, preset overrides, what it is). The directory is <prefix>-<model>.
POST_VARIANTS = {
    "post40": ("post-rl40", ["post_rl_steps=40"],
               "40 steps of the reference's recipe (1e-4 peak, 10-step warm-up, linear decay): "
               "the flywheel's post-RL stage before this study"),
    "post40-3e-5": ("post-rl-lr3e-5", ["post_rl_steps=40", "rl_lr=3e-5"],
                    "40 steps, the same schedule at a 3e-5 peak"),
    "post150": ("post-rl", ["post_rl_steps=150"],
                "150 steps: the reference's own RL stage, on the post-RL random stream (the "
                "flywheel's post-RL stage since this study; its directories are the flywheel's)"),
}
# model -> its mid-trained directory (the flywheel's names)
POST_MODELS = {"ntp": "midtrain-ntp", "rho1": "midtrain-rho1", "remit": "midtrain-remit",
               "kd": "midtrain-kd", "rmt": "midtrain-rmt", "remit-ntpref": "midtrain-remit-ntpref",
               "remit2": "midtrain-remit2"}


def run_seed(out: Path, seed: int, variants: list[str]) -> None:
    import dataclasses

    from remit_ext.train.presets import get_preset
    from remit_ext.train.stages import Common, midtrain, pretrain, rl

    sdir = out / f"seed{seed}"
    preset = get_preset("default", [f"seed={seed}"])
    c = Common(preset, sdir, progress=False)
    stage = lambda sub, p=preset: dataclasses.replace(c, preset=p, out=sdir / sub)  # noqa: E731
    base = pretrain(stage("pretrain"))
    anneal = midtrain(stage("midtrain-ntp"), base / "final.pt", "ntp")
    for name in variants:
        sub, overrides, _ = VARIANTS[name]
        t0 = time.perf_counter()
        rl(stage(sub, preset.override(overrides)), anneal / "final.pt")
        print(f"seed {seed} {name}: {time.perf_counter() - t0:.0f} s", flush=True)


def run_post(out: Path, seed: int, variants: list[str], models: list[str]) -> None:
    """Post-RL variants from each model's finished mid-training (run the flywheel first)."""
    import dataclasses

    from remit_ext.train.presets import get_preset
    from remit_ext.train.stages import Common, rl

    sdir = out / f"seed{seed}"
    for name in variants:
        prefix, overrides, _ = POST_VARIANTS[name]
        p = get_preset("default", [f"seed={seed}", *overrides])
        p = dataclasses.replace(p, rl_steps=p.post_rl_steps)  # as the flywheel's post-RL
        for m in models:
            t0 = time.perf_counter()
            rl(Common(p, sdir / f"{prefix}-{m}", progress=False),
               sdir / POST_MODELS[m] / "final.pt", stream="post-rl")
            print(f"seed {seed} {name} {m}: {time.perf_counter() - t0:.0f} s", flush=True)


def summarise_post(out: Path, seeds: list[int], variants: list[str], models: list[str]) -> dict:
    from remit_ext.train.runtime import load
    from remit_ext.train.seeds import mcnemar, paired_difference

    res = {"seeds": seeds, "models": models, "variants": {}}
    for name in variants:
        prefix, overrides, what = POST_VARIANTS[name]
        per_model = {}
        for m in models:
            ev = [(load(out / f"seed{s}" / POST_MODELS[m] / "final.pt")["eval"],
                   load(out / f"seed{s}" / f"{prefix}-{m}" / "final.pt")["eval"]) for s in seeds]
            per_model[m] = {
                "acc_before": [b["acc"] for b, _ in ev], "acc_after": [a["acc"] for _, a in ev],
                "acc_change": paired_difference([a["acc"] for _, a in ev],
                                                [b["acc"] for b, _ in ev]),
                "pooled_mcnemar": mcnemar("".join(a["correct"] for _, a in ev),
                                          "".join(b["correct"] for b, _ in ev)),
                "nll_critical_change": paired_difference([a["nll_critical"] for _, a in ev],
                                                         [b["nll_critical"] for b, _ in ev])}
        res["variants"][name] = {"what": what, "overrides": overrides, "per_model": per_model}
    return res


def markdown_post(res: dict, command: str) -> str:
    n = len(res["seeds"])
    md = ["## The post-RL stage (RL of each mid-trained model)", "",
          f"Seeds {', '.join(map(str, res['seeds']))} of preset `default`; each model's RL "
          "starts from its own finished anneal, on the post-RL random stream (the same prompts "
          "and sampling streams for every model and variant of a seed). Greedy accuracy change "
          f"by the model's RL, mean [95% CI, t with {n - 1} df] in points, the McNemar test "
          "pooled over seeds (problems gained / lost), and the change of the NLL of step "
          "results and answers.", "",
          f"Command: `{command}`; torch {res['machine']['torch']}, one torch thread per "
          f"process, {res['machine']['cpu']}.", "",
          "| variant | model | before -> after (mean) | Δ greedy | McNemar | Δ NLL r+a |",
          "|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        for m, r in v["per_model"].items():
            pm = r["pooled_mcnemar"]
            b, a = (100 * sum(r[k]) / n for k in ("acc_before", "acc_after"))
            md.append(f"| {name} | {m} | {b:.1f} -> {a:.1f} | {_ci(r['acc_change'], 100, 2)} | "
                      f"+{pm['gained']}/−{pm['lost']}, p={pm['p']:.2g} | "
                      f"{_ci(r['nll_critical_change'], 1, 4)} |")
    md += [""] + [f"- {name}: {v['what']} (overrides `{' '.join(v['overrides'])}`)"
                  for name, v in res["variants"].items()]
    return "\n".join(md) + "\n"


def summarise(out: Path, seeds: list[int], variants: list[str]) -> dict:
    from remit_ext.train.runtime import load
    from remit_ext.train.seeds import mcnemar, paired_difference

    res = {"seeds": seeds, "variants": {}}
    for name in variants:
        sub, overrides, what = VARIANTS[name]
        rows = []
        for s in seeds:
            before = load(out / f"seed{s}" / "midtrain-ntp" / "final.pt")["eval"]
            after = load(out / f"seed{s}" / sub / "final.pt")["eval"]
            rows.append({"seed": s, "acc_before": before["acc"], "acc_after": after["acc"],
                         "mcnemar": mcnemar(after["correct"], before["correct"]),
                         "sampled_before": before.get("acc_sampled"),
                         "sampled_after": after.get("acc_sampled"),
                         "nll_critical_before": before["nll_critical"],
                         "nll_critical_after": after["nll_critical"]})
        pooled = mcnemar("".join(load(out / f"seed{s}" / sub / "final.pt")["eval"]["correct"]
                                 for s in seeds),
                         "".join(load(out / f"seed{s}" / "midtrain-ntp" / "final.pt")["eval"]
                                 ["correct"] for s in seeds))
        res["variants"][name] = {
            "what": what, "overrides": overrides, "per_seed": rows, "pooled_mcnemar": pooled,
            "acc_change": paired_difference([r["acc_after"] for r in rows],
                                            [r["acc_before"] for r in rows]),
            "sampled_change": paired_difference([r["sampled_after"] for r in rows],
                                                [r["sampled_before"] for r in rows])
            if all(r["sampled_after"] is not None for r in rows) else None,
            "nll_critical_change": paired_difference([r["nll_critical_after"] for r in rows],
                                                     [r["nll_critical_before"] for r in rows]),
        }
    return res


def _ci(d, scale, digits):
    if d is None:
        return ""
    f = f"{{:+.{digits}f}}"
    if d.get("ci95") is None:
        return f.format(scale * d["mean"])
    lo, hi = d["ci95"]
    return f"{f.format(scale * d['mean'])} [{f.format(scale * lo)}, {f.format(scale * hi)}]"


def markdown(res: dict, command: str) -> str:
    n = len(res["seeds"])
    md = ["# The flywheel's RL stage: recipe study (issue 24)", "",
          f"RL from each seed's NTP anneal (preset `default`, {n} seeds: "
          f"{', '.join(map(str, res['seeds']))}), 150 steps of 16 prompts x 8 rollouts at T = 1, "
          "one difficulty per step; every variant from the same checkpoint and the same prompt "
          "and sampling streams. Greedy answer accuracy on the 1,200 held-out problems (the "
          "table's metric) before -> after, with the exact McNemar test of the per-problem "
          "outcomes (problems gained / lost); sampled accuracy (4 samples per problem at T = 1, "
          "the metric RL optimises); NLL of the held-out step results and answers. Over seeds: "
          f"mean change [95% CI, t with {n - 1} df], and McNemar pooled over seeds (problems "
          "as independent; the seed-level interval is the conservative reading).", "",
          "Provenance of the recipe: it was chosen by a review of the RL stage (2026-12-07) "
          "after about 14 configurations tried on seed 0's held-out problems; the other seeds "
          "were run with it fixed beforehand, so they are the unselected evidence. Every "
          "number here is this script's own run on this machine.", "",
          f"Command: `{command}`; torch {res['machine']['torch']}, one torch thread per "
          f"process, {res['machine']['cpu']}.", ""]
    for name, v in res["variants"].items():
        md += [f"## {name}: {v['what']}", "",
               f"Overrides: `{' '.join(v['overrides']) or '(the defaults)'}`", "",
               "| seed | greedy before -> after | Δ | McNemar | sampled before -> after | "
               "NLL r+a before -> after |", "|---|---|---|---|---|---|"]
        for r in v["per_seed"]:
            mc = r["mcnemar"]
            samp = (f"{100 * r['sampled_before']:.1f} -> {100 * r['sampled_after']:.1f}"
                    if r["sampled_after"] is not None else "")
            md.append(f"| {r['seed']} | {100 * r['acc_before']:.1f} -> {100 * r['acc_after']:.1f}"
                      f" | {100 * (r['acc_after'] - r['acc_before']):+.1f} | +{mc['gained']}/"
                      f"−{mc['lost']}, p={mc['p']:.2g} | {samp} | "
                      f"{r['nll_critical_before']:.4f} -> {r['nll_critical_after']:.4f} |")
        pm = v["pooled_mcnemar"]
        md += ["", f"Over seeds: greedy {_ci(v['acc_change'], 100, 2)} points; pooled McNemar "
               f"+{pm['gained']}/−{pm['lost']}, p={pm['p']:.2g}; sampled "
               f"{_ci(v['sampled_change'], 100, 1)} points; NLL r+a "
               f"{_ci(v['nll_critical_change'], 1, 4)}.", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the flywheel's --seeds directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path, help="write rl_recipe.{json,md} here")
    ap.add_argument("--post", nargs="+", choices=list(POST_VARIANTS),
                    help="study the post-RL stage instead: these variants, from each model's "
                         "finished anneal (writes rl_recipe_post.{json,md})")
    ap.add_argument("--models", nargs="+", default=["ntp", "rho1", "remit", "remit2"],
                    choices=list(POST_MODELS), help="with --post: the mid-trained models")
    ap.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if args.one_seed is not None:
        if args.post:
            run_post(out, args.one_seed, args.post, args.models)
        else:
            run_seed(out, args.one_seed, args.variants)
        return 0

    def one(seed):
        log = out / f"seed{seed}" / "rl_recipe.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            what = (["--post", *args.post, "--models", *args.models] if args.post
                    else ["--variants", *args.variants])
            return subprocess.run([sys.executable, __file__, "--out", str(out), "--one-seed",
                                   str(seed), *what],
                                  stdout=f, stderr=subprocess.STDOUT).returncode

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rcs = list(pool.map(one, args.seeds))
    if any(rcs):
        print(f"failed seeds: {[s for s, rc in zip(args.seeds, rcs) if rc]}", file=sys.stderr)
        return 1
    res = (summarise_post(out, args.seeds, args.post, args.models) if args.post
           else summarise(out, args.seeds, args.variants))
    from remit_ext.train.flywheel import machine_info
    from remit_ext.train.presets import get_preset

    res["machine"] = machine_info(get_preset("default"))
    res["seconds_this_call"] = time.perf_counter() - t0  # stages already done are skipped
    command = "python bench/flywheel_rl_recipe.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    md = markdown_post(res, command) if args.post else markdown(res, command)
    print(md)
    if args.results:
        stem = "rl_recipe_post" if args.post else "rl_recipe"
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.results / f"{stem}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
