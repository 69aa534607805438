"""``remit-ext flywheel --seeds K``: the t-distribution statistics against independent
computations (published quantiles, sampling, numpy), the aggregation, and the multi-seed run on
the tiny preset."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from remit_ext.train.runtime import load
from remit_ext.train.seeds import (aggregate, markdown, mcnemar, paired_difference, t_cdf,
                                   t_quantile)

from test_train import ENV

# Two-sided 95% critical values t_{0.975, df} from the standard tables (e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_published_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=6e-4)


def test_t_cdf_against_closed_forms_and_sampling():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for x in (-3.0, -0.5, 0.2, 1.0, 7.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-9)
    # Large df tends to the normal.
    assert t_cdf(1.96, 10_000) == pytest.approx(0.5 * (1 + math.erf(1.96 / math.sqrt(2))),
                                                abs=1e-4)
    # df = 4 against 400k draws of torch's Student t.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(400_000, 4, generator=gen, dtype=torch.float64) ** 2).sum(1)
    draws = z / torch.sqrt(chi2 / 4)
    q = t_quantile(0.975, 4)
    assert float((draws <= q).double().mean()) == pytest.approx(0.975, abs=1.5e-3)


def test_paired_difference_matches_numpy():
    a = [0.71, 0.64, 0.80, 0.55, 0.69]
    b = [0.70, 0.60, 0.78, 0.58, 0.61]
    d = paired_difference(a, b)
    diff = np.array(a) - np.array(b)
    half = T975[4] * diff.std(ddof=1) / math.sqrt(5)
    assert d["n"] == 5 and d["per_seed"] == pytest.approx(diff.tolist())
    assert d["mean"] == pytest.approx(diff.mean())
    assert d["sd"] == pytest.approx(diff.std(ddof=1))
    assert d["ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half], abs=2e-5)
    one = paired_difference([0.5], [0.25])
    assert one["mean"] == 0.25 and one["ci95"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def _fake_results(seed, accs):
    rows = []
    for name, acc in accs.items():
        row = {"name": name, "eval": {"acc": acc, "nll": 1 - acc, "nll_critical": 0.5,
                                      "think_frac": 0.0}}
        if name not in ("Pre-trained", "RL reference"):
            row["post_rl"] = {"acc": acc + 0.01}
        rows.append(row)
    return {"preset": {"name": "x", "seed": seed}, "rows": rows, "seconds_total": 60.0}


def test_aggregate_pairs_by_seed():
    per_seed = {0: {"Pre-trained": 0.5, "RL reference": 0.6, "Vanilla NTP": 0.7, "ReMiT": 0.75},
                1: {"Pre-trained": 0.3, "RL reference": 0.4, "Vanilla NTP": 0.5, "ReMiT": 0.52},
                2: {"Pre-trained": 0.6, "RL reference": 0.7, "Vanilla NTP": 0.8, "ReMiT": 0.79}}
    agg = aggregate({s: _fake_results(s, v) for s, v in per_seed.items()})
    assert agg["seeds"] == [0, 1, 2]
    assert agg["per_seed"]["ReMiT"]["acc"] == [0.75, 0.52, 0.79]
    want = paired_difference([0.75, 0.52, 0.79], [0.7, 0.5, 0.8])
    assert agg["paired"]["Vanilla NTP"]["ReMiT"]["acc"] == want
    assert agg["paired"]["Pre-trained"]["Vanilla NTP"]["acc"]["mean"] == pytest.approx(0.2)
    # Only models with a post-RL value on every seed get that comparison.
    assert "post_rl_acc" in agg["paired"]["Vanilla NTP"]["ReMiT"]
    assert "post_rl_acc" not in agg["paired"]["Vanilla NTP"]["RL reference"]
    md = markdown(agg)
    assert "| ReMiT | 75.0 | 52.0 | 79.0 |" in md


def test_flywheel_seeds_on_the_tiny_preset(tmp_path):
    out = tmp_path / "fw"
    done = subprocess.run([sys.executable, "-m", "remit_ext", "flywheel", "--preset", "tiny",
                           "--seeds", "2", "--jobs", "2", "--out", str(out), "--no-progress",
                           "--methods", "ntp", "remit", "rmt", "--turns", "2"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    agg = json.loads((out / "seeds.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["jobs"] == 2 and agg["failed_seeds"] == []
    per = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    assert [per[s]["preset"]["seed"] for s in (0, 1)] == [0, 1]
    assert per[0]["machine"]["threads"] == 1
    names = [r["name"] for r in per[0]["rows"]]
    assert agg["models"] == names == ["Pre-trained", "RL reference", "Vanilla NTP", "ReMiT",
                                      "RMT", "RL reference (turn 2)",
                                      "ReMiT, NTP as reference (no RL)", "ReMiT² (turn 2)"]
    # The second turn: RL on the ReMiT model is the next reference; ReMiT² mid-trains the same
    # base steered by its cached log-probs; post-RL tunes it too.
    sdir = out / "seed0"
    turn2 = json.loads((sdir / "rl-turn2" / "config.json").read_text())
    assert turn2["init"] == str(sdir / "midtrain-remit" / "final.pt")
    assert turn2["rl_steps"] == per[0]["preset"]["rl_steps"]  # the reference's length
    assert load(sdir / "scorer_cache_turn2.pt")["scorer"] == str(sdir / "rl-turn2" / "final.pt")
    assert json.loads((sdir / "midtrain-remit2" / "config.json").read_text())["init"] == str(
        sdir / "pretrain" / "final.pt")
    assert "post_rl_acc" in agg["per_seed"]["ReMiT² (turn 2)"]
    # Per-problem paired tests pooled over seeds, before and after RL, against NTP and ReMiT.
    n_eval = 2 * per[0]["preset"]["n_eval"]
    mc = agg["mcnemar"]["Vanilla NTP"]["ReMiT"]
    assert set(mc) == {"before_rl", "after_rl"}
    assert mc["before_rl"]["gained"] + mc["before_rl"]["lost"] <= n_eval
    assert "ReMiT² (turn 2)" in agg["mcnemar"]["ReMiT"]
    assert set(agg["rl_change"]) >= {"Vanilla NTP", "ReMiT", "ReMiT² (turn 2)"}
    assert set(agg["remit_weights_by_role"]) == {"ReMiT", "ReMiT, NTP as reference (no RL)",
                                                  "ReMiT² (turn 2)"}
    assert set(agg["remit_weights_by_role"]["ReMiT"]) >= {"result", "answer"}
    assert all(len(next(r for r in per[0]["rows"] if r["name"] == nm)["eval"]["correct"])
               == n_eval // 2 for nm in names)
    for name in names:
        accs = [next(r for r in per[s]["rows"] if r["name"] == name)["eval"]["acc"]
                for s in (0, 1)]
        assert agg["per_seed"][name]["acc"] == accs
    ntp = agg["per_seed"]["Vanilla NTP"]["acc"]
    remit = agg["per_seed"]["ReMiT"]["acc"]
    d = agg["paired"]["Vanilla NTP"]["ReMiT"]["acc"]
    assert d["mean"] == pytest.approx((remit[0] - ntp[0] + remit[1] - ntp[1]) / 2)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    md = (out / "seeds.md").read_text()
    assert "| ReMiT |" in md and "Δ acc vs NTP" in md and md in done.stdout


def test_mcnemar_exact_against_binomial_enumeration():
    """The exact two-sided test: twice the smaller binomial tail of the discordant split,
    checked against an enumeration of every split with p = 1/2 (probabilities of splits no
    more likely than the observed one, the other textbook form; equal for p = 1/2)."""
    a = "1" * 10 + "0" * 2 + "1" * 30 + "0" * 8
    b = "0" * 10 + "1" * 2 + "1" * 30 + "0" * 8
    got = mcnemar(a, b)
    assert (got["gained"], got["lost"]) == (10, 2)
    n = 12
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    want = sum(q for q in probs if q <= probs[2] * (1 + 1e-12))
    assert got["p"] == pytest.approx(want) and got["p"] == pytest.approx(158 / 4096)
    assert mcnemar(b, a)["p"] == got["p"]  # symmetric
    assert mcnemar("1100", "1100") == {"gained": 0, "lost": 0, "p": 1.0}
    assert mcnemar("10", "01")["p"] == 1.0
    with pytest.raises(ValueError, match="same problems"):
        mcnemar("101", "10")
