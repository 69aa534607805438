"""``remit-ext midtrain --fsdp / --tp N / --cp N`` under torchrun (gloo, CPU): the real CLI,
per-step losses, gradient norms, ReMiT diagnostics and the final model against one process on
the same global batches (``remit_ext.train.parallel_setup``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remit_ext.train.presets import get_preset
from remit_ext.train.runtime import load
from remit_ext.train.stages import Common, midtrain, pretrain, rl, score

# Every step logged (eval_every=1: the gathered model is evaluated at every step too); a small
# held-out set keeps those evaluations quick.
OVERRIDES = ["eval_every=1", "n_eval=3"]
P = get_preset("tiny", OVERRIDES)
ENV = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """pretrain -> rl -> score on the tiny preset; single-process references on demand."""
    root = tmp_path_factory.mktemp("par")
    c = Common(P, root / "pretrain", progress=False, device="cpu")
    base = pretrain(c)
    scorer = rl(Common(P, root / "rl", progress=False, device="cpu"), base)
    cache = score(Common(P, root / "cache.pt", progress=False, device="cpu"), scorer)
    refs = {}

    def single(method, fused):
        if (method, fused) not in refs:
            out = root / f"one-{method}-{int(fused)}"
            refs[method, fused] = midtrain(
                Common(P, out, progress=False, device="cpu", fused_linear=fused), base, method,
                scorer_cache=cache if method == "remit" else None)
        return refs[method, fused]

    return root, base, cache, single


def _log(stage_dir):
    rows = [json.loads(ln) for ln in (Path(stage_dir) / "metrics.jsonl").read_text().split("\n")
            if ln.strip()]
    return {r["step"]: r for r in rows}


def _torchrun(n, out, method, fused, flags, base, cache):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "remit_ext", "midtrain", "--method", method, "--preset", "tiny",
           "--init", str(base), "--out", str(out), "--no-progress", "--device", "cpu", *flags]
    for o in OVERRIDES:
        cmd += ["--set", o]
    if method == "remit":
        cmd += ["--scorer-cache", str(cache)]
    if fused:
        cmd.append("--fused-linear")
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


CASES = [  # (processes, flags, method, fused)
    (2, ["--fsdp"], "remit", False),
    (2, ["--fsdp"], "remit", True),
    (2, ["--tp", "2"], "remit", False),
    (2, ["--tp", "2"], "remit", True),
    (2, ["--cp", "2"], "remit", False),
    (2, ["--cp", "2"], "ntp", True),
    (2, ["--fsdp", "--cp", "2"], "ntp", False),
    (4, ["--tp", "2", "--cp", "2"], "remit", False),
]


@pytest.mark.parametrize("n,flags,method,fused", CASES,
                         ids=[f"{''.join(f)}-{m}{'-fused' if fu else ''}" for _, f, m, fu in CASES])
def test_parallel_midtrain_matches_one_process(setup, tmp_path, n, flags, method, fused):
    root, base, cache, single = setup
    done = _torchrun(n, tmp_path / "par", method, fused, flags, base, cache)
    assert done.returncode == 0, done.stderr[-4000:]
    ref = single(method, fused)
    a, b = _log(ref), _log(tmp_path / "par")
    assert sorted(a) == sorted(b) == list(range(1, P.midtrain_steps + 1))
    keys = ["loss", "grad_norm", "eval_nll"] + (
        ["w_mean", "w_std", "frac_clip_low", "frac_clip_high", "delta_mean", "w_result",
         "w_answer"] if method == "remit" else [])
    exact = dict.fromkeys(keys, 0)
    for step in a:
        for k in keys:
            x, y = a[step][k], b[step][k]
            tol = dict(rel=2e-6, abs=1e-7)
            assert y == pytest.approx(x, **tol), (step, k, x, y)
            exact[k] += x == y
    fa, fb = load(ref / "final.pt"), load(tmp_path / "par" / "final.pt")
    assert fb["world_size"] == n
    # AdamW divides by sqrt(v): a parameter whose gradient is ~0 (some biases) moves by up to
    # the rate per step on rounding noise, so the weights are compared to 1% of the rate.
    for k in fa["model"]:
        assert fb["model"][k].shape == fa["model"][k].shape, k
        torch.testing.assert_close(fb["model"][k], fa["model"][k], rtol=1e-4, atol=P.lr / 100)
    same = sum(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])
    if method == "remit":
        hist_a, hist_b = fa["weights"]["hist"], fb["weights"]["hist"]
        assert sum(hist_b) == sum(hist_a)  # every valid token counted once, over all ranks
    print(f"\n{' '.join(flags)} {method} fused={fused}: steps bit-for-bit of {len(a)} "
          f"{exact}; final tensors {same}/{len(fa['model'])}")


def test_parallel_flags_only_for_midtrain(tmp_path):
    done = subprocess.run([sys.executable, "-m", "remit_ext", "pretrain", "--preset", "tiny",
                           "--out", str(tmp_path / "x"), "--fsdp"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "only `midtrain` takes them" in done.stderr


def test_parallel_flags_need_torchrun_and_sharded_checkpoints_do_not_resume(setup, tmp_path):
    root, base, cache, _ = setup
    with pytest.raises(ValueError, match="launch with torchrun"):
        midtrain(Common(P, tmp_path / "one", progress=False, device="cpu", tp=2), base, "ntp")
    with pytest.raises(ValueError, match="takes no --fsdp"):
        midtrain(Common(P, tmp_path / "rmt", progress=False, device="cpu", fsdp=True), base,
                 "rmt")
    # A --fsdp / --tp checkpoint holds the gathered model but no optimizer state.
    out = tmp_path / "resume"
    c = Common(P, out, progress=False, device="cpu")
    midtrain(c, base, "ntp")
    state = load(out / "final.pt")
    (out / "final.pt").unlink()
    torch.save({"stage": "midtrain-ntp", "step": 2, "model": state["model"], "optimizer": None,
                "extra_state": {}}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="cannot resume"):
        midtrain(c, base, "ntp")
