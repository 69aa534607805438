"""``apply_remit``: a Hugging Face causal LM instance trained through the fused-linear loss.

A forward with ``labels`` in training mode runs the decoder (``model.get_decoder()``), shifts the
labels as Hugging Face's ``ForCausalLMLoss`` does, and hands the final hidden states and the
output embeddings (``model.get_output_embeddings()``) to ``remit_linear_loss``: no
``[tokens x vocab]`` logits are held and ``out.logits`` is None. The frozen scorer (ReMiT's RL
model, Rho-1's reference, KD's teacher) runs in the same forward under ``no_grad`` through its
own fused head (``linear_token_stats``), or its log-probs come from a ``scorer_logprobs`` batch
column (the offline cache, ``remit_ext.hf.cache``). Everything else (evaluation, generation, a
forward without labels) goes to the model's own forward, untouched.

The patch is per instance (``model.forward`` is replaced, the class is not), so one process can
hold a patched policy and an unpatched scorer of the same class. It works through the generic
``get_decoder`` / ``get_output_embeddings`` pair rather than per-architecture copies of forward;
the logit transforms some architectures apply after the head are read from the config: a scale
(Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``, ...) is
folded exactly into the hidden states, final-logit soft-capping (Gemma 2/3) is refused. A probe
forward at ``apply_remit`` time (``verify=True``) compares the model's own logits with the
decoder + head path and refuses a model whose forward does something else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MethodType
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._methods import get_method, loss_options
from ..linear import linear_token_stats, remit_linear_loss

__all__ = ["ReMiTCausalLMOutput", "ReMiTSettings", "apply_remit", "remove_remit",
           "packed_cu_seqlens", "get_remit_settings", "DIAGNOSTIC_NAMES"]

_STATE = "_remit_state"
# Batch keys the patched forward consumes (never passed on to the decoder).
SCORER_COLUMN = "scorer_logprobs"
# The order of ReMiTCausalLMOutput.remit_diagnostics (ReMiTDiagnostics' fields).
DIAGNOSTIC_NAMES = ("w_mean", "w_std", "frac_clip_low", "frac_clip_high", "abs_delta_hat_mean",
                    "delta_mean")
# Decoder inputs the scorer receives besides input_ids (its own embeddings, the batch's
# layout): padding mask, positions (packed documents) and the flash-attention varlen offsets.
_SCORER_INPUTS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                  "max_length_q", "max_length_k", "token_type_ids")
_CACHE_KEYS = ("cache", "past_key_values")


@dataclass
class ReMiTCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and the step's token statistics.

    ``remit_diagnostics``: ReMiT only, a 6-vector in ``DIAGNOSTIC_NAMES`` order (w mean, w std,
    fraction clipped at 1 - eps and at 1 + eps, mean |delta_hat|, mean delta) over this batch's
    valid tokens; ``num_valid_tokens``: the count they average over; ``token_weights``: the
    detached per-token weights (ReMiT w_t, Rho-1's keep mask, 1 for NTP / KD), shaped like the
    shifted labels. All are tensors on the loss's device (nothing is read on the host).
    """

    remit_diagnostics: Optional[Tensor] = None
    num_valid_tokens: Optional[Tensor] = None
    token_weights: Optional[Tensor] = None


@dataclass(frozen=True)
class ReMiTSettings:
    """What ``apply_remit`` was called with (``get_remit_settings(model)``)."""

    method: str
    eps: float
    keep_ratio: float
    temperature: float
    ignore_index: int
    packed: bool
    chunk_size: Optional[int]
    memory_budget: Optional[int]
    backend: str
    chunk_dtype: Optional[torch.dtype] = None


class _ReMiTState:
    """Held in the model's ``__dict__`` (not a submodule: the scorer's parameters stay out of
    ``model.parameters()``, the optimizer and the checkpoints)."""

    def __init__(self, settings, scorer, original_forward, had_instance_forward, scale,
                 scorer_scale):
        self.settings = settings
        self.scorer = scorer
        self.original_forward = original_forward
        self.had_instance_forward = had_instance_forward
        self.scale = scale
        self.scorer_scale = scorer_scale


# ------------------------------------------------------------------------- model checks


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def logit_scale(model, role: str = "model") -> float:
    """The factor the model's forward multiplies its head's logits by (1.0 for most models).

    Read from the text config like TRL's fused head does: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling`` (Granite,
    MiniCPM3; HyperCLOVA X multiplies). A linear scale is exact to fold into the hidden states;
    final-logit soft-capping (``tanh``) is not, and is refused.
    """
    cfg = _text_config(model)
    name = type(model).__name__
    # Gemma 2/3's name, and any other final-logit soft cap a config declares (RecurrentGemma's
    # logits_soft_cap); attention soft-capping does not touch the logits.
    caps = ["final_logit_softcapping"]
    caps += sorted(a for a in getattr(cfg, "__dict__", {}) if a not in caps and "attn" not in a
                   and ("softcap" in a or "soft_cap" in a))
    for obj, attr in ((o, a) for o in (cfg, model) for a in caps):
        cap = getattr(obj, attr, None)
        if cap is not None:
            raise ValueError(
                f"{role}: {name} soft-caps its final logits ({attr}={cap}): "
                "logits -> cap * tanh(logits / cap) is not a linear map of the hidden states, so "
                "remit_ext's fused head cannot reproduce it. Set "
                "config.final_logit_softcapping = None (a different model), or train this one "
                "with materialised logits")
    scale = None
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, attr, None) is not None:
            scale = float(getattr(cfg, attr))
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        s = float(cfg.logits_scaling)
        scale = s if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / s
    return 1.0 if scale is None else scale


def _head(model, role: str):
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{role}: {type(model).__name__}.get_output_embeddings() returned "
                         f"{type(head).__name__}, expected an LM head with a [V, D] weight")
    if head.weight.dim() != 2:
        raise ValueError(f"{role}: the LM head weight has shape {tuple(head.weight.shape)}, "
                         "expected [V, D] (a sharded or quantised head is not supported)")
    # The fused path reads head.weight directly: an adapter (PEFT LoRA keeps the base layer
    # inside) would be silently ignored, and a sharded weight (FSDP2, tensor parallel) is a
    # DTensor the head's own hooks would have gathered. Refused rather than trained wrong.
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(f"{role}: the LM head carries an adapter ({type(head).__name__}); "
                         "remit_ext's fused head would train the base weight only. Merge the "
                         "adapter, or leave lm_head out of the adapter's target modules")
    if type(head.weight).__name__ == "DTensor" or type(head.weight.data).__name__ == "DTensor":
        # FSDP2 (fully_shard(model.lm_head), whose forward the fused path never runs): the
        # weight stays a Shard(0) DTensor over the data-parallel mesh (Replicate dims: HSDP);
        # remit_linear_loss sends it to remit_ext.fsdp (gathered, the gradient reduce-scattered
        # and averaged like FSDP2's). Any other layout (tensor parallel) is refused.
        from torch.distributed.tensor import Replicate, Shard

        placements = getattr(head.weight, "placements", None) or head.weight.data.placements
        if not all((type(p) is Shard and p.dim == 0) or isinstance(p, Replicate)
                   for p in placements):
            raise ValueError(f"{role}: the LM head weight is a DTensor with placements "
                             f"{tuple(placements)}: remit_ext.hf supports FSDP2's Shard(0) "
                             "(Replicate dims for HSDP) only; a tensor-parallel head is not "
                             "supported (remit_ext.parallel has the vocab-parallel losses)")
    return head


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _refuse_unsupported(model, role: str) -> None:
    cfg = _text_config(model)
    if getattr(cfg, "output_router_logits", False):
        raise ValueError(
            f"{role}: config.output_router_logits=True: {type(model).__name__}'s forward adds a "
            "router load-balancing loss that the fused path does not reproduce; set "
            "config.output_router_logits = False")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{role}: {type(model).__name__} is an encoder-decoder model; "
                         "apply_remit patches decoder-only causal LMs")


def _probe(model, original_forward, scale: float, role: str) -> None:
    """The model's own logits against decoder + head (x scale) on 8 tokens: a model whose
    forward transforms the logits in a way the config does not say is refused."""
    head = _head(model, role)
    if _is_dtensor(head.weight):
        raise ValueError(f"{role}: the LM head is already sharded (a DTensor weight): call "
                         "apply_remit before fully_shard (the probe runs the unsharded model), "
                         "or pass verify=False")
    vocab = head.weight.shape[0]
    ids = (torch.arange(8, device=head.weight.device) * 7 + 1) % vocab
    ids = ids.unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = original_forward(input_ids=ids, use_cache=False).logits
            hid = model.get_decoder()(input_ids=ids, use_cache=False)[0]
            ours = head(hid * scale if scale != 1.0 else hid)
    finally:
        model.train(was_training)
    ref, ours = ref.float(), ours.float()
    if ref.shape != ours.shape:
        raise ValueError(f"{role}: {type(model).__name__}: decoder + head logits have shape "
                         f"{tuple(ours.shape)}, the model's own forward {tuple(ref.shape)}")
    tol = 16 * torch.finfo(head.weight.dtype).eps * (1.0 + float(ref.abs().max()))
    err = float((ref - ours).abs().max())
    if not err <= tol:
        raise ValueError(
            f"{role}: {type(model).__name__}'s forward does not compute its logits as "
            f"get_output_embeddings()(get_decoder()(...)) x {scale:g} (max difference {err:.3g} "
            f"> {tol:.3g} on a probe): it transforms them in a way remit_ext's fused head does not "
            "reproduce. Pass verify=False only if you know the difference is harmless")


def _check_scorer_alone(scorer) -> None:
    """A frozen scorer on its own (score-hf): a causal LM with a plain head, no soft-capping."""
    if not isinstance(scorer, torch.nn.Module) or not hasattr(scorer, "get_decoder"):
        raise TypeError("scorer: expected a Hugging Face causal LM (a PreTrainedModel with "
                        f"get_decoder / get_output_embeddings), got {type(scorer).__name__}")
    _head(scorer, "scorer")
    _refuse_unsupported(scorer, "scorer")
    logit_scale(scorer, "scorer")


def _check_scorer(model, scorer) -> None:
    if scorer is model:
        raise ValueError("scorer: expected a separate frozen model, got the policy itself")
    if not isinstance(scorer, torch.nn.Module) or not hasattr(scorer, "get_decoder"):
        raise TypeError("scorer: expected a Hugging Face causal LM (a PreTrainedModel with "
                        f"get_decoder / get_output_embeddings), got {type(scorer).__name__}")
    policy_ids = {id(p) for p in model.parameters()}
    if any(id(p) in policy_ids for p in scorer.parameters()):
        raise ValueError("scorer: shares parameters with the policy; the frozen scorer must be "
                         "its own copy (copy.deepcopy(model) before training, or load it again)")
    v_policy = _head(model, "model").weight.shape[0]
    v_scorer = _head(scorer, "scorer").weight.shape[0]
    if v_policy != v_scorer:
        raise ValueError(
            f"scorer: vocabulary size {v_scorer} (its LM head's rows) differs from the policy's "
            f"{v_policy}: the two models must share one tokenizer and one head size")


# ---------------------------------------------------------------------------- helpers


def packed_cu_seqlens(position_ids: Tensor, shape: torch.Size) -> Tensor:
    """Document offsets over the flattened ``shape`` (the shifted labels' [B, T]) from
    ``position_ids``: a document starts at every row start and wherever the position does not
    follow the previous one by 1, the rule Hugging Face's masking uses to detect packed
    sequences (``find_packed_sequence_indices``). One host sync (``nonzero``)."""
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    pos = pos.expand(shape)
    start = torch.ones(shape, dtype=torch.bool, device=pos.device)
    start[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    idx = start.reshape(-1).nonzero().reshape(-1)
    end = torch.full((1,), start.numel(), dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, end])


def _shift(t: Tensor, fill) -> Tensor:
    """Hugging Face's causal shift: position t is scored against t + 1, the last one gets
    ``fill`` (``ForCausalLMLoss``: pad by one on the right, drop the first)."""
    return F.pad(t, (0, 1), value=fill)[..., 1:]


def _head_operands(hidden: Tensor, head, scale: float):
    """(hidden x scale, weight, bias) in one dtype: autocast's when it is on (as the model's
    own ``lm_head`` call would run), else the head's."""
    w, b = head.weight, getattr(head, "bias", None)
    if scale != 1.0:
        hidden = hidden * scale
    dev = hidden.device.type
    if _is_dtensor(w):
        # An FSDP2-sharded head stays as it is: remit_ext.fsdp gathers it in the activations'
        # dtype (FSDP2's mixed precision: fp32 shards, param_dtype activations).
        if torch.is_autocast_enabled(dev):
            hidden = hidden.to(torch.get_autocast_dtype(dev))
        return hidden, w, b
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, w = hidden.to(dt), w.to(dt)
        b = None if b is None else b.to(dt)
    elif hidden.dtype != w.dtype:
        hidden = hidden.to(w.dtype)
    return hidden, w, b


def _device_of(model) -> torch.device:
    return _head(model, "scorer").weight.device


def get_remit_settings(model) -> Optional[ReMiTSettings]:
    """The settings of a model patched by ``apply_remit``, or None."""
    state = model.__dict__.get(_STATE)
    return None if state is None else state.settings


def get_scorer(model):
    state = model.__dict__.get(_STATE)
    return None if state is None else state.scorer


# ---------------------------------------------------------------------------- forward


def _scorer_pass(state, kw: dict, targets: Tensor, device: torch.device):
    """The frozen scorer on the batch under no_grad: its final hidden states, scaled, and its
    head, on the scorer's own device."""
    scorer = state.scorer
    if scorer.training:
        raise RuntimeError("scorer: in training mode (dropout would make its log-probs random); "
                           "call scorer.eval(), apply_remit froze it in eval mode")
    if kw.get("input_ids") is None:
        raise ValueError("scorer: the live scorer needs input_ids (it has its own embeddings), "
                         "got inputs_embeds only")
    sdev = _device_of(scorer)
    inputs = {k: (v.to(sdev) if isinstance(v, Tensor) else v)
              for k, v in kw.items() if k in _SCORER_INPUTS + ("input_ids",) and v is not None}
    with torch.no_grad():
        hidden = scorer.get_decoder()(**inputs, use_cache=False)[0]
        sh, sw, sb = _head_operands(hidden, _head(scorer, "scorer"), state.scorer_scale)
    return sh, sw, sb, targets.to(sdev)


def _fused_forward(model, state, kw: dict, labels, shift_labels, scorer_lp, num_items):
    s = state.settings
    ii = s.ignore_index
    keep = kw.pop("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("logits_to_keep: the fused loss scores every position (labels given in "
                         f"training); got logits_to_keep={keep!r}")
    for key in _CACHE_KEYS:
        if kw.pop(key, None) is not None:
            raise ValueError(f"{key}: a KV cache is meaningless for a training forward with labels")
    kw.pop("use_cache", None)
    return_dict = kw.pop("return_dict", None)
    decoder_kw = dict(kw)
    out = model.get_decoder()(**decoder_kw, use_cache=False)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state

    if shift_labels is not None:
        targets = shift_labels
        b = scorer_lp
    else:
        targets = _shift(labels, ii)
        b = None if scorer_lp is None else _shift(scorer_lp, 0.0)
    targets = targets.to(hidden.device)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (the batch's "
                         f"[B, T]), got {tuple(targets.shape)}")
    h, w, bias = _head_operands(hidden, _head(model, "model"), state.scale)

    m = get_method(s.method)
    loss_kw: dict[str, Any] = {}
    if m.scorer == "logprob":
        if b is not None:
            if b.shape != targets.shape:
                raise ValueError(f"{SCORER_COLUMN}: expected shape {tuple(targets.shape)} (like "
                                 f"labels), got {tuple(b.shape)}")
            loss_kw["scorer_logprobs"] = b.to(device=hidden.device, dtype=torch.float32)
        elif state.scorer is not None:
            sh, sw, sb, sy = _scorer_pass(state, kw, targets, hidden.device)
            with torch.no_grad():
                lp = linear_token_stats(sh, sw, sy, bias=sb, ignore_index=ii,
                                        chunk_size=s.chunk_size, memory_budget=s.memory_budget,
                                        backend=s.backend, chunk_dtype=s.chunk_dtype).logprob
            loss_kw["scorer_logprobs"] = lp.to(hidden.device)
        else:
            raise ValueError(
                f"method={s.method!r} needs the frozen scorer's log-probs: apply_remit(model, "
                f"scorer=...) for a live scorer, or a '{SCORER_COLUMN}' batch column (the "
                "offline cache: remit-ext score-hf, remit_ext.hf.ScorerCacheDataset)")
    elif m.scorer == "distribution":
        if state.scorer is None:
            raise ValueError(f"method={s.method!r} needs the teacher's full distribution: "
                             "apply_remit(model, scorer=teacher)")
        sh, sw, sb, _ = _scorer_pass(state, kw, targets, hidden.device)
        loss_kw.update(scorer_hidden=sh.to(hidden.device), scorer_weight=sw.to(hidden.device),
                       scorer_bias=None if sb is None else sb.to(hidden.device),
                       temperature=s.temperature)
    if m.scope == "sequence" and s.packed:
        pos = kw.get("position_ids")
        if pos is not None:
            loss_kw["cu_seqlens"] = packed_cu_seqlens(pos.to(hidden.device), targets.shape)
        elif kw.get("cu_seq_lens_q") is not None and targets.shape[0] == 1:
            loss_kw["cu_seqlens"] = kw["cu_seq_lens_q"].to(device=hidden.device,
                                                           dtype=torch.long)
    if m.divisor == "kept" and num_items is not None:
        # The Trainer's num_items_in_batch counts valid labels; Rho-1's mean divides by the kept
        # tokens: keep_ratio of them (to within the per-micro-batch ceil of its selection).
        num_items = (num_items * s.keep_ratio if isinstance(num_items, Tensor)
                     else torch.tensor(float(num_items) * s.keep_ratio))
    if isinstance(num_items, Tensor):
        num_items = num_items.to(hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        res = remit_linear_loss(h, w, targets, bias=bias, method=s.method, ignore_index=ii,
                                eps=s.eps, keep_ratio=s.keep_ratio,
                                num_items_in_batch=num_items, chunk_size=s.chunk_size,
                                memory_budget=s.memory_budget, chunk_dtype=s.chunk_dtype,
                                return_details=True,
                                backend=s.backend, **loss_kw)
    diag = None if res.diagnostics is None else torch.stack(tuple(res.diagnostics))
    result = ReMiTCausalLMOutput(
        loss=res.loss, logits=None,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
        remit_diagnostics=diag, num_valid_tokens=(targets != ii).sum(),
        token_weights=res.weights)
    return result.to_tuple() if return_dict is False else result


def _dispatch(model, state, kw: dict):
    labels = kw.pop("labels", None)
    shift_labels = kw.pop("shift_labels", None)
    scorer_lp = kw.pop(SCORER_COLUMN, None)
    num_items = kw.pop("num_items_in_batch", None)
    skip_logits = kw.pop("skip_logits", None)
    has_labels = labels is not None or shift_labels is not None
    if skip_logits and not has_labels:
        raise ValueError("skip_logits=True: the fused loss needs labels (or shift_labels)")
    fused = has_labels and (model.training if skip_logits is None else bool(skip_logits))
    if fused:
        return _fused_forward(model, state, kw, labels, shift_labels, scorer_lp, num_items)
    # Evaluation, generation, no labels: the model's own forward (our batch keys removed).
    for key, val in (("labels", labels), ("shift_labels", shift_labels),
                     ("num_items_in_batch", num_items)):
        if val is not None:
            kw[key] = val
    return state.original_forward(**kw)


def _make_forward(state, original_forward):
    sig = inspect.signature(original_forward)
    params = list(sig.parameters.values())
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params}
    var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
    params = [p for p in params if p.kind != p.VAR_KEYWORD]
    # Our batch keys are named in the signature: Trainer keeps only the dataset columns the
    # forward names (remove_unused_columns) and passes num_items_in_batch to one with **kwargs.
    for extra in (SCORER_COLUMN, "shift_labels", "num_items_in_batch", "skip_logits"):
        if extra not in names:
            params.append(inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, default=None))
    params += var_kw or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward() takes {len(positional)} positional arguments, got "
                            f"{len(args)}")
        for name, val in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = val
        return _dispatch(self, self.__dict__[_STATE], kwargs)

    forward.__signature__ = sig.replace(parameters=[self_param] + params)
    forward.__doc__ = ("remit_ext.hf.apply_remit: with labels in training, the fused "
                       f"{state.settings.method!r} loss (no logits); otherwise the model's own "
                       "forward.\n\n" + (original_forward.__doc__ or ""))
    return forward


# ------------------------------------------------------------------------------ public


def apply_remit(model, *, scorer=None, method: str = "remit", eps: float = 0.2,
                keep_ratio: float = 0.6, temperature: float = 1.0, ignore_index: int = -100,
                packed: bool = True, chunk_size: Optional[int] = None,
                memory_budget: Optional[int] = None, backend: str = "auto",
                verify: bool = True, chunk_dtype: Optional[torch.dtype] = None):
    """Patch a Hugging Face causal LM **instance** so that a training forward with ``labels``
    returns ``method``'s loss through ``remit_linear_loss``, with ``out.logits is None``.

    - ``method``: ``"remit"`` (default; ``eps``), ``"ntp"`` (the model's own cross-entropy,
      reproduced), ``"rho1"`` (``keep_ratio``) or ``"kd"`` (``temperature``; needs a live
      ``scorer``, the teacher).
    - ``scorer``: a frozen causal LM with the same vocabulary (head rows); it may differ in size,
      dtype and device. ``apply_remit`` puts it in eval mode and turns off its gradients; it is
      not registered as a submodule (it stays out of ``model.parameters()``, the optimizer and
      checkpoints, and ``model.to()`` does not move it). Without one, ReMiT and Rho-1 read a
      ``scorer_logprobs`` batch column (label-aligned like ``labels``: entry t is the scorer's
      log p(x_t | x_<t), see ``remit_ext.hf.cache``); a column, when present, is used instead
      of the live scorer.
    - Labels are shifted as Hugging Face does (pre-shifted ``shift_labels`` are taken as they
      are, and then ``scorer_logprobs`` must be aligned with them); ``num_items_in_batch``
      (passed by ``Trainer``) divides the loss instead of the local valid-token count.
    - ``packed``: ReMiT's centring is per document where ``position_ids`` restart (Hugging Face's
      ``DataCollatorWithFlattening``, TRL's ``padding_free``) or by ``cu_seq_lens_q``; else per
      row.
    - ``chunk_size`` / ``memory_budget``: the fused head's chunking (``remit_linear_loss``);
      ``chunk_dtype``: None (default) forms the chunk logits in the model's dtype, reproducing
      its own bf16 loss; ``torch.float32`` forms them in fp32 (closer to the fp64 truth, at
      the cost of fp32 copies of the heads: ``remit_linear_loss``).
    - ``verify``: a probe forward on 8 tokens checks that decoder + head reproduce the model's
      (and the scorer's) logits; a mismatch is refused.
    - FSDP2: call ``apply_remit`` before ``fully_shard`` (the probe runs the unsharded model).
      A head sharded in its own group (``fully_shard(model.lm_head)``: its forward never runs,
      its weight stays a ``Shard(0)`` DTensor) goes through ``remit_ext.fsdp`` (gathered, its
      gradient reduce-scattered and averaged like FSDP2's); a live scorer's decoder and head
      are sharded as groups of their own (its decoder is called directly). Tensor-parallel
      head layouts are refused.

    Evaluation mode and forwards without labels run the model's own forward (logits, its own
    loss); ``skip_logits=True|False`` in a call overrides the choice. The forward returns a
    ``ReMiTCausalLMOutput`` (``remit_diagnostics``, ``num_valid_tokens``, ``token_weights``).
    Returns ``model``. ``remove_remit(model)`` undoes it.
    """
    m = get_method(method)
    if m.scorer == "none" and scorer is not None:
        raise ValueError(f"scorer: method={method!r} uses no scorer; got one")
    if m.scorer == "distribution" and scorer is None:
        raise ValueError(f"scorer: method={method!r} needs the teacher model (its full "
                         "distribution; a log-prob cache is not enough)")
    # The numbers, each checked under its own name (float('abc') would say neither which
    # argument nor what it takes), in the one place every fused-linear caller checks them.
    opts = loss_options(m, ignore_index=ignore_index, eps=eps, keep_ratio=keep_ratio,
                        temperature=temperature)
    if chunk_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"chunk_dtype: expected None, torch.float32 or torch.float64, got "
                         f"{chunk_dtype!r}")
    eps, keep_ratio, temperature = opts.eps, opts.keep_ratio, opts.temperature
    for name in ("get_decoder", "get_output_embeddings"):
        if not hasattr(model, name):
            raise TypeError(f"model: expected a Hugging Face causal LM with {name}(), got "
                            f"{type(model).__name__}")
    if _STATE in model.__dict__:
        remove_remit(model)
    _refuse_unsupported(model, "model")
    scale = logit_scale(model, "model")
    settings = ReMiTSettings(method, float(eps), float(keep_ratio), float(temperature),
                             int(ignore_index), bool(packed), chunk_size, memory_budget, backend,
                             chunk_dtype)
    scorer_scale = 1.0
    if scorer is not None:
        _check_scorer(model, scorer)
        _refuse_unsupported(scorer, "scorer")
        scorer_scale = logit_scale(scorer, "scorer")
        scorer.eval()
        scorer.requires_grad_(False)
    had_instance = "forward" in model.__dict__
    original = model.forward
    if verify:
        _probe(model, original, scale, "model")
        if scorer is not None:
            _probe(scorer, scorer.forward, scorer_scale, "scorer")
    state = _ReMiTState(settings, scorer, original, had_instance, scale, scorer_scale)
    model.__dict__[_STATE] = state
    model.forward = MethodType(_make_forward(state, original), model)
    return model


def remove_remit(model):
    """Undo ``apply_remit``: the model's forward as it was. Returns ``model``."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.had_instance_forward:
        model.forward = state.original_forward
    else:
        model.__dict__.pop("forward", None)
    return model
