"""``remit-ext flywheel --seeds K``: K independent flywheels (seed, seed+1, ...), run as parallel
processes (``--jobs``), then ``seeds.json`` and ``seeds.md`` beside the per-seed directories:
each model's accuracy and NLL per seed, and the paired difference of every method against
vanilla NTP (and against the pre-trained base) with a 95% confidence interval from the t
distribution over seeds.

Each seed is the plain single-seed run (``remit-ext flywheel --seed s``) in ``<out>/seed<s>``,
so an interrupted multi-seed run resumes seed by seed, stage by stage. This is process-level
parallelism of independent runs, not distributed training.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from .runtime import atomic_write_text

METRICS = ("acc", "acc_sampled", "nll", "nll_critical", "post_rl_acc", "post_rl_acc_sampled",
           "post_rl_nll_critical", "think_frac")
BASELINES = ("Vanilla NTP", "Pre-trained")


# ----------------------------------------------------------------------------- statistics


def _t_pdf(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom: 1/2 plus the density's integral from
    0 to ``x`` (composite Simpson's rule on 2,000 panels in ``atan`` coordinates, where the
    integrand is smooth and the range finite; error below 1e-9 for df >= 1)."""
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df!r}")
    if x == 0:
        return 0.5
    # x = tan(u): dx = (1 + x^2) du, u in [0, atan|x|].
    n, top = 2000, math.atan(abs(x))
    h = top / n
    total = 0.0
    for i in range(n + 1):
        u = i * h
        f = _t_pdf(math.tan(u), df) / math.cos(u) ** 2
        total += f * (1 if i in (0, n) else 4 if i % 2 else 2)
    area = total * h / 3
    return 0.5 + area if x > 0 else 0.5 - area


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on ``t_cdf`` to 1e-10)."""
    if not 0 < p < 1:
        raise ValueError(f"p: expected a probability in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mcnemar(a: str, b: str) -> dict:
    """Exact two-sided McNemar test of two models' per-problem outcomes (strings of 0/1 over
    the same problems): ``gained`` problems only ``a`` solves, ``lost`` only ``b`` solves, and
    the probability of a split at least this uneven when either model is equally likely to win
    each discordant problem (binomial, p = 1/2)."""
    if len(a) != len(b):
        raise ValueError(f"a, b: expected outcomes over the same problems, got {len(a)} and "
                         f"{len(b)}")
    gained = sum(x == "1" and y == "0" for x, y in zip(a, b))
    lost = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n, k = gained + lost, min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p = min(1.0, 2 * tail / 2 ** n) if n else 1.0
    return {"gained": gained, "lost": lost, "p": p}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Mean of the per-seed differences ``a_s - b_s``, their sample standard deviation, and
    the two-sided ``level`` confidence interval ``mean +- t_{(1+level)/2, n-1} sd / sqrt(n)``
    (None for fewer than two seeds)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a, b: expected equally long non-empty sequences, got {len(a)} and "
                         f"{len(b)}")
    diff = [x - y for x, y in zip(a, b)]
    n = len(diff)
    mean = sum(diff) / n
    out = {"n": n, "mean": mean, "per_seed": diff, "sd": None, "t": None, "ci95": None}
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / (n - 1))
        t = t_quantile((1 + level) / 2, n - 1)
        half = t * sd / math.sqrt(n)
        out.update(sd=sd, t=t, ci95=[mean - half, mean + half])
    return out


# ----------------------------------------------------------------------------- aggregation


def aggregate(results: dict[int, dict]) -> dict:
    """``seeds.json`` from each seed's ``results.json`` (seed -> parsed file)."""
    seeds = sorted(results)
    names = [r["name"] for r in results[seeds[0]]["rows"]]
    per_model: dict = {}
    for name in names:
        vals: dict = {m: [] for m in METRICS}
        for s in seeds:
            row = next(r for r in results[s]["rows"] if r["name"] == name)
            for m in METRICS:
                src = row.get("post_rl", {}) if m.startswith("post_rl_") else row["eval"]
                vals[m].append(src.get(m.removeprefix("post_rl_")))
        per_model[name] = {m: v for m, v in vals.items() if all(x is not None for x in v)}
    diffs: dict = {}
    for base in BASELINES:
        if base not in per_model:
            continue
        diffs[base] = {}
        for name in names:
            if name == base:
                continue
            diffs[base][name] = {m: paired_difference(per_model[name][m], per_model[base][m])
                                 for m in METRICS
                                 if m in per_model[name] and m in per_model[base]}
    # Each model's change by its own post-RL stage, and per-problem paired tests pooled over
    # seeds (problems treated as independent: training noise between runs is not in them; the
    # seed-level intervals are the conservative reading).
    rl_change = {name: paired_difference(d["post_rl_acc"], d["acc"])
                 for name, d in per_model.items() if "post_rl_acc" in d}
    def _outcomes(name: str, key: str) -> str:
        rows = [next(r for r in results[s]["rows"] if r["name"] == name) for s in seeds]
        parts = [r.get(key, {}).get("correct", "") for r in rows]
        return "".join(parts) if all(parts) else ""

    outcomes = {name: [_outcomes(name, "eval"), _outcomes(name, "post_rl")] for name in names}
    pooled: dict = {}
    for base in ("Vanilla NTP", "ReMiT"):
        if base not in outcomes or not outcomes[base][0]:
            continue
        pooled[base] = {}
        for name in names:
            if name == base or not outcomes[name][0]:
                continue
            pooled[base][name] = {"before_rl": mcnemar(outcomes[name][0], outcomes[base][0])}
            if outcomes[name][1] and outcomes[base][1]:
                pooled[base][name]["after_rl"] = mcnemar(outcomes[name][1], outcomes[base][1])
    # ReMiT's mean weight by token role under each reference (seed mean): whether the
    # reference up-weights the step results and answers it should.
    by_ref: dict = {}
    for s in seeds:
        for ref, w in (results[s].get("remit_weights_by_reference") or {}).items():
            for role, v in ((w or {}).get("role_mean") or {}).items():
                by_ref.setdefault(ref, {}).setdefault(role, []).append(v)
    weights_by_role = {ref: {role: sum(v) / len(v) for role, v in roles.items()
                             if len(v) == len(seeds)} for ref, roles in by_ref.items()}
    mean = {name: {m: sum(v) / len(v) for m, v in d.items()} for name, d in per_model.items()}
    sd = {name: {m: (math.sqrt(sum((x - mean[name][m]) ** 2 for x in v) / (len(v) - 1))
                     if len(v) > 1 else None) for m, v in d.items()}
          for name, d in per_model.items()}
    r0 = results[seeds[0]]
    return {"seeds": seeds, "models": names, "per_seed": per_model, "mean": mean, "sd": sd,
            "paired": diffs, "rl_change": rl_change, "mcnemar": pooled,
            "remit_weights_by_role": weights_by_role, "preset": {k: v for k, v in r0["preset"].items() if k != "seed"},
            "order": r0.get("order"), "machine": r0.get("machine"),
            "seconds_per_seed": {s: results[s].get("seconds_total") for s in seeds},
            "cpu_seconds_per_seed": {s: results[s].get("cpu_seconds_total") for s in seeds}}


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _ci(d: dict, scale: float, digits: int) -> str:
    f = f"{{:+.{digits}f}}"
    if d.get("ci95") is None:
        return f.format(scale * d["mean"])
    lo, hi = d["ci95"]
    return f"{f.format(scale * d['mean'])} [{f.format(scale * lo)}, {f.format(scale * hi)}]"


def _mc(d: Optional[dict]) -> str:
    if not d:
        return ""
    return f"+{d['gained']}/−{d['lost']}, p={d['p']:.2g}"


def markdown(agg: dict) -> str:
    seeds, names = agg["seeds"], agg["models"]
    pm, mean = agg["per_seed"], agg["mean"]
    vs_ntp = agg["paired"].get("Vanilla NTP", {})
    vs_base = agg["paired"].get("Pre-trained", {})
    mc = agg.get("mcnemar", {})
    mc_ntp = mc.get("Vanilla NTP", {})
    n = len(seeds)
    ci = (f"mean [95% CI, t with {n - 1} degrees of freedom]" if n > 1 else
          "one seed: no interval")
    md = [f"# Flywheel over {n} seeds ({', '.join(map(str, seeds))}), preset "
          f"`{agg['preset']['name']}`", "",
          "Answer accuracy (%) on held-out problems, greedy decoding, per seed and the mean; "
          "paired differences against vanilla NTP and against the pre-trained base (same seed, "
          f"so the same data, initialisation and base), {ci}; the exact McNemar test of the "
          "per-problem outcomes against NTP, pooled over seeds (problems gained/lost; it "
          "treats problems as independent and ignores run-to-run training noise, so the "
          "seed-level interval is the conservative reading); sampled accuracy (the mean over "
          "samples per problem at the RL temperature); held-out NLL on the step results and "
          "answers (critical tokens).", ""]
    head = (["model"] + [f"seed {s}" for s in seeds]
            + ["mean acc", "Δ acc vs NTP", "McNemar vs NTP", "Δ acc vs base", "sampled acc",
               "NLL critical", "Δ NLL crit. vs NTP"])
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        d = pm[name]
        cells = [name] + [_pct(x) for x in d["acc"]] + [f"**{_pct(mean[name]['acc'])}**"]
        cells.append(_ci(vs_ntp[name]["acc"], 100, 1) if name in vs_ntp else "")
        cells.append(_mc(mc_ntp.get(name, {}).get("before_rl")))
        cells.append(_ci(vs_base[name]["acc"], 100, 1) if name in vs_base else "")
        cells.append(_pct(mean[name].get("acc_sampled")))
        cells.append(f"{mean[name]['nll_critical']:.4f}" if "nll_critical" in mean[name] else "")
        cells.append(_ci(vs_ntp[name]["nll_critical"], 1, 4)
                     if name in vs_ntp and "nll_critical" in vs_ntp[name] else "")
        md.append("| " + " | ".join(cells) + " |")
    after = [name for name in names if "post_rl_acc" in pm[name]]
    if after:
        md += ["", "After each model's own post-RL stage: accuracy, the change its RL made "
               f"({ci}), and the paired comparison with NTP after RL.", ""]
        head = ["model", "acc after RL", "Δ by its RL", "Δ after RL vs NTP",
                "McNemar after RL vs NTP", "sampled after RL", "NLL crit. after RL"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in after:
            cells = [name, f"**{_pct(mean[name]['post_rl_acc'])}**",
                     _ci(agg["rl_change"][name], 100, 1),
                     _ci(vs_ntp[name]["post_rl_acc"], 100, 1)
                     if name in vs_ntp and "post_rl_acc" in vs_ntp[name] else "",
                     _mc(mc_ntp.get(name, {}).get("after_rl")),
                     _pct(mean[name].get("post_rl_acc_sampled")),
                     f"{mean[name]['post_rl_nll_critical']:.4f}"
                     if "post_rl_nll_critical" in mean[name] else ""]
            md.append("| " + " | ".join(cells) + " |")
    refs = [nm for nm in ("Vanilla NTP", "RL reference", "RL reference (turn 2)") if nm in pm]
    if "RL reference" in refs:
        md += ["", "The references against the model they start from, per seed: greedy accuracy "
               "(%) and NLL on the held-out step results and answers.", ""]
        head = ["seed"] + [f"{nm} acc / NLL r+a" for nm in refs]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, s in enumerate(seeds):
            md.append("| " + " | ".join(
                [str(s)] + [f"{_pct(pm[nm]['acc'][i])} / {pm[nm]['nll_critical'][i]:.4f}"
                            for nm in refs]) + " |")
    wbr = agg.get("remit_weights_by_role") or {}
    if wbr:
        md += ["", "ReMiT's mean token weight by role over the anneal (seed mean), by the "
               "reference that steered it: " + "; ".join(
                   f"{ref}: " + ", ".join(f"{role} {v:.4f}" for role, v in roles.items())
                   for ref, roles in wbr.items()) + "."]
    second = [nm for nm in names if "²" in nm]
    for name in second:
        if "ReMiT" not in pm:
            continue
        d = paired_difference(pm[name]["acc"], pm["ReMiT"]["acc"])
        line = (f"{name} vs ReMiT (turn 1): {_ci(d, 100, 1)} points, McNemar "
                f"{_mc(mc.get('ReMiT', {}).get(name, {}).get('before_rl'))}")
        if "post_rl_acc" in pm[name] and "post_rl_acc" in pm["ReMiT"]:
            d2 = paired_difference(pm[name]["post_rl_acc"], pm["ReMiT"]["post_rl_acc"])
            line += (f"; after RL {_ci(d2, 100, 1)}, McNemar "
                     f"{_mc(mc.get('ReMiT', {}).get(name, {}).get('after_rl'))}")
        md += ["", line + "."]
    m = agg.get("machine") or {}
    secs = [v for v in agg["seconds_per_seed"].values() if v]
    cpu = [v for v in (agg.get("cpu_seconds_per_seed") or {}).values() if v]
    md += ["", f"Per-seed tables: `seed<s>/results.md`. torch {m.get('torch')}, "
           f"{m.get('threads')} thread(s) per seed, {m.get('cpu')}; "
           + (f"{min(secs) / 60:.1f}-{max(secs) / 60:.1f} min of wall clock per seed"
              if secs else "")
           + (f", {min(cpu) / 60:.1f}-{max(cpu) / 60:.1f} min of CPU time (stages run in "
              "that call only)" if cpu else "") + "."]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- the runner


def run_seeds(argv_for_seed, seeds: list[int], out: Path, jobs: int) -> int:
    """Run ``remit-ext flywheel`` once per seed (``argv_for_seed(seed, seed_out)`` gives the
    arguments), ``jobs`` at a time, each logging to ``<seed_out>/flywheel.log``; then write
    ``seeds.json`` and ``seeds.md`` from the seeds that finished. Returns 0 if every seed did."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def one(seed: int) -> int:
        sdir = out / f"seed{seed}"
        sdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "remit_ext", "flywheel", *argv_for_seed(seed, sdir)]
        env = {**os.environ}
        with open(sdir / "flywheel.log", "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"seed {seed}: {'done' if rc == 0 else f'failed (rc {rc}), see {sdir}/flywheel.log'}",
              flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rcs = dict(zip(seeds, pool.map(one, seeds)))
    results = {s: json.loads((out / f"seed{s}" / "results.json").read_text())
               for s in seeds if rcs[s] == 0 and (out / f"seed{s}" / "results.json").exists()}
    if not results:
        print("no seed finished; nothing to aggregate", file=sys.stderr)
        return 1
    agg = aggregate(results)
    agg["wall_seconds"] = time.perf_counter() - t0
    agg["jobs"] = jobs
    agg["failed_seeds"] = [s for s in seeds if s not in results]
    md = markdown(agg)
    atomic_write_text(json.dumps(agg, indent=1) + "\n", out / "seeds.json")
    atomic_write_text(md, out / "seeds.md")
    print(md)
    print(f"results: {out / 'seeds.md'}, {out / 'seeds.json'}")
    return 0 if len(results) == len(seeds) else 1
