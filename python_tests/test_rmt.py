"""RMT (remit_ext.rmt and ``midtrain --method rmt``): every component against hand-computed
cases or an independent fp64 formula, the sampler's schedule, the budget and reward formulas,
the KV-cached rollouts, a short run on the tiny preset and its resume after a kill."""

import dataclasses
import math
import signal
import subprocess

import pytest
import torch

from remit_ext import rmt as R
from remit_ext.reference import token_stats_ref, topk_entropy_ref
from remit_ext.train import data as D
from remit_ext.train.model import TinyGPT
from remit_ext.train.presets import get_preset
from remit_ext.train.rmt_stage import TierProbe, rollout, rollout_prefixes
from remit_ext.train.runtime import load
from remit_ext.train.stages import Common, midtrain, pretrain

from test_train import ENV, _read_log, assert_kill_and_resume_reproduces

TINY = get_preset("tiny")


# ----------------------------------------------------------------------------- difficulty


def test_entropy_tiers_by_hand():
    h = torch.tensor([0.2, 0.5, 0.99, 1.0, 1.49, 1.5, 3.0, float("nan"), 1.2])
    valid = torch.tensor([True] * 8 + [False])
    tiers = R.entropy_tiers(h, valid)
    assert tiers.tolist() == [-1, 0, 0, 1, 1, 2, 2, -1, -1]
    assert R.entropy_tiers(h, thresholds=(1.0,)).tolist() == [-1, -1, -1, 0, 0, 0, 0, -1, 0]
    for bad in ((), (1.0, 0.5), (0.5, float("inf"))):
        with pytest.raises(ValueError, match="thresholds: expected finite, strictly increasing"):
            R.entropy_tiers(h, thresholds=bad)
    with pytest.raises(ValueError, match="valid: expected shape"):
        R.entropy_tiers(h, valid[:3])


@pytest.mark.parametrize("topk", [None, 3])
def test_token_entropy_matches_the_reference(topk):
    torch.manual_seed(0)
    z = torch.randn(2, 5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5))
    y[0, 1] = -100
    h = R.token_entropy(z, y, topk=topk)
    if topk is None:
        want = token_stats_ref(z.reshape(10, 7), y.reshape(10))[2].reshape(2, 5)
    else:
        want = topk_entropy_ref(z.reshape(10, 7), topk).reshape(2, 5) * (y != -100)
    torch.testing.assert_close(h.double(), want)
    assert not h.requires_grad


# ----------------------------------------------------------------------------- curriculum


def test_tier_mix_schedule():
    s, e = R.DEFAULT_MIX_START, R.DEFAULT_MIX_END
    assert R.tier_mix(0, 100) == pytest.approx(s)
    assert R.tier_mix(30, 100) == pytest.approx(s)  # constant up to 30%
    assert R.tier_mix(50, 100) == pytest.approx([(a + b) / 2 for a, b in zip(s, e)])
    assert R.tier_mix(60, 100) == pytest.approx([0.25 * a + 0.75 * b for a, b in zip(s, e)])
    assert R.tier_mix(70, 100) == pytest.approx(e)
    assert R.tier_mix(100, 100) == pytest.approx(e)
    hard = [R.tier_mix(t, 100)[2] for t in range(101)]
    assert all(b >= a for a, b in zip(hard, hard[1:]))
    with pytest.raises(ValueError, match="mix_start: expected 3 non-negative numbers summing"):
        R.tier_mix(0, 10, (0.5, 0.4, 0.2))
    with pytest.raises(ValueError, match="mix_end: expected 3"):
        R.tier_mix(0, 10, s, (0.5, 0.5))
    with pytest.raises(ValueError, match="total_steps: expected a positive int"):
        R.tier_mix(0, 0)
    with pytest.raises(ValueError, match="t1, t2"):
        R.tier_mix(0, 10, t1=0.8, t2=0.2)


def test_sample_positions_follows_the_mix_without_repeats():
    tiers = torch.arange(3).repeat_interleave(4000)[torch.randperm(12000)]
    g = torch.Generator().manual_seed(1)
    pos, tier = R.sample_positions(tiers, 3000, (0.6, 0.3, 0.1), g)
    assert pos.numel() == 3000 and pos.unique().numel() == 3000
    assert torch.equal(tiers[pos], tier)
    freq = torch.bincount(tier, minlength=3).double() / 3000
    # Binomial std <= sqrt(0.25 / 3000) ~ 0.009: 4 sigma.
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.04)
    again, _ = R.sample_positions(tiers, 3000, (0.6, 0.3, 0.1), torch.Generator().manual_seed(1))
    assert torch.equal(pos, again)


def test_sample_positions_when_tiers_run_out():
    tiers = torch.tensor([0, -1, 1, 1, 1, 2, -1])
    # Tier 0 has one candidate: the other draws renormalise over tiers 1 and 2.
    pos, tier = R.sample_positions(tiers, 5, (0.98, 0.01, 0.01), torch.Generator().manual_seed(0))
    assert sorted(pos.tolist()) == [0, 2, 3, 4, 5]
    # A tier with probability 0 is never drawn, even when the others are exhausted.
    pos, tier = R.sample_positions(tiers, 5, (1.0, 0.0, 0.0))
    assert pos.tolist() == [0] and tier.tolist() == [0]
    pos, _ = R.sample_positions(torch.full((4,), -1), 3, (0.5, 0.5, 0.0))
    assert pos.numel() == 0
    with pytest.raises(ValueError, match="tiers: expected values in \\[-1, 3\\)"):
        R.sample_positions(torch.tensor([3]), 1, (0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="n: expected a non-negative int"):
        R.sample_positions(tiers, -1, (0.5, 0.5, 0.0))


def test_curriculum_sampler_uses_the_schedule():
    entropy = torch.tensor([0.7, 0.8, 1.2, 1.3, 2.0, 2.5, 0.1])
    s = R.CurriculumSampler(10, mix_start=(1.0, 0.0, 0.0), mix_end=(0.0, 0.0, 1.0))
    early, _ = s.sample(entropy, None, 2, 0, torch.Generator().manual_seed(0))
    late, _ = s.sample(entropy, None, 2, 9, torch.Generator().manual_seed(0))
    assert sorted(early.tolist()) == [0, 1] and sorted(late.tolist()) == [4, 5]


# ----------------------------------------------------------------------------- budget, reward


def test_token_budget_formula():
    assert R.token_budget(0, 100) == 800
    assert R.token_budget(100, 100) == 160  # 800 * 0.2, not 159 from rounding
    assert R.token_budget(50, 100) == math.floor(800 * math.sqrt(0.2))  # 357
    assert R.token_budget(30, 100) == math.floor(800 * 0.2 ** 0.3)
    assert R.token_budget(10, 10, b0=10, b_min=3, gamma=0.01) == 3  # floor(0.1) -> B_min
    budgets = [R.token_budget(t, 50) for t in range(51)]
    assert all(b <= a for a, b in zip(budgets, budgets[1:]))
    with pytest.raises(ValueError, match="b0, b_min"):
        R.token_budget(0, 10, b0=5, b_min=6)
    with pytest.raises(ValueError, match="gamma"):
        R.token_budget(0, 10, gamma=0.0)


def test_length_reward_is_triangular():
    ell = torch.tensor([0, 5, 10, 15, 20, 25])
    assert R.length_reward(ell, 10).tolist() == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    assert R.length_reward(ell, 10, r_max=2.0).tolist() == pytest.approx([0, 1, 2, 1, 0, 0])
    assert R.length_reward(torch.tensor([1, 2, 3]), 1).tolist() == pytest.approx([1, 0, 0])
    with pytest.raises(ValueError, match="budget: expected a positive int"):
        R.length_reward(ell, 0)


def test_rmt_reward_by_hand():
    match = torch.tensor([True, False, True, False])
    ell = torch.tensor([10, 0, 30, 5])
    r = R.rmt_reward(match, ell, budget=10, omega=0.1)
    assert r.tolist() == pytest.approx([0.9 + 0.1 * 1.0, 0.0, 0.9, 0.1 * 0.5])
    with pytest.raises(ValueError, match="omega"):
        R.rmt_reward(match, ell, 10, omega=1.5)
    with pytest.raises(ValueError, match="lengths: expected shape"):
        R.rmt_reward(match, ell[:2], 10)


def test_group_advantages_by_hand():
    adv = R.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]))
    std = math.sqrt(0.75 * 0.25)  # population std of one 1 among four
    assert adv[0].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std],
                                            rel=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_centre_only():
    r = torch.tensor([[0.9, 0.0, 0.0, 0.05]])
    assert R.group_advantages(r, scale=False)[0].tolist() == pytest.approx(
        [0.9 - 0.2375, -0.2375, -0.2375, 0.05 - 0.2375])


def test_rmt_advantages_keep_the_length_term_from_deciding():
    """The issue's case: a group with no correct prediction whose rewards differ only by the
    length term. Whitening blows that up to O(1) advantages; centring keeps it within omega,
    gating gives the group nothing."""
    match = torch.zeros(1, 8, dtype=torch.bool)
    ell = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1]])
    budget, omega = 35, 0.1
    whiten = R.rmt_advantages(match, ell, budget, omega, "whiten")
    assert float(whiten.max()) > 2.5  # 1 / 35 of the length reward: +2.65 after whitening
    centre = R.rmt_advantages(match, ell, budget, omega, "centre")
    assert float(centre.abs().max()) <= omega / budget + 1e-7
    gate = R.rmt_advantages(match, ell, budget, omega, "gate")
    assert torch.equal(gate, torch.zeros_like(gate))
    # A mixed group: under every mode the correct rollouts get the larger advantages, and with
    # the gate the length term ranks the correct ones only (an incorrect one's length is moot).
    match = torch.tensor([[True, True, False, False]])
    ell = torch.tensor([[10, 2, 10, 0]])
    for mode in R.ADVANTAGE_MODES:
        a = R.rmt_advantages(match, ell, 10, omega, mode)[0]
        assert float(a[:2].min()) > float(a[2:].max())
    g = R.rmt_advantages(match, ell, 10, omega, "gate")[0]
    assert float(g[0]) > float(g[1]) and float(g[2]) == pytest.approx(float(g[3]))
    # Independently: gate = whitening of (1 - omega) m + omega m r_len.
    r = (1 - omega) * match.float() + omega * match.float() * torch.tensor([[1.0, 0.2, 1, 0]])
    want = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(g, want[0])
    with pytest.raises(ValueError, match="mode: expected one of"):
        R.rmt_advantages(match, ell, 10, omega, "rank")


# ----------------------------------------------------------------------------- losses


def _rollout_case(seed=0, groups=3, g=4, length=6, vocab=9):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups * g, length, vocab, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, vocab, (groups * g, length), generator=gen)
    lengths = torch.randint(1, length + 1, (groups * g,), generator=gen)
    actions[torch.arange(length)[None, :] >= lengths[:, None]] = -100
    actions[:, 0] = -100  # a prompt slot
    adv = torch.randn(groups * g, generator=gen, dtype=torch.float64)
    return logits, actions, adv


@pytest.mark.parametrize("token_mean", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_rl_loss_matches_the_formula(token_mean, backend):
    logits, actions, adv = _rollout_case()
    n_pos, g = 3, 4
    z = logits.clone().requires_grad_(True)
    out = R.rl_loss(z, actions, adv, group_size=g, n_positions=n_pos, token_mean=token_mean,
                    backend=backend)
    # Independently: (1/|C|) sum_pos -(1/G) sum_i A_i sum_tok log pi (or the token mean).
    z2 = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z2, -1)
    mask = actions != -100
    tok = logp.gather(-1, actions.clamp(min=0)[..., None])[..., 0] * mask
    per_rollout = tok.sum(1) / (mask.sum(1).clamp(min=1) if token_mean else 1)
    want = -(adv * per_rollout).sum() / (g * n_pos)
    want.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logprobs.double(), tok.detach(), rtol=1e-5, atol=1e-6)


def test_ntp_rest_loss_skips_the_rl_positions():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 6, (2, 5), generator=gen)
    targets[1, 4] = -100
    rl = torch.tensor([0, 7])  # (0, 0) and (1, 2)
    loss = R.ntp_rest_loss(logits, targets, rl, lam=0.1)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    keep = targets != -100
    keep[0, 0] = keep[1, 2] = False
    torch.testing.assert_close(loss.double(), 0.1 * -(logp * keep).sum() / keep.sum())
    with pytest.raises(ValueError, match="lam: expected a number >= 0"):
        R.ntp_rest_loss(logits, targets, rl, lam=-1.0)


def test_rmt_loss_is_the_sum_of_its_terms():
    logits, actions, adv = _rollout_case(seed=5)
    gen = torch.Generator().manual_seed(6)
    lm = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (2, 4), generator=gen)
    pos = torch.tensor([1, 2, 6])
    out = R.rmt_loss(logits, actions, adv, lm, y, pos, group_size=4, lam=0.1)
    rl = R.rl_loss(logits, actions, adv, group_size=4, n_positions=3).loss
    ntp = R.ntp_rest_loss(lm, y, pos, 0.1)
    torch.testing.assert_close(out.loss, rl + ntp)
    torch.testing.assert_close(out.rl, rl)
    with pytest.raises(ValueError, match="advantages: expected shape \\[12\\]"):
        R.rl_loss(logits, actions, adv[:5], group_size=4, n_positions=3)


def test_rmt_loss_per_position_normalisation():
    """normalize="position": (sum_C l_RL + lam sum_rest l_NTP) / N_valid, from an independent
    fp64 computation."""
    logits, actions, adv = _rollout_case(seed=7)  # 3 groups of 4
    gen = torch.Generator().manual_seed(8)
    lm = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (2, 5), generator=gen)
    y[1, 3:] = -100
    pos = torch.tensor([1, 2, 6])
    out = R.rmt_loss(logits, actions, adv, lm, y, pos, group_size=4, lam=0.1,
                     token_mean=True, normalize="position")
    n_valid = 8
    logp = torch.log_softmax(logits, -1)
    mask = actions != -100
    tok = logp.gather(-1, actions.clamp(min=0)[..., None])[..., 0] * mask
    per_rollout = tok.sum(1) / mask.sum(1).clamp(min=1)
    rl_sum = -(adv * per_rollout).view(3, 4).mean(1).sum()  # sum over C of -(1/G) sum_i ...
    nll = -torch.log_softmax(lm, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    rest = (y != -100).flatten().clone()
    rest[pos] = False
    ntp_sum = (nll.flatten() * rest).sum()
    torch.testing.assert_close(out.rl.double(), rl_sum / n_valid)
    torch.testing.assert_close(out.ntp.double(), 0.1 * ntp_sum / n_valid)
    # num_items_in_batch replaces N_valid (the global count under DDP).
    other = R.rmt_loss(logits, actions, adv, lm, y, pos, group_size=4, lam=0.1,
                       token_mean=True, normalize="position", num_items_in_batch=16)
    torch.testing.assert_close(other.loss, out.loss / 2)
    with pytest.raises(ValueError, match="normalize: expected one of"):
        R.rmt_loss(logits, actions, adv, lm, y, pos, group_size=4, normalize="batch")


def test_rollout_scale():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert R.rollout_scale(mask, 2, 1).tolist() == [[0.5, 0.5, 0.0], [0.5, 0.0, 0.0]]
    assert R.rollout_scale(mask, 2, 1, token_mean=True).tolist() == [[0.25, 0.25, 0.0],
                                                                      [0.5, 0.0, 0.0]]


# ----------------------------------------------------------------------------- rollouts


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(TINY.model_config()).eval()


class _ThinkHeavy(torch.nn.Module):
    """A model whose logits for '<' (+3) and '>' (+2) are raised."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kw):
        z = self.inner(*args, **kw).clone()
        z[..., D.THINK_OPEN_ID] += 3.0
        z[..., D.THINK_CLOSE_ID] += 2.0
        return z


@pytest.mark.parametrize("text_only", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollouts_have_the_format_and_match_a_full_forward(temperature, text_only):
    model = _ThinkHeavy(_model())  # favours '<' and '>', so that the ban below is tested
    inputs = torch.randint(2, D.VOCAB_SIZE, (3, 12))
    prefixes = rollout_prefixes(inputs, torch.tensor([4, 17, 35]), 2)
    assert [len(x) for x in prefixes] == [5, 5, 6, 6, 12, 12]
    assert torch.equal(prefixes[2], inputs[1, :6])
    cap = 5
    ro = rollout(model, prefixes, cap, temperature, torch.Generator().manual_seed(0),
                 torch.device("cpu"), text_only=text_only)
    width = ro.prompt.shape[1]
    for i, x in enumerate(prefixes):
        assert torch.equal(ro.prompt[i, ro.pad[i]:], torch.cat([x, torch.tensor([D.THINK_OPEN_ID])]))
        gen, act = ro.gen[i].tolist(), ro.action[i].tolist()
        ell = int(ro.thought_len[i])
        assert ell <= cap and D.THINK_CLOSE_ID not in gen[:ell]
        assert gen[ell] == D.THINK_CLOSE_ID and gen[ell + 1] == int(ro.pred[i])
        think = (D.THINK_OPEN_ID, D.THINK_CLOSE_ID)
        if text_only:  # the only think token after the opening '<' is the closing '>'
            assert D.THINK_OPEN_ID not in gen[:ell + 2] and int(ro.pred[i]) not in think
        elif temperature == 0:  # without the ban the greedy thought is '<' at once
            assert ell == 0 or gen[0] == D.THINK_OPEN_ID
        # Sampled tokens are actions; a '>' forced at the cap and the padding are not.
        assert act[:ell] == [True] * ell and act[ell + 1] is True
        assert act[ell] == (not bool(ro.forced_close[i]))
        assert bool(ro.forced_close[i]) == (ell == cap and act[ell] is False)
        assert not any(act[ell + 2:])
    # The training forward (the whole sequences, left-padded) gives the cached decoding's
    # choices back: greedy tokens are its argmax at every action slot (with text_only, the
    # argmax without '<', and at the prediction slot without '>' either).
    x, actions = ro.training_batch()
    assert x.shape[1] == actions.shape[1] == width + ro.gen.shape[1] - 1
    if temperature == 0:
        logits = model(x, pad=ro.pad)
        if text_only:
            logits[..., D.THINK_OPEN_ID] = float("-inf")
            for i in range(len(prefixes)):
                ell = int(ro.thought_len[i])
                logits[i, width + ell, D.THINK_CLOSE_ID] = float("-inf")  # predicts gen[ell+1]
        chosen = logits.argmax(-1)
        sel = actions != D.IGNORE_INDEX
        assert sel.any() and torch.equal(chosen[sel], actions[sel])


def test_tier_probe_counts_by_tier():
    p = TINY
    model = _model(1)
    probe = TierProbe(p, model, torch.device("cpu"))
    assert probe.positions.numel() == probe.tier.numel() > 0
    res = probe(model)
    for name in probe.names:
        n = res[f"n_{name}"]
        assert n == int((probe.tier == R.TIER_NAMES.index(name)).sum()) <= p.rmt_eval_positions
        for key in (f"tok_acc_{name}", f"tok_acc_think_{name}"):
            assert (res[key] is None) == (n == 0)
    assert 0 <= res["tok_acc"] <= 1 and 0 <= res["think_len"] <= probe.cap


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmt")
    return pretrain(Common(TINY, root / "pretrain", progress=False))


def test_midtrain_rmt_runs_and_logs(base, tmp_path):
    out = midtrain(Common(TINY, tmp_path / "rmt", progress=False), base / "final.pt", "rmt")
    final = load(out / "final.pt")
    assert final["method"] == "rmt" and "acc" in final["eval"]
    assert set(final["probe"]) >= {"tok_acc", "tok_acc_think", "think_len"}
    log = [r for r in _read_log(out) if "budget" in r]
    assert log[-1]["step"] == TINY.midtrain_steps
    budgets = [r["budget"] for r in log]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == R.token_budget(log[0]["step"] - 1, TINY.midtrain_steps,
                                        TINY.rmt_budget0, TINY.rmt_budget_min, TINY.rmt_gamma)
    assert any("probe_tok_acc" in r for r in _read_log(out))
    with pytest.raises(ValueError, match="--method rmt: takes no --scorer"):
        midtrain(Common(TINY, tmp_path / "x", progress=False), base, "rmt", scorer=base)
    with pytest.raises(ValueError, match="--fused-linear"):
        midtrain(dataclasses.replace(Common(TINY, tmp_path / "y", progress=False),
                                     fused_linear=True), base, "rmt")


def test_midtrain_rmt_resumes_after_a_kill(base, tmp_path):
    """SIGKILL after the first checkpoint, re-run: the same weights and log as without it."""
    args = ["midtrain", "--method", "rmt", "--preset", "tiny", "--init", str(base),
            "--set", "midtrain_steps=16", "--set", "ckpt_every=3", "--set", "eval_every=0",
            "--no-progress", "--device", "cpu"]
    assert_kill_and_resume_reproduces(args, 16, tmp_path, signal.SIGKILL)


def test_midtrain_rmt_under_two_process_ddp(base, tmp_path):
    """Each rank samples its share of C from its shard; the NTP forward goes through DDP and
    the rollouts' through the bare model, and one backward reduces both."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "remit_ext", "midtrain", "--method", "rmt", "--preset", "tiny", "--init",
           str(base), "--out", str(tmp_path / "ddp"), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load(tmp_path / "ddp" / "final.pt")
    assert final["world_size"] == 2 and final["method"] == "rmt"
    init = load(base / "final.pt")["model"]
    assert any(not torch.equal(final["model"][k], init[k]) for k in init)
    log = _read_log(tmp_path / "ddp")
    assert len({r["step"] for r in log}) == len(log)  # one writer
