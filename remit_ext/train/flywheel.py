"""``remit-ext flywheel``: every stage on one preset, then the results table and figures.

The order is the ReMiT paper's (arXiv 2602.03075): pretrain -> NTP mid-training of the base
(the "official" anneal) -> RL on that model = the frozen reference -> every method mid-trains
from the *pre*-mid-training checkpoint steered by the reference (ReMiT, Rho-1 and KD through
it; NTP is the official anneal itself; RMT needs no reference) -> RL on each mid-trained model
(``--post-rl``) -> the table. ``--reference-from pretrain`` is the ablation of the earlier order,
the reference RL-tuned from the pre-trained base instead. Every model is also measured on RMT's
held-out next-token probe. Stages already finished are skipped, so an interrupted flywheel
resumes where it stopped; ``--seeds K`` runs K seeds (``seeds.py``).

With ReMiT among the methods (issue 24) the table also holds the control "ReMiT steered by
the NTP model itself (no RL)", so that a gain can be attributed to what RL changed, and with
``--turns 2`` the flywheel's second turn: RL on the ReMiT model (the reference's recipe and
length) is the next reference, ReMiT mid-trains the same base steered by it (ReMiT²), and
post-RL tunes that too. Post-RL runs draw from their own random stream.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from . import report
from .runtime import atomic_write_text, get_dist, load
from .stages import Common, midtrain, pretrain, rl, score

NAMES = {"ntp": "Vanilla NTP", "rho1": "Rho-1", "remit": "ReMiT", "kd": "KD", "rmt": "RMT"}
REFERENCE = "RL reference"
CONTROL = "ReMiT, NTP as reference (no RL)"
REFERENCE2 = "RL reference (turn 2)"
REMIT2 = "ReMiT² (turn 2)"
REFERENCE_FROM = ("midtrain", "pretrain")


def flywheel(c: Common, methods: list[str], post_rl: bool = False,
             reference_from: str = "midtrain", scorer_cache_check: bool = False,
             turns: int = 1, control: bool = True) -> int:
    if reference_from not in REFERENCE_FROM:
        raise ValueError(f"--reference-from: expected one of {REFERENCE_FROM}, got "
                         f"{reference_from!r}")
    if turns not in (1, 2):
        raise ValueError(f"--turns: expected 1 or 2, got {turns!r}")
    if turns == 2 and "remit" not in methods:
        raise ValueError("--turns 2: the second turn RL-tunes the ReMiT model; add remit to "
                         "--methods")
    out, p, d = Path(c.out), c.preset, get_dist(c.device)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    stage = lambda sub: dataclasses.replace(c, out=out / sub)  # noqa: E731
    base = pretrain(stage("pretrain"))
    # The official anneal: NTP mid-training of the base (also the table's NTP row).
    anneal = midtrain(stage("midtrain-ntp"), base / "final.pt", "ntp")
    ref_init = anneal if reference_from == "midtrain" else base
    scorer = rl(stage("rl"), ref_init / "final.pt")
    cache = out / "scorer_cache.pt"
    if not cache.exists():
        score(stage("scorer_cache.pt"), scorer / "final.pt")
    dirs = {}
    for m in methods:
        if m == "ntp":
            dirs[m] = anneal
            continue
        uses_cache = m in ("remit", "rho1")
        dirs[m] = midtrain(stage(f"midtrain-{m}"), base / "final.pt", m,
                           scorer=None if uses_cache or m == "rmt" else scorer / "final.pt",
                           scorer_cache=cache if uses_cache else None)
    # Named rows beyond the methods: the no-RL control and the second turn, each ReMiT from
    # the base steered by a cache of another model's log-probs.
    def remit_steered_by(model: Path, cache_name: str, sub: str) -> Path:
        cache_path = out / cache_name
        if not cache_path.exists():
            score(stage(cache_name), model / "final.pt")
        return midtrain(stage(sub), base / "final.pt", "remit", scorer_cache=cache_path)

    extra: dict = {}
    if "remit" in methods and control:
        extra[CONTROL] = remit_steered_by(anneal, "scorer_cache_ntp.pt", "midtrain-remit-ntpref")
    scorer2 = None
    if turns == 2:
        scorer2 = rl(stage("rl-turn2"), dirs["remit"] / "final.pt", stream="rl-turn2")
        extra[REMIT2] = remit_steered_by(scorer2, "scorer_cache_turn2.pt", "midtrain-remit2")
    # The scorer-cache speed-up (opt-in): ReMiT once more with the scorer run live.
    live = None
    if "remit" in methods and scorer_cache_check:
        live = midtrain(stage("midtrain-remit-live"), base / "final.pt", "remit",
                        scorer=scorer / "final.pt")
    post = {}
    if post_rl:
        post_c = dataclasses.replace(c, preset=dataclasses.replace(p, rl_steps=p.post_rl_steps))
        for m, sdir in dirs.items():
            post[m] = rl(dataclasses.replace(post_c, out=out / f"post-rl-{m}"), sdir / "final.pt",
                         stream="post-rl")
        for name, sdir in extra.items():
            sub = "post-rl-remit-ntpref" if name == CONTROL else "post-rl-remit2"
            post[name] = rl(dataclasses.replace(post_c, out=out / sub), sdir / "final.pt",
                            stream="post-rl")
    if not d.is_main:
        return 0

    rows = [{"name": "Pre-trained", "eval": load(base / "final.pt")["eval"]},
            {"name": REFERENCE, "eval": load(scorer / "final.pt")["eval"]}]
    finals = {m: load(sdir / "final.pt") for m, sdir in dirs.items()}

    def row(name: str, final: dict, post_dir=None) -> dict:
        r = {"name": name, "eval": final["eval"]}
        if post_dir is not None:
            r["post_rl"] = load(post_dir / "final.pt")["eval"]
            r["post_rl_acc"] = r["post_rl"]["acc"]
        return r

    rows += [row(NAMES[m], finals[m], post.get(m)) for m in methods]
    if scorer2 is not None:
        rows.append(row(REFERENCE2, load(scorer2 / "final.pt")))
    rows += [row(name, load(sdir / "final.pt"), post.get(name)) for name, sdir in extra.items()]
    results = {"preset": p.to_dict(), "order": {"reference_from": reference_from,
                                                "reference_init": str(ref_init)},
               "rows": rows, "seconds_total": None,
               "remit_weights": finals.get("remit", {}).get("weights"),
               "remit_curve": _weight_curve(dirs.get("remit")),
               "remit_weights_by_reference": {
                   name: load(sdir / "final.pt").get("weights")
                   for name, sdir in [("ReMiT", dirs.get("remit")), *extra.items()] if sdir},
               "machine": machine_info(p)}
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
    more = ([(REFERENCE2, scorer2)] if scorer2 is not None else []) + list(extra.items())
    results["probe"] = _probe_rows(c, base, scorer, dirs, methods, more)
    results["seconds_total"] = time.perf_counter() - t_start
    # CPU seconds of this process (every stage not already done): the cost of a seed on one
    # thread, whatever else the machine was running.
    results["cpu_seconds_total"] = time.process_time() - cpu_start
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


def machine_info(p) -> dict:
    """What a reader needs to reproduce a number: torch and Python versions, the CPU, the
    thread count the run used."""
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "threads": torch.get_num_threads(), "preset_threads": p.threads,
            "cuda": torch.cuda.is_available()}


def _weight_curve(stage_dir) -> list | None:
    """ReMiT's mean weight on step results and answers at each logged step (``w_result``,
    ``w_answer`` in the metrics), to see whether the critical tokens' weight fades as the
    learner catches up with the reference."""
    if stage_dir is None:
        return None
    return [{k: r[k] for k in ("step", "w_result", "w_answer") if k in r}
            for r in report.read_metrics(stage_dir) if "w_result" in r]


def _probe_rows(c: Common, base: Path, scorer: Path, dirs: dict, methods: list[str],
                more: list = ()) -> dict:
    """RMT's next-token probe (tiers fixed by the base model) on every model of the table."""
    from .loop import load_model
    from .rmt_stage import TierProbe

    device = get_dist(c.device).device
    probe = TierProbe(c.preset, load_model(base / "final.pt", device), device, c.backend)
    models = [("Pre-trained", base), (REFERENCE, scorer)]
    models += [(NAMES[m], dirs[m]) for m in methods] + list(more)
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
    o = results.get("order", {})
    md.append(f"Reference: RL on the {'NTP mid-trained model' if o.get('reference_from') == 'midtrain' else 'pre-trained base'} "
              f"(`--reference-from {o.get('reference_from')}`). Greedy completions in the "
              "think format (`<` or `>`), % of held-out problems: " + ", ".join(
                  f"{r['name']} {100 * r['eval'].get('think_frac', float('nan')):.1f}"
                  for r in results["rows"]) + ".")
    md.append("")
    m = results.get("machine", {})
    md.append(f"Total time (every stage not already done): {results['seconds_total']:.0f} s "
              f"(torch {m.get('torch')}, {m.get('threads')} thread(s), {m.get('cpu')}).")
    return "\n".join(md) + "\n"
