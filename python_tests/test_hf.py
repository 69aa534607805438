"""``remit_ext.hf.apply_remit`` on tiny random Hugging Face causal LMs (built from configs, no
downloads): the fused ReMiT / Rho-1 / KD / NTP loss of a patched model and every parameter
gradient against an fp64 computation from the full logits of the unpatched model (the same
math in fp32 is the error baseline, ``assert_close_to_truth``); NTP against the model's own
loss; packed vs unpacked batches; ``num_items_in_batch`` under gradient accumulation; the
untouched evaluation / generation path; logit scaling (Cohere, Granite) reproduced, soft-capping
(Gemma 2) and an unannounced logit transform refused; the scorer's checks; and the memory row:
a training step allocates no ``[tokens x vocab]`` buffer.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from remit_ext.hf import (ReMiTDataCollator, apply_remit, packed_cu_seqlens,  # noqa: E402
                          remove_remit)
from remit_ext.hf.testing import VOCAB, tiny_model  # noqa: E402
from remit_ext.testing import assert_close_to_truth  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "llama_tied"]
IGNORE = -100


def make_batch(seed=0, rows=2, width=16, pad=(0, 5)):
    """Right-padded token batch: input_ids, attention_mask, labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    for r, p in enumerate(pad[:rows]):
        if p:
            mask[r, -p:] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- the fp64 reference


def _shifted_logprob(logits, y):
    """log softmax(logits)[y] with y = -100 -> 0 (logits [B, T, V], y [B, T])."""
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != IGNORE)


def reference_loss(model, batch, *, method="remit", scorer=None, scorer_lp=None, eps=0.2,
                   keep_ratio=0.6, temperature=1.0, num_items=None, docs=None):
    """The method's loss written from the full logits of the unpatched model's own forward
    (independent of remit_ext): labels shifted by one, ReMiT centred per row (or per document
    span ``docs`` of the flattened positions), weights detached, mean over valid tokens.
    ``use_cache=False``: with a cache, Hugging Face's masking does not separate packed
    documents (the fused path never builds one)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "scorer_logprobs")}
    inputs["use_cache"] = False
    z = model(**inputs).logits
    y = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    valid = y != IGNORE
    a = _shifted_logprob(z, y)
    if scorer is not None:
        with torch.no_grad():
            zs = scorer(**inputs).logits.to(z.dtype)
    if method in ("remit", "rho1"):
        b = (_shifted_logprob(zs, y) if scorer_lp is None
             else torch.nn.functional.pad(scorer_lp, (0, 1))[:, 1:].to(z.dtype) * valid)
    if method == "ntp":
        per, count = -a, valid.sum()
    elif method == "remit":
        delta = (b - a).detach().reshape(-1)
        v = valid.reshape(-1)
        spans = docs or [(r * y.shape[1], (r + 1) * y.shape[1]) for r in range(y.shape[0])]
        dh = torch.zeros_like(delta)
        for s, e in spans:
            m = v[s:e]
            mu = delta[s:e][m].mean() if m.any() else 0.0
            dh[s:e] = delta[s:e] - mu
        w = torch.clamp(2 * torch.sigmoid(dh), 1 - eps, 1 + eps).reshape(y.shape)
        per, count = -w * a, valid.sum()
    elif method == "rho1":
        excess = (b - a).detach().reshape(-1)
        v = valid.reshape(-1)
        n_keep = int(torch.ceil(torch.tensor(keep_ratio * int(v.sum())) - 1e-6))
        score = torch.where(v, excess, torch.full_like(excess, -torch.inf))
        order = torch.sort(score, descending=True, stable=True).indices[:n_keep]
        keep = torch.zeros_like(v)
        keep[order] = True
        keep = keep.reshape(y.shape) & valid
        per, count = -a * keep, keep.sum()
    elif method == "kd":
        zt = z / temperature
        q = torch.softmax(zs / temperature, -1)
        per = (torch.logsumexp(zt, -1) - (q * zt).sum(-1)) * valid
        count = valid.sum()
    return per.sum() / (count if num_items is None else num_items)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _run(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), _grads(model)


def check_against_fp64(policy, batch, *, method="remit", scorer=None, scorer_lp=None,
                       patch_kwargs=None, ref_kwargs=None, fwd_kwargs=None):
    """The patched fp32 policy's loss and gradients against the fp64 reference, with the same
    reference in fp32 as the error baseline."""
    truth_model = copy.deepcopy(policy).double().train()
    base_model = copy.deepcopy(policy).train()
    apply_remit(policy, scorer=scorer, method=method, **(patch_kwargs or {}))
    policy.train()
    fwd_kwargs = fwd_kwargs or {}

    def fused():
        out = policy(**batch, **fwd_kwargs)
        assert out.logits is None
        return out.loss

    kw = dict(method=method, scorer=scorer, scorer_lp=scorer_lp, **(ref_kwargs or {}))
    loss, grads = _run(policy, fused)
    t_loss, t_grads = _run(truth_model, lambda: reference_loss(truth_model, batch, **kw))
    b_loss, b_grads = _run(base_model, lambda: reference_loss(base_model, batch, **kw))
    assert_close_to_truth(loss, t_loss, b_loss, factor=4, name="loss")
    assert set(grads) == set(t_grads), "parameters with a gradient differ"
    for name in t_grads:
        assert_close_to_truth(grads[name], t_grads[name], b_grads[name], factor=4,
                              floor_rtol=2e-5, name=f"grad {name}")
    return loss


# --------------------------------------------------------------------- the tests


@pytest.mark.parametrize("arch", ARCHS)
def test_remit_live_scorer_matches_fp64(arch):
    """ReMiT with a live scorer of another size and dtype (fp64 scorer, fp32 policy)."""
    policy = tiny_model(arch, seed=1)
    scorer = tiny_model(arch, seed=2, scorer_size=True, dtype=torch.float64)
    loss = check_against_fp64(policy, make_batch(3), scorer=scorer)
    assert torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in scorer.parameters())
    assert not scorer.training


@pytest.mark.parametrize("arch", ARCHS)
def test_ntp_reproduces_model_loss(arch):
    """method='ntp' is the model's own loss and gradients (fp32 against fp32), also with
    num_items_in_batch."""
    policy = tiny_model(arch, seed=4).train()
    own = copy.deepcopy(policy).train()
    apply_remit(policy, method="ntp")
    batch = make_batch(5)
    for n in (None, torch.tensor(40)):
        kw = {} if n is None else {"num_items_in_batch": n}
        loss, grads = _run(policy, lambda: policy(**batch, **kw).loss)
        ref_loss, ref_grads = _run(own, lambda: own(**batch, **kw).loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["rho1", "kd"])
def test_rho1_kd_match_fp64(method):
    policy = tiny_model("qwen2", seed=6)
    scorer = tiny_model("qwen2", seed=7, scorer_size=True)
    extra = {"temperature": 2.0} if method == "kd" else {"keep_ratio": 0.5}
    check_against_fp64(policy, make_batch(8), method=method, scorer=scorer,
                       patch_kwargs=extra, ref_kwargs=extra)


def test_cached_scorer_column_matches_fp64_and_live():
    """A scorer_logprobs batch column (label-aligned, as the cache stores it) instead of a live
    scorer: the same loss as the live scorer, and as the fp64 reference."""
    policy = tiny_model("llama", seed=9)
    scorer = tiny_model("llama", seed=10, scorer_size=True)
    batch = make_batch(11)
    with torch.no_grad():
        z = scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(z.double(), -1)[:, :-1].gather(
            -1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    column = torch.nn.functional.pad(lp, (1, 0)).float() * batch["attention_mask"]
    live = copy.deepcopy(policy)
    cached = check_against_fp64(policy, batch, scorer_lp=column,
                                fwd_kwargs={"scorer_logprobs": column})
    apply_remit(live, scorer=scorer).train()
    torch.testing.assert_close(live(**batch).loss.detach(), cached, rtol=1e-5, atol=1e-6)


def test_packed_equals_unpacked():
    """Three documents packed in one row (position_ids restarting, HF's flattening layout)
    give the unpacked padded batch's loss and gradients: ReMiT centres per document. Centring
    the packed row as one sequence (packed=False) gives another loss."""
    g = torch.Generator().manual_seed(12)
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 7)]
    feats = [{"input_ids": d} for d in docs]
    lp = [torch.randn(len(d), generator=g).clamp(max=0) - 3 for d in docs]
    feats_lp = [{"input_ids": d, "scorer_logprobs": x} for d, x in zip(docs, lp)]
    packed = ReMiTDataCollator(packed=True)(feats_lp)
    padded = ReMiTDataCollator(packed=False)(feats_lp)
    hf_flat = transformers.DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": d, "labels": d} for d in docs])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(packed[key], hf_flat[key]), key
    assert packed_cu_seqlens(packed["position_ids"], packed["labels"].shape).tolist() == \
        [0, 5, 14, 21]

    policy = tiny_model("qwen3", seed=13)
    truth = copy.deepcopy(policy).double().train()
    apply_remit(policy).train()
    loss_p, grads_p = _run(policy, lambda: policy(**packed).loss)
    loss_u, grads_u = _run(policy, lambda: policy(**padded).loss)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for name, g_u in grads_u.items():
        torch.testing.assert_close(grads_p[name], g_u, rtol=1e-4, atol=2e-6, msg=name)
    # The packed loss against the fp64 reference centred per document.
    ref = reference_loss(truth, packed, scorer_lp=packed["scorer_logprobs"],
                         docs=[(0, 5), (5, 14), (14, 21)])
    torch.testing.assert_close(loss_p.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    row = reference_loss(truth, packed, scorer_lp=packed["scorer_logprobs"])
    assert abs(row.item() - ref.item()) > 1e-4  # the centring matters on this batch
    apply_remit(policy, packed=False).train()
    torch.testing.assert_close(policy(**packed).loss.detach().double(), row.detach(),
                               rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_gradient_accumulation():
    """Two micro-batches each divided by the global token count sum to the one-batch
    gradient (what Trainer does with gradient accumulation)."""
    policy = tiny_model("mistral", seed=14)
    scorer = tiny_model("mistral", seed=15, scorer_size=True)
    apply_remit(policy, scorer=scorer).train()
    batch = make_batch(16, rows=4, pad=(0, 3, 6, 0))
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    _, full = _run(policy, lambda: policy(**batch).loss)
    policy.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        mb = {k: v[half] for k, v in batch.items()}
        policy(**mb, num_items_in_batch=n).loss.backward()
    for name, g in full.items():
        torch.testing.assert_close(dict(policy.named_parameters())[name].grad, g,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_eval_and_generation_untouched():
    policy = tiny_model("llama", seed=17)
    own = copy.deepcopy(policy)
    apply_remit(policy, method="ntp")
    batch = make_batch(18)
    policy.eval(), own.eval()
    with torch.no_grad():
        out, ref = policy(**batch), own(**batch)
        assert out.logits is not None and type(out) is type(ref)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)
        nolab = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(policy(**nolab).logits, own(**nolab).logits)
        prompt = batch["input_ids"][:1, :4]
        gen = policy.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, own.generate(prompt, max_new_tokens=5, do_sample=False,
                                             pad_token_id=0))
        # skip_logits=True forces the fused path in eval mode; training mode without labels
        # is the model's own forward.
        assert policy(**batch, skip_logits=True).logits is None
    policy.train()
    assert policy(**nolab).logits is not None
    remove_remit(policy)
    assert "forward" not in policy.__dict__ and policy(**batch).logits is not None


@pytest.mark.parametrize("arch", ["cohere", "granite"])
def test_scaled_logits_supported_exactly(arch):
    """Cohere (logits x logit_scale) and Granite (logits / logits_scaling): the scale folded
    into the hidden states reproduces the model's own loss and gradients."""
    policy = tiny_model(arch, seed=19).train()
    own = copy.deepcopy(policy).train()
    apply_remit(policy, method="ntp")
    batch = make_batch(20)
    loss, grads = _run(policy, lambda: policy(**batch).loss)
    ref_loss, ref_grads = _run(own, lambda: own(**batch).loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_rho1_num_items_in_batch_is_the_kept_count():
    """The Trainer passes its count of valid labels; Rho-1's mean divides by the kept tokens,
    so the patched forward scales that count by keep_ratio: equal to the local mean when the
    kept count is exact (keep_ratio * n_valid an integer), not keep_ratio times it."""
    policy = tiny_model("qwen2", seed=6)
    scorer = tiny_model("qwen2", seed=7, scorer_size=True)
    apply_remit(policy, scorer=scorer, method="rho1", keep_ratio=0.5).train()
    batch = make_batch(8)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    if n % 2:  # make keep_ratio * n_valid exact
        batch["labels"][0, -1] = IGNORE if batch["labels"][0, -1] != IGNORE else 3
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n % 2 == 0
    with torch.no_grad():
        local = policy(**batch).loss
        for count in (n, torch.tensor(n)):
            torch.testing.assert_close(policy(**batch, num_items_in_batch=count).loss, local)


def test_adapted_and_sharded_heads_refused():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    head.base_layer = torch.nn.Linear(2, 2)  # what PEFT's LoRA wrapper carries
    with pytest.raises(ValueError, match="the LM head carries an adapter"):
        apply_remit(model, method="ntp")


def test_other_final_softcap_names_refused():
    model = tiny_model("llama")
    model.config.logits_soft_cap = 30.0  # RecurrentGemma's name
    with pytest.raises(ValueError, match=r"soft-caps its final logits \(logits_soft_cap=30.0\)"):
        apply_remit(model, method="ntp")
    ok = tiny_model("llama")
    ok.config.attn_logit_softcapping = 50.0  # attention soft-capping leaves the logits alone
    apply_remit(ok, method="ntp")


def test_softcapping_and_unknown_transforms_refused():
    with pytest.raises(ValueError, match="soft-caps its final logits"):
        apply_remit(tiny_model("gemma2"), method="ntp")
    gemma = tiny_model("gemma2")
    with pytest.raises(ValueError, match="scorer: .*soft-caps"):
        apply_remit(tiny_model("llama"), scorer=gemma)

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    odd = Doubled(tiny_model("llama").config)
    with pytest.raises(ValueError, match="does not compute its logits"):
        apply_remit(odd, method="ntp")
    apply_remit(odd, method="ntp", verify=False)  # the caller's call
    moe = tiny_model("llama")
    moe.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits"):
        apply_remit(moe, method="ntp")


def test_scorer_checks():
    policy = tiny_model("llama", seed=21)
    with pytest.raises(ValueError, match="vocabulary size 50"):
        apply_remit(policy, scorer=tiny_model("llama", vocab_size=50))
    with pytest.raises(ValueError, match="the policy itself"):
        apply_remit(policy, scorer=policy)
    with pytest.raises(ValueError, match="needs the teacher"):
        apply_remit(policy, method="kd")
    apply_remit(policy).train()  # no scorer, no column: a clear error at the forward
    with pytest.raises(ValueError, match="scorer_logprobs' batch column"):
        policy(**make_batch(22))
    scorer = tiny_model("llama", seed=23, scorer_size=True).train()
    apply_remit(policy, scorer=scorer).train()
    assert not scorer.training and not any(p.requires_grad for p in scorer.parameters())
    assert not any(p is q for p in policy.parameters() for q in scorer.parameters())
    scorer.train()
    with pytest.raises(RuntimeError, match="training mode"):
        policy(**make_batch(22))


def test_autocast_bf16_close_to_model_loss():
    """Under CPU autocast (bf16) the head runs in the autocast dtype, as the model's own
    lm_head call does: the NTP loss agrees with the model's own to bf16 accuracy."""
    policy = tiny_model("qwen2", seed=24).train()
    own = copy.deepcopy(policy).train()
    apply_remit(policy, method="ntp")
    batch = make_batch(25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = policy(**batch).loss
        ref = own(**batch).loss
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_bf16_model_fp32_chunk_logits():
    """A bf16 model: chunk_dtype=None reproduces its own bf16 loss; chunk_dtype=float32 forms
    the head's logits in fp32, as the loss of its fp32-upcast head would be."""
    policy = tiny_model("qwen2", seed=26).to(torch.bfloat16).train()
    own = copy.deepcopy(policy).train()
    batch = make_batch(27)
    own_loss = own(**batch).loss
    apply_remit(policy, method="ntp")
    torch.testing.assert_close(policy(**batch).loss, own_loss, rtol=1e-2, atol=1e-2)
    apply_remit(policy, method="ntp", chunk_dtype=torch.float32)
    loss = policy(**batch).loss
    with torch.no_grad():
        hidden = own.get_decoder()(input_ids=batch["input_ids"],
                                   attention_mask=batch.get("attention_mask")).last_hidden_state
        z = hidden[:, :-1].float() @ own.get_output_embeddings().weight.float().T
        y = batch["labels"][:, 1:]
        want = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in policy.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="chunk_dtype"):
        apply_remit(policy, method="ntp", chunk_dtype=torch.float16)


def _largest_allocation(fn) -> int:
    """Bytes of the largest buffer any single op allocated while fn ran (the profiler's
    self CPU memory per op: a [tokens x vocab] logits or gradient buffer shows as one)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_memory_row_no_token_by_vocab_logits():
    """Memory row: a ReMiT training step (live scorer) never allocates a [tokens x vocab]
    buffer, while the unpatched model's step does (the check can fail). V = 2048 against
    N = 96 tokens and D = 32, a chunk budget of 1/8 of the logits."""
    vocab = 2048
    policy = tiny_model("llama", seed=26, vocab_size=vocab).train()
    own = copy.deepcopy(policy).train()
    scorer = tiny_model("llama", seed=27, vocab_size=vocab, scorer_size=True)
    g = torch.Generator().manual_seed(28)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    logits_bytes = ids.numel() * vocab * 4
    apply_remit(policy, scorer=scorer, memory_budget=logits_bytes // 8)

    def step(model):
        def run():
            out = model(**batch)
            out.loss.backward()
            return out
        return run

    ours = _largest_allocation(step(policy))
    theirs = _largest_allocation(step(own))
    assert theirs >= logits_bytes, "the probe missed the unpatched model's logits"
    assert ours < logits_bytes // 2, (ours, logits_bytes)


def test_gradient_checkpointing_same_gradients():
    """The decoder under gradient checkpointing (what Trainer's gradient_checkpointing=True
    turns on) gives the same ReMiT gradients through the patched forward."""
    policy = tiny_model("llama", seed=29)
    scorer = tiny_model("llama", seed=30, scorer_size=True)
    apply_remit(policy, scorer=scorer).train()
    batch = make_batch(31)
    _, plain = _run(policy, lambda: policy(**batch).loss)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ckpt = _run(policy, lambda: policy(**batch).loss)
    assert set(plain) == set(ckpt)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------ FSDP2-sharded LM heads


def _fsdp_worker(rank, world, init, out_dir):
    """2 gloo ranks: a tiny llama patched (before sharding: the probe runs unsharded), its
    decoder layers, LM head and root fully_shard'd; the head's own forward never runs, so the
    fused path gets its Shard(0) DTensor weight (remit_ext.fsdp). Every parameter's gradient
    against the fp64 reference of this file on all ranks' rows: FSDP2 averages over ranks, so
    (1/W) sum_r L_r; the loss against this rank's own. NTP and ReMiT with a live frozen scorer
    (its decoder and head sharded apart)."""
    import datetime
    import json
    import os
    import traceback

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from remit_ext.hf.testing import tiny_model as tiny

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    errors = {}
    for method in ("ntp", "remit"):
        try:
            policy = tiny("llama", dtype=torch.float64)
            ref = copy.deepcopy(policy)
            scorer = scorer_ref = None
            if method == "remit":
                scorer = tiny("llama", seed=1, scorer_size=True, dtype=torch.float64)
                scorer_ref = copy.deepcopy(scorer)
            apply_remit(policy, scorer=scorer, method=method)
            for layer in policy.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(policy.lm_head, mesh=mesh)
            fully_shard(policy, mesh=mesh)
            if scorer is not None:
                fully_shard(scorer.model, mesh=mesh)
                fully_shard(scorer.lm_head, mesh=mesh)
            policy.train()
            batches = [make_batch(seed=10 + r, pad=(r, 3)) for r in range(world)]
            out = policy(**batches[rank])
            assert out.logits is None
            out.loss.backward()
            losses = [reference_loss(ref, b, method=method, scorer=scorer_ref) for b in batches]
            (sum(losses) / world).backward()
            torch.testing.assert_close(out.loss.detach(), losses[rank].detach(), atol=1e-10,
                                       rtol=1e-9)
            head_grad = None
            for (name, p), (_, q) in zip(policy.named_parameters(), ref.named_parameters()):
                assert type(p.grad).__name__ == "DTensor", name
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-10, rtol=1e-9,
                                           msg=lambda m, name=name: f"{name}: {m}")
                if name.endswith("lm_head.weight"):
                    head_grad = p.grad
            assert head_grad is not None
            if scorer is not None:
                assert all(p.grad is None for p in scorer.parameters())
            errors[method] = None
        except Exception:  # noqa: BLE001  (reported by the test)
            errors[method] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()


def test_fsdp2_sharded_lm_head(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, f"file://{tmp_path}/rdv", str(tmp_path)), nprocs=2,
             join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        bad = {k: v for k, v in res.items() if v}
        assert not bad, f"rank {r}:\n" + "\n".join(bad.values())


def test_sharded_head_probe_and_tp_layout_refused(tmp_path):
    """apply_remit on an already-sharded head: the probe cannot run it (a clear ValueError);
    a tensor-parallel (Shard(1)) head weight is refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for placement, match in ((Shard(0), "apply_remit before fully_shard"),
                                 (Shard(1), "FSDP2's Shard\\(0\\)")):
            model = tiny_model("llama")
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh,
                                                               [placement]))
            with pytest.raises(ValueError, match=match):
                apply_remit(model, method="ntp")
    finally:
        dist.destroy_process_group()
