"""The training loop: corpus, model, checkpoints, each stage on the tiny preset, resume after a
kill, the 2-process DistributedDataParallel run, and the flywheel report."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import remit_ext
from remit_ext import reference as ref
from remit_ext.train import data as D
from remit_ext.train.model import ModelConfig, TinyGPT
from remit_ext.train.presets import get_preset
from remit_ext.train.runtime import atomic_save, load, step_generator
from remit_ext.rmt import group_advantages
from remit_ext.train.stages import Common, evaluate, load_model, midtrain, pretrain, rl, score

TINY = get_preset("tiny")
ENV = {**os.environ, "PYTHONHASHSEED": "random"}


# ----------------------------------------------------------------------------- corpus


def test_problems_are_correct_and_deterministic():
    import random

    rng = random.Random(3)
    for _ in range(200):
        q = D.make_problem(rng, rng.randint(1, 6))
        x = int(q.question[0])
        for i, s in enumerate(q.steps):
            op, y, r = q.question[1 + 2 * i], int(q.question[2 + 2 * i]), int(s[-1])
            assert s == f"{x}{op}{y}={r}"
            assert r == {"+": (x + y) % 10, "-": (x - y) % 10, "*": (x * y) % 10}[op]
            x = r
        assert q.answer == x
        assert D.parse_answer(q.text()[len(q.prompt()):]) == q.answer
        assert D.parse_answer(q.text("thought")[len(q.prompt()):]) == q.answer
        assert q.text("thought") == f"{q.prompt()}A:<{','.join(q.steps)}>{q.answer}\n"
    assert D.generate_texts("midtrain", 50, 1, 4) == D.generate_texts("midtrain", 50, 1, 4)
    assert D.generate_texts("midtrain", 50, 1, 4) != D.generate_texts("midtrain", 50, 2, 4)
    assert D.generate_texts("pretrain", 50, 1, 4) != D.generate_texts("midtrain", 50, 1, 4)


def test_noisy_pretraining_steps_are_sometimes_wrong():
    import random

    rng = random.Random(0)
    wrong = sum(s[-1] != str(eval_step(s)) for _ in range(300)
                for s in D.make_problem(rng, 3, noise=0.3).steps)
    assert 0.2 < wrong / 900 < 0.4


def eval_step(step: str) -> int:
    x, op, y = int(step[0]), step[1], int(step[2])
    return {"+": (x + y) % 10, "-": (x - y) % 10, "*": (x * y) % 10}[op]


def test_pack_rows_shifts_and_pads():
    texts = ["Q:1+2\nA:3\n", "Q:4\nA:4\n"]
    inputs, targets = D.pack_rows(texts, 12)
    assert D.decode(inputs[0, :10]) == "\n" + texts[0][:-1]
    assert D.decode(targets[0, :10]) == texts[0]
    assert (targets[0, 10:] == D.IGNORE_INDEX).all() and (targets[1, 8:] == D.IGNORE_INDEX).all()
    roles = D.token_roles(inputs)
    # Targets "3" (after "A:") and the result digit after "=" in a worked text.
    assert roles[0, 8] == 2 and roles[0].tolist().count(2) == 1
    w_in, _ = D.pack_rows(["Q:1+2\nS:1+2=3\nA:3\n"], 20)
    assert D.token_roles(w_in)[0, 12] == 1
    with pytest.raises(ValueError, match=r"texts\[0\]: 10 characters do not fit seq_len=5"):
        D.pack_rows(texts, 5)


def test_parse_answer():
    assert D.parse_answer("S:1+2=3\nA:3\n") == 3
    assert D.parse_answer("S:1+2=3\nA:\n") is None
    assert D.parse_answer("S:1+2=3") is None
    assert D.parse_answer("A:<1+2=3>3\n") == 3
    assert D.parse_answer("A:<1+2=3,3*3=9\n") is None  # an unclosed thought
    assert D.parse_answer("A:<>7") == 7


# ----------------------------------------------------------------------------- model


def test_kv_cache_matches_full_forward():
    model = TinyGPT(ModelConfig(D.VOCAB_SIZE, 32, 2, 2, 24)).eval()
    x = torch.randint(0, D.VOCAB_SIZE, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = []
        parts = [model(x[:, :9], cache), model(x[:, 9:14], cache, start=9),
                 model(x[:, 14:15], cache, start=14), model(x[:, 15:], cache, start=15)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    gen = model.generate(x[:, :5], 6)
    # Greedy decoding with the cache equals argmax of a full forward at every step.
    seq = x[:, :5]
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq[:, 5:])
    with pytest.raises(ValueError, match="idx: slots up to 25 exceed max_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_left_padded_rows_match_their_unpadded_forward():
    """A left-padded batch (``pad``) gives each row what it gives alone, with and without the
    cache, and padding slots never reach a real row (even when they are NaN-free garbage)."""
    model = TinyGPT(ModelConfig(D.VOCAB_SIZE, 32, 2, 2, 24)).eval()
    rows = [torch.randint(0, D.VOCAB_SIZE, (n,)) for n in (9, 4, 6)]
    batch = torch.full((3, 9), D.PAD_ID)
    for i, r in enumerate(rows):
        batch[i, 9 - len(r):] = r
    pad = torch.tensor([0, 5, 3])
    nxt = torch.randint(0, D.VOCAB_SIZE, (3, 1))
    with torch.no_grad():
        out = model(batch, pad=pad)
        cache = []
        model(batch, cache, pad=pad)
        step = model(nxt, cache, start=9, pad=pad)
        assert torch.isfinite(out).all()
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i, 9 - len(r):], model(r[None])[0], rtol=1e-5,
                                       atol=1e-5)
            alone = model(torch.cat([r, nxt[i]])[None])[0, -1]
            torch.testing.assert_close(step[i, 0], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- runtime


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "bad": _Unpicklable()}, path)
    assert load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_step_generator_is_the_same_in_every_process():
    here = torch.randint(0, 1 << 30, (4,), generator=step_generator(7, "rl", 3, 1)).tolist()
    code = ("import torch; from remit_ext.train.runtime import step_generator; "
            "print(torch.randint(0, 1 << 30, (4,), generator=step_generator(7, 'rl', 3, 1)).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=ENV, check=True).stdout.strip()
    assert other == str(here)
    assert here != torch.randint(0, 1 << 30, (4,), generator=step_generator(7, "rl", 4, 1)).tolist()


def test_group_whitened_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), rtol=0, atol=1e-5)
    assert (a[1] == 0).all()


def test_policy_gradient_is_a_weighted_cross_entropy():
    """The RL loss, -(1/(B G)) sum_i A_i mean_t log pi, through weighted_cross_entropy with
    weight A_i / (B G L_i), against autograd of log_softmax in fp64."""
    g, t, v = 4, 6, 11
    logits = torch.randn(g, t, v, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (g, t))
    lengths = torch.tensor([6, 3, 1, 5])
    y[torch.arange(t)[None] >= lengths[:, None]] = D.IGNORE_INDEX
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))[0]
    w = (adv / (g * lengths))[:, None].expand(g, t).contiguous()
    loss = remit_ext.weighted_cross_entropy(logits, y, w, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    logp = torch.where(y != D.IGNORE_INDEX, logp, 0)
    truth = -(adv * logp.sum(1) / lengths).sum() / g
    (truth_grad,) = torch.autograd.grad(truth, logits)
    torch.testing.assert_close(loss, truth)
    torch.testing.assert_close(grad, truth_grad)


def test_rl_rate_schedule():
    """Ours (issue 24): linear warm-up, then linear decay to 0 at the last step; or constant."""
    from remit_ext.train.stages import rl_lr

    p = get_preset("default", ["rl_steps=110", "rl_warmup=10", "rl_lr=1e-4"])
    lrs = [rl_lr(p, s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-4) and lrs[60] == pytest.approx(0.5e-4)
    assert lrs[109] == pytest.approx(1e-6) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    const = get_preset("default", ["rl_warmup=0", "rl_decay=0", "rl_lr=2e-4"])
    assert {rl_lr(const, s) for s in range(150)} == {2e-4}


def test_rl_token_weights():
    """The old recipe (whitened +/- advantages over G L_i, the weight the RL stage used) and
    ours (clipped at 0, over B G max_new), from the rewards of two groups."""
    from remit_ext.train.stages import rl_token_weights

    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    lengths = torch.tensor([6, 3, 1, 5, 2, 2, 2, 2])
    adv = group_advantages(reward.view(-1, 4)).view(-1)
    old = rl_token_weights(reward, lengths, 4, 7, "whiten", "length")
    torch.testing.assert_close(old, adv / (8 * lengths))
    ours = rl_token_weights(reward, lengths, 4, 7)
    torch.testing.assert_close(ours, adv.clamp(min=0) / (8 * 7))
    assert bool((ours >= 0).all()) and bool((ours[[1, 2]] == 0).all())
    assert bool((ours[4:] == 0).all())  # a group of equal rewards carries no signal
    with pytest.raises(ValueError, match="rl_advantage"):
        rl_token_weights(reward, lengths, 4, 7, "clip")
    with pytest.raises(ValueError, match="rl_normalize"):
        rl_token_weights(reward, lengths, 4, 7, normalize="mean")


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pretrain -> rl -> score on the tiny preset, once for the module."""
    root = tmp_path_factory.mktemp("flywheel")
    c = Common(TINY, root / "pretrain", progress=False)
    base = pretrain(c)
    scorer = rl(dataclasses.replace(c, out=root / "rl"), base)
    cache = score(dataclasses.replace(c, out=root / "cache.pt"), scorer / "final.pt")
    return root, base, scorer, cache


def _read_log(stage_dir):
    return [json.loads(ln) for ln in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_and_rl_stages(trained):
    root, base, scorer, _ = trained
    for sdir, stage, steps in ((base, "pretrain", TINY.pretrain_steps), (scorer, "rl", TINY.rl_steps)):
        final = load(sdir / "final.pt")
        assert final["stage"] == stage
        assert set(final["eval"]) >= {"acc", "nll", "nll_critical", "acc_k1"}
        log = _read_log(sdir)
        assert log[-1]["step"] == steps and all(r["stage"] == stage for r in log)
        assert not (sdir / "checkpoint.pt").exists()  # superseded by final.pt
    assert "reward" in _read_log(scorer)[-1]
    pre_loss = [r["loss"] for r in _read_log(base)]
    assert pre_loss[-1] < pre_loss[0]
    # Resuming a finished stage is a no-op; another configuration in the same dir is refused.
    assert pretrain(Common(TINY, base, progress=False)) == base
    with pytest.raises(ValueError, match="holds a pretrain run with another configuration"):
        (base / "final.pt").rename(base / "final.bak")
        try:
            pretrain(Common(TINY.override(["lr=0.5"]), base, progress=False))
        finally:
            (base / "final.bak").rename(base / "final.pt")
    # A *finished* stage of another configuration is refused too, never reused under the new
    # configuration's name (a re-run into an old --out would otherwise relabel old models).
    before = (base / "final.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match="holds a pretrain run with another configuration"):
        pretrain(Common(TINY.override(["lr=0.5"]), base, progress=False))
    with pytest.raises(ValueError, match=r"holds a rl run with another configuration.*'init'"):
        rl(Common(TINY, scorer, progress=False), root / "not-the-init")
    # A field no stage reads (the flywheel's post-RL length) leaves finished stages reusable;
    # the stage's own length is still compared.
    longer = TINY.override([f"post_rl_steps={TINY.post_rl_steps + 7}"])
    assert pretrain(Common(longer, base, progress=False)) == base
    with pytest.raises(ValueError, match=r"holds a rl run with another configuration.*'rl_steps'"):
        rl(Common(TINY.override([f"rl_steps={TINY.rl_steps + 1}"]), scorer, progress=False),
           base / "final.pt")
    assert (base / "final.pt").stat().st_mtime_ns == before


def test_score_matches_the_reference(trained):
    root, _, scorer, cache = trained
    model = load_model(scorer, torch.device("cpu")).eval()
    inputs, targets = D.pack_rows(D.generate_texts("midtrain", TINY.n_midtrain, TINY.seed,
                                                   TINY.max_k), TINY.seq_len)
    with torch.no_grad():
        _, truth, _ = ref.token_stats_ref(model(inputs).double(), targets)
    torch.testing.assert_close(load(cache)["logprob"].double(), truth, rtol=0, atol=1e-5)


def test_evaluate_counts_correct_answers():
    """An oracle 'model' that always emits the worked solution scores 100%."""

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, prompts, max_new, **kw):
            out = []
            for row in prompts:
                q = D.decode(row[1:])[2:-1]
                x = int(q[0])
                steps = []
                for i in range(0, len(q) - 1, 2):
                    r = eval_step(f"{x}{q[i + 1]}{q[i + 2]}")
                    steps.append(f"{x}{q[i + 1]}{q[i + 2]}={r}")
                    x = r
                out.append(D.encode(f"S:{','.join(steps)}\nA:{x}\n")[:max_new])
            return torch.tensor(out)

        def forward(self, x):
            return torch.zeros(*x.shape, D.VOCAB_SIZE)

    result = evaluate(Oracle(), TINY, torch.device("cpu"))
    assert result["acc"] == 1.0 and all(result[f"acc_k{k}"] == 1.0 for k in (1, 2, 3))
    # Per-problem outcomes (for paired tests) and the sampled accuracy (TINY: 2 samples).
    assert result["correct"] == "1" * TINY.n_eval and result["acc_sampled"] == 1.0
    assert result["nll"] == pytest.approx(float(torch.log(torch.tensor(float(D.VOCAB_SIZE)))))


@pytest.mark.parametrize("method", ["ntp", "remit", "rho1", "kd"])
def test_midtrain_methods(trained, tmp_path, method):
    root, base, scorer, cache = trained
    c = Common(TINY, tmp_path / method, progress=False)
    uses_cache = method in ("remit", "rho1")
    out = midtrain(c, base / "final.pt", method,
                   scorer=None if uses_cache else scorer / "final.pt",
                   scorer_cache=cache if uses_cache else None)
    final = load(out / "final.pt")
    assert final["method"] == method and "acc" in final["eval"]
    log = _read_log(out)
    assert log[-1]["step"] == TINY.midtrain_steps
    if method == "remit":
        w = final["weights"]
        assert sum(w["hist"]) > 0
        assert 1 - TINY.eps <= w["role_mean"]["other"] <= 1 + TINY.eps
        assert {"w_mean", "frac_clip_low", "abs_delta_hat_mean"} <= set(log[-1])
    # The same run through remit_linear_loss (no logits held) trains the same model.
    fused = midtrain(dataclasses.replace(c, out=tmp_path / "fused", fused_linear=True),
                     base / "final.pt", method,
                     scorer=None if uses_cache else scorer / "final.pt",
                     scorer_cache=cache if uses_cache else None)
    _assert_same_models(out, fused)
    if method == "remit":
        # The scorer run live gives the same training as its cached log-probs.
        live = midtrain(dataclasses.replace(c, out=tmp_path / "live"), base / "final.pt",
                        "remit", scorer=scorer / "final.pt")
        _assert_same_models(out, live)


def _assert_same_models(dir_a, dir_b):
    a, b = load(dir_a / "final.pt")["model"], load(dir_b / "final.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_midtrain_refuses_bad_arguments(trained, tmp_path):
    root, base, scorer, cache = trained
    c = Common(TINY, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="--method: expected one of"):
        midtrain(c, base, "dpo", scorer=scorer)
    with pytest.raises(ValueError, match="--method remit: expected --scorer"):
        midtrain(c, base, "remit")
    with pytest.raises(ValueError, match="--method kd: expected --scorer"):
        midtrain(c, base, "kd", scorer_cache=cache)
    other = Common(TINY.override(["n_midtrain=64"]), tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="--scorer-cache: .* another mid-training dataset"):
        midtrain(other, base, "remit", scorer_cache=cache)


def test_preset_overrides():
    assert get_preset("tiny", ["midtrain_steps=9", "eps=0.1"]).midtrain_steps == 9
    with pytest.raises(ValueError, match="--set: expected FIELD=VALUE"):
        get_preset("tiny", ["bogus=1"])
    with pytest.raises(ValueError, match="--set lr: expected a float, got 'x'"):
        get_preset("tiny", ["lr=x"])
    with pytest.raises(ValueError, match="--preset: expected one of"):
        get_preset("huge")


# ----------------------------------------------------------------------------- processes


def _cli(*args, **kw):
    return [sys.executable, "-m", "remit_ext", *args]


def _final_model(path):
    return load(Path(path) / "final.pt")["model"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before writing {path}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, sig):
    """Kill a pre-training run after its first checkpoint, re-run the same command: it resumes
    from the checkpoint and ends with exactly the uninterrupted run's weights and log."""
    # On CPU even where a GPU exists: bitwise reproducibility is what is tested, and GPU
    # attention backward kernels may accumulate in a nondeterministic order.
    args = ["pretrain", "--preset", "tiny", "--set", "pretrain_steps=40", "--set",
            "ckpt_every=4", "--set", "eval_every=0", "--no-progress", "--device", "cpu"]
    assert_kill_and_resume_reproduces(args, 40, tmp_path, sig)


def assert_kill_and_resume_reproduces(args: list, total: int, tmp_path: Path, sig) -> None:
    """Run ``remit-ext *args`` once through; run it again, send ``sig`` after its first
    checkpoint, and re-run the same command: the resumed run must end with exactly the
    uninterrupted run's weights and log (timestamps aside)."""
    subprocess.run(_cli(*args, "--out", str(tmp_path / "full")), check=True, env=ENV,
                   capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(*args, "--out", str(cut)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(cut / "checkpoint.pt", proc)
    proc.send_signal(sig)
    rc = proc.wait(60)
    assert not (cut / "final.pt").exists(), "the run finished before it could be interrupted"
    assert rc == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    killed_at = load(cut / "checkpoint.pt")["step"]
    assert 0 < killed_at < total
    done = subprocess.run(_cli(*args, "--out", str(cut)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _final_model(tmp_path / "full"), _final_model(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(_read_log(cut)) == strip(_read_log(tmp_path / "full"))


def test_two_process_ddp_run(trained, tmp_path):
    """The same command under torchrun with 2 processes (gloo): both ranks train their shard of
    each global batch; rank 0 writes one log and one final model."""
    root, base, scorer, cache = trained
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "remit_ext", "midtrain", "--method", "remit",
           "--preset", "tiny", "--init", str(base), "--scorer-cache", str(cache),
           "--out", str(tmp_path / "ddp"), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load(tmp_path / "ddp" / "final.pt")
    assert final["world_size"] == 2
    log = _read_log(tmp_path / "ddp")
    assert [r["step"] for r in log if "loss" in r][-1] == TINY.midtrain_steps
    assert len({r["step"] for r in log}) == len(log)  # one writer
    # Against one process on the same global batches: the same first-step update direction.
    single = midtrain(Common(TINY, tmp_path / "one", progress=False, device="cpu"), base,
                      "remit", scorer_cache=cache)
    a, b, init = final["model"], _final_model(single), load(base / "final.pt")["model"]
    da = torch.cat([(a[k] - init[k]).flatten() for k in a])
    db = torch.cat([(b[k] - init[k]).flatten() for k in a])
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.9


def test_flywheel_writes_the_table_and_figures(tmp_path):
    out = tmp_path / "fw"
    done = subprocess.run(_cli("flywheel", "--preset", "tiny", "--out", str(out),
                               "--no-progress", "--scorer-cache-check"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["Pre-trained", "RL reference", "Vanilla NTP", "Rho-1", "ReMiT", "KD", "RMT",
                     "ReMiT, NTP as reference (no RL)"]
    # The paper's order: the reference is RL on the NTP mid-trained model (the official
    # anneal, the NTP row), which mid-trained from the pre-trained base like every method.
    assert results["order"]["reference_from"] == "midtrain"
    rl_cfg = json.loads((out / "rl" / "config.json").read_text())
    assert rl_cfg["init"] == str(out / "midtrain-ntp" / "final.pt")
    for m in ("ntp", "rho1", "remit", "kd", "rmt"):
        cfg = json.loads((out / f"midtrain-{m}" / "config.json").read_text())
        assert cfg["init"] == str(out / "pretrain" / "final.pt"), m
    assert results["machine"]["threads"] == TINY.threads == 1
    probe = results["probe"]
    assert [r["name"] for r in probe["rows"]] == names
    assert all(0 <= r["probe"]["tok_acc"] <= 1 for r in probe["rows"])
    assert results["scorer_cache"]["speedup"] > 0
    assert all(0 <= r["post_rl_acc"] <= 1 for r in results["rows"][2:])
    # The control: ReMiT from the base, steered by a cache of the NTP anneal's log-probs.
    ctl = json.loads((out / "midtrain-remit-ntpref" / "config.json").read_text())
    assert ctl["init"] == str(out / "pretrain" / "final.pt")
    assert load(out / "scorer_cache_ntp.pt")["scorer"] == str(out / "midtrain-ntp" / "final.pt")
    # Post-RL draws from its own stream: NTP's "after RL" is not the reference's first steps.
    post = json.loads((out / "post-rl-ntp" / "config.json").read_text())
    assert post["stream"] == "post-rl" and "stream" not in rl_cfg
    md = (out / "results.md").read_text()
    assert "| ReMiT |" in md and md in done.stdout
    assert "| RMT |" in md and "direct / think" in md
    for png in ("curves.png", "weights.png", "rmt.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run finds every stage done and only rebuilds the report.
    again = subprocess.run(_cli("flywheel", "--preset", "tiny", "--out", str(out),
                                "--no-progress", "--scorer-cache-check"), env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "| ReMiT |" in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


def test_flywheel_reference_ablation_order(tmp_path):
    """--reference-from pretrain: the earlier order, the reference RL-tuned from the base."""
    out = tmp_path / "fw"
    done = subprocess.run(_cli("flywheel", "--preset", "tiny", "--out", str(out), "--no-progress",
                               "--methods", "ntp", "remit", "--no-post-rl",
                               "--reference-from", "pretrain"),
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rl_cfg = json.loads((out / "rl" / "config.json").read_text())
    assert rl_cfg["init"] == str(out / "pretrain" / "final.pt")
    assert json.loads((out / "results.json").read_text())["order"]["reference_from"] == "pretrain"


def test_thread_count_is_fixed_per_run():
    """A stage sets torch's thread count from the preset (a run's numbers depend on it)."""
    code = ("import torch; torch.set_num_threads(2); from remit_ext.train.loop import "
            "apply_threads; from remit_ext.train.presets import get_preset; "
            "apply_threads(get_preset('tiny')); a = torch.get_num_threads(); "
            "apply_threads(get_preset('tiny', ['threads=0'])); print(a, torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert done.stdout.split() == ["1", "1"], done.stderr
