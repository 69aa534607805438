"""``ReMiTTrainer`` (a ``transformers.Trainer``) and ``ReMiTTrainerMixin`` on TRL's
``SFTTrainer``, on tiny random models on CPU: a few steps from the scorer cache with the
Trainer's own checkpointing, resumed to the same final parameters as the uninterrupted run;
a live scorer loaded by path that stays frozen, out of the optimizer and out of the
checkpoints; the diagnostics in the Trainer's logs, pooled over micro-batches exactly; TRL
(skipped when ``trl`` is not installed); and the example in ``docs/hf.md``.
"""

import json
import random
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from remit_ext.hf import (DIAGNOSTIC_NAMES, ReMiTDataCollator, ReMiTTrainer,  # noqa: E402
                          ReMiTTrainerMixin, ScorerCacheDataset, score_dataset)
from remit_ext.hf import patch as patch_mod  # noqa: E402
from remit_ext.hf.testing import VOCAB, tiny_model  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def _sequences(n=12, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(6, 16))] for _ in range(n)]


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                learning_rate=5e-3, logging_steps=1, save_steps=2, report_to="none",
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                save_only_model=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tokenized dataset and its scorer cache (the scorer is not needed afterwards)."""
    seqs = _sequences()
    root = tmp_path_factory.mktemp("trainer_cache")
    data = root / "tokens.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    score_dataset(tiny_model("llama", seed=41, scorer_size=True), data, root / "cache",
                  shard_size=5, progress=False)
    return [{"input_ids": s} for s in seqs], root / "cache"


def _train(out, data, cache, *, resume=None, max_steps=4):
    model = tiny_model("llama", seed=40)
    trainer = ReMiTTrainer(model=model, args=_args(out, max_steps=max_steps),
                           train_dataset=ScorerCacheDataset(data, cache),
                           data_collator=ReMiTDataCollator(pad_token_id=0))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resume_from_checkpoint(tmp_path, cached):
    """4 steps from the cache (checkpoints at 2 and 4); a fresh trainer resumed from
    checkpoint-2 ends with bit-identical parameters (CPU, no dropout, the Trainer's data order
    and RNG state restored)."""
    data, cache = cached
    full = _train(tmp_path / "full", data, cache)
    assert (tmp_path / "full" / "checkpoint-2").is_dir()
    logs = [r for r in full.state.log_history if "loss" in r]
    assert len(logs) == 4
    for r in logs:
        assert 0.8 <= r["remit/w_mean"] <= 1.2 and r["remit/w_std"] >= 0
        assert 0 <= r["remit/frac_clip_low"] <= 1 and r["remit/valid_tokens"] > 0
        assert all(f"remit/{k}" in r for k in DIAGNOSTIC_NAMES)
    resumed = _train(tmp_path / "resumed", data, cache,
                     resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    start = tiny_model("llama", seed=40).state_dict()
    moved = False
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
        moved |= not torch.equal(p, start[name])
    assert moved, "training did not change the parameters"


def test_trainer_live_scorer_by_path(tmp_path):
    """scorer_model= a path: loaded, frozen, on the Trainer's device, not in the optimizer
    and not in the checkpoint; its weights do not move."""
    path = tmp_path / "scorer"
    tiny_model("llama", seed=42, scorer_size=True).save_pretrained(path)
    data = [{"input_ids": s} for s in _sequences(6, seed=1)]
    trainer = ReMiTTrainer(model=tiny_model("llama", seed=43),
                           args=_args(tmp_path / "run", max_steps=2, save_steps=2),
                           train_dataset=data, data_collator=ReMiTDataCollator(),
                           scorer_model=str(path), remit_kwargs={"eps": 0.1})
    scorer = trainer.remit_scorer
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    trainer.train()
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    for k, v in scorer.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in scorer.parameters()}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) <= set(trainer.model.state_dict())
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(0.9 <= r["remit/w_mean"] <= 1.1 for r in logs)
    # Evaluation is the model's own forward: eval_loss is its NLL on the batch.
    batch = ReMiTDataCollator()(data[:2])
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.model(**batch).loss
    metrics = trainer.evaluate(eval_dataset=data[:2])
    assert metrics["eval_loss"] == pytest.approx(float(own), rel=1e-5)


def test_logged_diagnostics_pool_micro_batches(tmp_path, monkeypatch):
    """The logged w mean / std / clip fractions of two micro-batches equal those of their
    weights taken together (not a mean of means)."""
    from remit_ext.hf.patch import ReMiTCausalLMOutput

    trainer = ReMiTTrainer(model=tiny_model("llama", seed=44), args=_args(tmp_path),
                           train_dataset=[{"input_ids": [3, 4]}])
    g = torch.Generator().manual_seed(45)
    ws = [torch.rand(n, generator=g) * 0.6 + 0.7 for n in (5, 17)]
    ws = [torch.where(w < 0.8, 0.8, torch.where(w > 1.2, 1.2, w)) for w in ws]
    for w in ws:
        diag = torch.stack([w.mean(), w.std(correction=0), (w == 0.8).float().mean(),
                            (w == 1.2).float().mean(), w.mean() * 0, w.mean() * 0])
        trainer._remit_accumulate(ReMiTCausalLMOutput(remit_diagnostics=diag,
                                                      num_valid_tokens=torch.tensor(w.numel())))
    seen = {}
    monkeypatch.setattr(transformers.Trainer, "log",
                        lambda self, logs, *a, **k: seen.update(logs))
    trainer.log({"loss": 1.0})
    w = torch.cat(ws)
    assert seen["remit/w_mean"] == pytest.approx(float(w.mean()), abs=1e-6)
    assert seen["remit/w_std"] == pytest.approx(float(w.std(correction=0)), abs=1e-5)
    assert seen["remit/frac_clip_low"] == pytest.approx(float((w == 0.8).float().mean()),
                                                        abs=1e-6)
    assert seen["remit/valid_tokens"] == 22


def test_trainer_refuses_label_smoothing(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        ReMiTTrainer(model=tiny_model("llama"), args=_args(tmp_path, label_smoothing_factor=0.1),
                     train_dataset=[{"input_ids": [3, 4]}], remit_method="ntp")


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("mode", ["padded", "padding_free", "cache"])
def test_trl_sft_trainer_mixin(tmp_path, monkeypatch, mode):
    """ReMiTTrainerMixin on TRL's SFTTrainer (pre-tokenized data): the ReMiT loss trains (the
    diagnostics reach TRL's logs). Live scorer, padded or padding_free (packed rows,
    position_ids: centred per document); or no scorer, the cache as a datasets column
    (add_scorer_logprobs) batched by ReMiTDataCollator."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from remit_ext.hf import add_scorer_logprobs

    class ReMiTSFTTrainer(ReMiTTrainerMixin, trl.SFTTrainer):
        pass

    seqs = _sequences(8, seed=2)
    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    scorer = tiny_model("qwen2", seed=47, scorer_size=True)
    extra = {}
    if mode == "cache":
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seqs))
        score_dataset(scorer, tmp_path / "t.jsonl", tmp_path / "cache", progress=False)
        ds = add_scorer_logprobs(ds, tmp_path / "cache")
        scorer = None
        extra = dict(remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2,
                         per_device_train_batch_size=2, logging_steps=1, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True,
                         padding_free=mode == "padding_free", learning_rate=5e-3,
                         max_length=None, **extra)
    trainer = ReMiTSFTTrainer(
        model=tiny_model("qwen2", seed=46), args=args, train_dataset=ds,
        processing_class=_tiny_tokenizer(), scorer_model=scorer,
        data_collator=ReMiTDataCollator(packed=True) if mode == "cache" else None)
    assert (trainer.remit_scorer is None) == (mode == "cache")
    calls, packed = [], []
    real = trainer._remit_accumulate
    trainer._remit_accumulate = lambda out: (calls.append(type(out).__name__), real(out))
    real_cu = patch_mod.packed_cu_seqlens
    monkeypatch.setattr(patch_mod, "packed_cu_seqlens",
                        lambda pos, shape: packed.append(real_cu(pos, shape)) or packed[-1])
    trainer.train()
    assert calls == ["ReMiTCausalLMOutput"] * 2
    # Packed: one row of two documents per step, centred per document.
    assert [len(cu) - 1 for cu in packed] == ([] if mode == "padded" else [2, 2])
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(0.8 <= r["remit/w_mean"] <= 1.2 for r in logs)


def test_readme_example(tmp_path, monkeypatch):
    """The Hugging Face example of docs/hf.md, with its model names pointed at tiny local models
    and its data at a small token file (no downloads)."""
    text = DOCS.read_text()
    m = re.search(r"<!-- hf-example:start -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/hf.md: the hf-example block is missing"
    code = m.group(1)
    for name, seed, small in (("policy", 50, False), ("scorer", 51, True)):
        tiny_model("llama", seed=seed, scorer_size=small).save_pretrained(tmp_path / name)
    (tmp_path / "tokens.jsonl").write_text(
        "".join(json.dumps({"input_ids": s}) + "\n" for s in _sequences(8, seed=3)))
    names = re.findall(r'"([\w.-]+/[\w.-]+)"', code)
    assert len(set(names)) == 2, names
    for hub_name, local in zip(dict.fromkeys(names), ("policy", "scorer")):
        code = code.replace(f'"{hub_name}"', repr(str(tmp_path / local)))
    monkeypatch.chdir(tmp_path)
    for long, short in (("max_steps=1000", "max_steps=2"), ("logging_steps=10", "logging_steps=1")):
        assert long in code
        code = code.replace(long, short)
    scope = {}
    exec(compile(code, "docs/hf.md-hf-example", "exec"), scope)
    assert (tmp_path / "scorer_cache" / "manifest.json").exists()
    assert any("remit/w_mean" in r for r in scope["trainer"].state.log_history)
