"""The offline scorer cache (``remit-ext score-hf``, ``remit_ext.hf.cache``) on a tiny random
scorer saved to disk: the cached log-probs against an fp64 computation from the scorer's full
logits, one sequence at a time (so batching and padding must not matter); resumption after an
interruption (finished shards kept, not recomputed, the result equal to an uninterrupted run);
refusals of another scorer and of changed data; the join's misalignment error; Parquet and
``datasets`` inputs when those libraries are installed; and training from the cache equal to
training with the live scorer.
"""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from remit_ext.__main__ import main  # noqa: E402
from remit_ext.hf import (ReMiTDataCollator, ScorerCache, ScorerCacheDataset,  # noqa: E402
                          ScorerCacheMismatchError, apply_remit, score_dataset, sequence_hash)
from remit_ext.hf import cache as cache_mod  # noqa: E402
from remit_ext.hf.testing import VOCAB, tiny_model  # noqa: E402

N_SEQ, SHARD = 11, 3  # 4 shards, the last one short


@pytest.fixture(scope="module")
def sequences():
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 20))] for _ in range(N_SEQ)]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("scorer")
    tiny_model("qwen2", seed=31, scorer_size=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, sequences):
    path = tmp_path_factory.mktemp("data") / "tokens.jsonl"
    with open(path, "w") as f:
        for i, s in enumerate(sequences):  # both line forms
            f.write(json.dumps({"input_ids": s, "id": i} if i % 2 else s) + "\n")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, scorer_dir, jsonl):
    out = tmp_path_factory.mktemp("cache")
    assert main(["score-hf", "--scorer", str(scorer_dir), "--data", str(jsonl), "--out",
                 str(out), "--shard-size", str(SHARD), "--batch-size", "2",
                 "--no-progress"]) == 0
    return out


def _load_scorer(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_cache_matches_fp64_full_logits(cache_dir, scorer_dir, sequences, capsys):
    scorer64 = _load_scorer(scorer_dir, torch.float64)
    cache = ScorerCache(cache_dir)
    assert len(cache) == N_SEQ and len(cache.shards) == 4
    assert cache.manifest["complete"] and cache.manifest["num_tokens"] == sum(map(len, sequences))
    for i, s in enumerate(sequences):
        ids = torch.tensor([s])
        with torch.no_grad():
            lp = torch.log_softmax(scorer64(input_ids=ids).logits[0], -1)
        ref = torch.cat([torch.zeros(1, dtype=torch.float64),
                         lp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)])
        got = cache[i]
        assert got.dtype == torch.float32 and got.shape == (len(s),)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)
        assert cache.hash(i) == sequence_hash(s)


def test_resume_after_interruption(tmp_path, scorer_dir, jsonl, cache_dir, monkeypatch):
    """An exception after two shards leaves two whole shard files (no temporaries) and an
    incomplete manifest; the re-run keeps those files as they are (same mtime, their
    sequences not scored again) and ends equal to an uninterrupted run, bit for bit."""
    scorer = _load_scorer(scorer_dir)
    out = tmp_path / "cache"
    real_write = cache_mod._write_shard
    writes = []

    def failing_write(*args, **kwargs):
        if len(writes) == 2:
            raise KeyboardInterrupt("simulated interruption")
        writes.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(scorer, jsonl, out, shard_size=SHARD, batch_size=2, progress=False)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        ScorerCache(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    real_score = cache_mod._score_batch
    scored = []

    def counting_score(scorer, seqs, *args, **kwargs):
        scored.extend(seqs)
        return real_score(scorer, seqs, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "_score_batch", counting_score)
    manifest = score_dataset(scorer, jsonl, out, shard_size=SHARD, batch_size=2,
                             progress=False)
    assert [s["resumed"] for s in manifest["shards"]] == [True, True, False, False]
    assert len(scored) == N_SEQ - 2 * SHARD
    for name, t in mtimes.items():
        assert (out / name).stat().st_mtime_ns == t, f"{name} was rewritten"
    a, b = ScorerCache(out), ScorerCache(cache_dir)
    for i in range(N_SEQ):
        assert torch.equal(a[i], b[i]) and a.hash(i) == b.hash(i)
    # A third run scores nothing.
    scored.clear()
    score_dataset(scorer, jsonl, out, shard_size=SHARD, batch_size=2, progress=False)
    assert scored == []


def test_refuses_other_scorer_and_changed_data(tmp_path, scorer_dir, jsonl, sequences):
    out = tmp_path / "cache"
    scorer = _load_scorer(scorer_dir)
    score_dataset(scorer, jsonl, out, shard_size=SHARD, progress=False)
    other = tiny_model("qwen2", seed=99, scorer_size=True)
    with pytest.raises(ValueError, match="other settings.*scorer_fingerprint"):
        score_dataset(other, jsonl, out, shard_size=SHARD, progress=False)
    changed = tmp_path / "changed.jsonl"
    seqs = [list(s) for s in sequences]
    seqs[1][0] = (seqs[1][0] + 1) % VOCAB
    changed.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    with pytest.raises(ValueError, match="holds other sequences than shard 0"):
        score_dataset(scorer, changed, out, shard_size=SHARD, progress=False)
    score_dataset(scorer, changed, out, shard_size=SHARD, progress=False, overwrite=True)
    assert ScorerCache(out).hash(1) == sequence_hash(seqs[1])


def test_join_misalignment_raises(cache_dir, sequences):
    data = [{"input_ids": s} for s in sequences]
    ds = ScorerCacheDataset(data, cache_dir)
    item = ds[4]
    assert torch.equal(item["scorer_logprobs"], ScorerCache(cache_dir)[4])
    shuffled = data[1:] + data[:1]
    with pytest.raises(ScorerCacheMismatchError, match="example 0: its token ids do not match"):
        ScorerCacheDataset(shuffled, cache_dir)[0]
    with pytest.raises(ScorerCacheMismatchError, match="10 examples"):
        ScorerCacheDataset(data[:10], cache_dir)
    by_hash = ScorerCacheDataset(shuffled[:5], cache_dir, join="hash")
    assert torch.equal(by_hash[0]["scorer_logprobs"], ScorerCache(cache_dir)[1])
    with pytest.raises(ScorerCacheMismatchError, match="was not scored"):
        ScorerCacheDataset([{"input_ids": [5, 6, 7]}], cache_dir, join="hash")[0]
    retok = [dict(d) for d in data]
    retok[3] = {"input_ids": sequences[3] + [9]}
    with pytest.raises(ScorerCacheMismatchError, match="example 3"):
        ScorerCacheDataset(retok, cache_dir)[3]


def test_parquet_and_datasets_inputs(tmp_path, scorer_dir, cache_dir, sequences):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    scorer = _load_scorer(scorer_dir)
    ref = ScorerCache(cache_dir)
    sources = [tmp_path / "tokens.parquet"]
    pq.write_table(pa.table({"input_ids": sequences}), sources[0])
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        datasets.Dataset.from_dict({"input_ids": sequences}).save_to_disk(tmp_path / "ds")
        sources.append(tmp_path / "ds")
    for k, src in enumerate(sources):
        out = tmp_path / f"cache{k}"
        score_dataset(scorer, src, out, shard_size=SHARD, batch_size=2, progress=False)
        got = ScorerCache(out)
        for i in range(N_SEQ):
            assert torch.equal(got[i], ref[i]), (src, i)


def test_training_from_cache_equals_live_scorer(cache_dir, scorer_dir, sequences):
    """A batch joined from the cache (padded and packed) gives the live scorer's loss."""
    data = ScorerCacheDataset([{"input_ids": s} for s in sequences], cache_dir)
    feats = [data[i] for i in (0, 5, 9)]
    policy = tiny_model("qwen2", seed=32)
    live = tiny_model("qwen2", seed=32)
    apply_remit(policy).train()
    apply_remit(live, scorer=_load_scorer(scorer_dir)).train()
    for packed in (False, True):
        batch = ReMiTDataCollator(packed=packed)(feats)
        cached = policy(**batch).loss
        no_column = {k: v for k, v in batch.items() if k != "scorer_logprobs"}
        torch.testing.assert_close(cached, live(**no_column).loss, rtol=1e-5, atol=1e-6)


def test_one_token_sequences_score_to_zeros(tmp_path, scorer_dir):
    """A batch of one-token sequences has no position to score (it crashed the scorer pass)."""
    data = tmp_path / "short.jsonl"
    data.write_text("[5, 6, 7]\n[5]\n[6]\n")
    out = tmp_path / "cache"
    score_dataset(_load_scorer(scorer_dir), data, out, batch_size=2, progress=False)
    cache = ScorerCache(out)
    assert [len(cache[i]) for i in range(3)] == [3, 1, 1]
    assert float(cache[1][0]) == 0.0 and float(cache[2][0]) == 0.0
