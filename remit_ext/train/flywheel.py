"""``remit-ext flywheel``: every stage on one preset, then the results table and figures.

pretrain -> rl (the scorer) -> score (cache its log-probs) -> midtrain with each method from
the same base (RMT needs no scorer) -> eval; optionally RL again on each mid-trained model
(``--post-rl``). Every model is also measured on RMT's held-out next-token probe (accuracy per
entropy tier of the base model, directly and after a greedy thought). Stages already finished
are skipped, so an interrupted flywheel resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import report
from .runtime import atomic_write_text, get_dist, load
from .stages import Common, midtrain, pretrain, rl, score

NAMES = {"ntp": "Vanilla NTP", "rho1": "Rho-1", "remit": "ReMiT", "kd": "KD", "rmt": "RMT"}


def flywheel(c: Common, methods: list[str], post_rl: bool = False) -> int:
    out, p, d = Path(c.out), c.preset, get_dist(c.device)
    t_start = time.perf_counter()
    stage = lambda sub: dataclasses.replace(c, out=out / sub)  # noqa: E731
    base = pretrain(stage("pretrain"))
    scorer = rl(stage("rl"), base / "final.pt")
    cache = out / "scorer_cache.pt"
    if not cache.exists():
        score(stage("scorer_cache.pt"), scorer / "final.pt")
    dirs = {}
    for m in methods:
        uses_cache = m in ("remit", "rho1")
        dirs[m] = midtrain(stage(f"midtrain-{m}"), base / "final.pt", m,
                           scorer=None if uses_cache or m == "rmt" else scorer / "final.pt",
                           scorer_cache=cache if uses_cache else None)
    # The scorer-cache speed-up: ReMiT once more with the scorer run live at every step.
    live = None
    if "remit" in methods:
        live = midtrain(stage("midtrain-remit-live"), base / "final.pt", "remit",
                        scorer=scorer / "final.pt")
    post = {}
    if post_rl:
        post_c = dataclasses.replace(c, preset=dataclasses.replace(p, rl_steps=p.post_rl_steps))
        for m, sdir in dirs.items():
            post[m] = rl(dataclasses.replace(post_c, out=out / f"post-rl-{m}"), sdir / "final.pt")
    if not d.is_main:
        return 0

    rows = [{"name": "Pre-trained", "eval": load(base / "final.pt")["eval"]},
            {"name": "RL scorer (reference)", "eval": load(scorer / "final.pt")["eval"]}]
    finals = {m: load(sdir / "final.pt") for m, sdir in dirs.items()}
    for m in methods:
        row = {"name": NAMES[m], "eval": finals[m]["eval"]}
        if m in post:
            row["post_rl_acc"] = load(post[m] / "final.pt")["eval"]["acc"]
        rows.append(row)
    results = {"preset": p.to_dict(), "rows": rows, "seconds_total": None,
               "remit_weights": finals.get("remit", {}).get("weights")}
    if live is not None:
        cached_s, live_s = finals["remit"]["step_seconds"], load(live / "final.pt")["step_seconds"]
        results["scorer_cache"] = {
            "midtrain_step_seconds_cached": cached_s,
            "midtrain_step_seconds_live": live_s,
            "speedup": live_s / cached_s,
            "score_seconds_once": load(cache)["seconds"],
            "acc_cached": finals["remit"]["eval"]["acc"],
            "acc_live": load(live / "final.pt")["eval"]["acc"],
        }
    results["probe"] = _probe_rows(c, base, scorer, dirs, methods)
    results["seconds_total"] = time.perf_counter() - t_start
    md = _markdown(results, p.max_k)
    atomic_write_text(json.dumps(results, indent=1) + "\n", out / "results.json")
    atomic_write_text(md, out / "results.md")
    report.plot(out, {NAMES[m]: dirs[m] for m in methods}, results["remit_weights"],
                base_eval=rows[0]["eval"])
    if "rmt" in dirs:
        report.plot_rmt(out, dirs["rmt"], results["probe"]["rows"][0]["probe"])
    print(md)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


def _probe_rows(c: Common, base: Path, scorer: Path, dirs: dict, methods: list[str]) -> dict:
    """RMT's next-token probe (tiers fixed by the base model) on every model of the table."""
    from .loop import load_model
    from .rmt_stage import TierProbe

    device = get_dist(c.device).device
    probe = TierProbe(c.preset, load_model(base / "final.pt", device), device, c.backend)
    models = [("Pre-trained", base), ("RL scorer (reference)", scorer)]
    models += [(NAMES[m], dirs[m]) for m in methods]
    rows = [{"name": name, "probe": probe(load_model(sdir / "final.pt", device))}
            for name, sdir in models]
    return {"names": list(probe.names), "cap": probe.cap, "rows": rows}


def _markdown(results: dict, max_k: int) -> str:
    p = results["preset"]
    md = [f"# Flywheel results (preset `{p['name']}`, seed {p['seed']})", "",
          "Answer accuracy (%) on held-out problems by difficulty k (number of operations), "
          "greedy decoding; NLL per token on held-out worked solutions, and on the step results "
          "and answers only.", "", report.table_markdown(results["rows"], max_k)]
    w = results.get("remit_weights")
    if w:
        role = ", ".join(f"{k} {v:.4f}" for k, v in w["role_mean"].items())
        md += [f"ReMiT mean weight by token role: {role}.", ""]
    sc = results.get("scorer_cache")
    if sc:
        md += [f"Scorer cache: a ReMiT mid-training step took {1e3 * sc['midtrain_step_seconds_cached']:.1f} ms "
               f"with cached scorer log-probs and {1e3 * sc['midtrain_step_seconds_live']:.1f} ms with "
               f"the scorer run live ({sc['speedup']:.2f}x); scoring the whole mid-training set "
               f"once took {sc['score_seconds_once']:.1f} s. Accuracy cached {100 * sc['acc_cached']:.1f}% "
               f"vs live {100 * sc['acc_live']:.1f}%.", ""]
    pr = results.get("probe")
    if pr:
        md += ["Next-token accuracy (%) on held-out positions, by entropy tier of the "
               "pre-trained model: the argmax of the next-token distribution (direct), and the "
               f"prediction after a greedy thought `<...>` of at most {pr['cap']} tokens "
               "(think); mean thought length in tokens.", "",
               report.probe_markdown(pr["rows"], pr["names"])]
    md.append(f"Total time (every stage not already done): {results['seconds_total']:.0f} s.")
    return "\n".join(md) + "\n"
