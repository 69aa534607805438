"""``ReMiTTrainer``: ``transformers.Trainer`` with the model patched by ``apply_remit`` and the
ReMiT diagnostics in the Trainer's logs; ``ReMiTTrainerMixin`` gives the same to TRL's
``SFTTrainer`` (``class ReMiTSFTTrainer(ReMiTTrainerMixin, SFTTrainer): pass``).

The scorer is a live frozen model (``scorer_model=``: an instance, or a name / path loaded with
``AutoModelForCausalLM.from_pretrained(name, **scorer_model_init_kwargs)``), or none at all when
the dataset carries cached log-probs (``ScorerCacheDataset`` + ``ReMiTDataCollator``). The model
is patched before the Trainer's ``__init__`` runs, so accelerate's mixed-precision wrapper and
TRL's own forward wrapper wrap the patched forward. The loss is the model's (``Trainer``'s
``compute_loss`` with ``num_items_in_batch``, so gradient accumulation and data parallelism
normalise by the global token count), not TRL's: a subclass's ``compute_loss`` that needs logits
is bypassed, and so are its logits-based metrics (entropy, token accuracy).

Logged with every training log line (pooled over the micro-batches since the previous one, and
summed over processes): ``remit/w_mean``, ``remit/w_std``, ``remit/frac_clip_low``,
``remit/frac_clip_high``, ``remit/abs_delta_hat_mean``, ``remit/delta_mean``,
``remit/valid_tokens``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import transformers

from .patch import DIAGNOSTIC_NAMES, _STATE, apply_remit, get_remit_settings

__all__ = ["ReMiTTrainer", "ReMiTTrainerMixin"]


def _unwrap(model):
    """The transformers model under a PEFT wrapper (PEFT calls its forward)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ReMiTTrainerMixin:
    """Mix in before a ``transformers.Trainer`` subclass.

    Extra keyword arguments: ``scorer_model`` (a frozen causal LM, or a name / path),
    ``scorer_model_init_kwargs`` (for loading it), ``remit_method`` (``"remit"``, ``"ntp"``,
    ``"rho1"``, ``"kd"``), ``remit_kwargs`` (the rest of ``apply_remit``'s options: ``eps``,
    ``keep_ratio``, ``temperature``, ``packed``, ``chunk_size``, ``memory_budget``, ...). A model
    already patched by ``apply_remit`` is kept as it is unless one of them is given.
    """

    def __init__(self, *args, scorer_model=None, scorer_model_init_kwargs: Optional[dict] = None,
                 remit_method: Optional[str] = None, remit_kwargs: Optional[dict] = None,
                 **kwargs):
        if isinstance(scorer_model, str):
            scorer_model = transformers.AutoModelForCausalLM.from_pretrained(
                scorer_model, **(scorer_model_init_kwargs or {}))
        self._remit_apply = dict(remit_kwargs or {})
        if scorer_model is not None:
            self._remit_apply["scorer"] = scorer_model
        if remit_method is not None:
            self._remit_apply["method"] = remit_method
        self._remit_sums: Optional[torch.Tensor] = None
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):
            self._remit_patch(model)  # before accelerate / TRL wrap the forward
        super().__init__(*args, **kwargs)
        base = _unwrap(self.model)
        if _STATE not in base.__dict__:  # a model the Trainer built itself (TRL: a name)
            self._remit_patch(self.model)
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError("label_smoothing_factor: not supported by ReMiTTrainer (the "
                             "smoothed loss needs the full logits, which the fused path never "
                             "forms)")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("compute_loss_func: ReMiTTrainer computes the loss in the model's "
                             "forward (no logits to hand to a custom loss function)")
        # The patched forward divides by num_items_in_batch itself (whatever the model class
        # declares), so the Trainer passes it and leaves gradient accumulation to the loss.
        self.model_accepts_loss_kwargs = True
        scorer = base.__dict__[_STATE].scorer
        if scorer is not None and getattr(scorer, "hf_device_map", None) is None:
            scorer.to(self.args.device)

    def _remit_patch(self, model) -> None:
        base = _unwrap(model)
        if _STATE in base.__dict__ and not self._remit_apply:
            return
        opts = dict(self._remit_apply)
        if _STATE in base.__dict__:  # re-patch: keep what was set unless overridden
            prev = get_remit_settings(base)
            opts = {"method": prev.method, "eps": prev.eps, "keep_ratio": prev.keep_ratio,
                    "temperature": prev.temperature, "ignore_index": prev.ignore_index,
                    "packed": prev.packed, "chunk_size": prev.chunk_size,
                    "memory_budget": prev.memory_budget, "backend": prev.backend,
                    "scorer": base.__dict__[_STATE].scorer, **opts}
        apply_remit(base, **opts)

    @property
    def remit_scorer(self):
        """The live frozen scorer, or None (cached log-probs)."""
        return _unwrap(self.model).__dict__[_STATE].scorer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's own compute_loss (not a subclass's, e.g. TRL's, which reads logits): the
        # patched forward returns the loss, divided by num_items_in_batch when given.
        loss, outputs = transformers.Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._remit_accumulate(outputs)
        return (loss, outputs) if return_outputs else loss

    def _remit_accumulate(self, outputs: Any) -> None:
        diag = getattr(outputs, "remit_diagnostics", None)
        n = getattr(outputs, "num_valid_tokens", None)
        if diag is None or n is None:
            return
        d = diag.detach().double()
        n = n.detach().to(d.device, torch.float64)
        # Token-weighted sums, so the logged values pool the micro-batches exactly
        # (E[w^2] carries the std: population std^2 = E[w^2] - E[w]^2).
        row = torch.stack([n * d[0], n * (d[1] ** 2 + d[0] ** 2), n * d[2], n * d[3], n * d[4],
                           n * d[5], n])
        self._remit_sums = row if self._remit_sums is None else self._remit_sums + row

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._remit_sums is not None and "loss" in logs:
            sums = self._remit_sums
            self._remit_sums = None
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            vals = sums.tolist()  # one host sync per log line, as the Trainer's own loss
            n = max(vals[6], 1.0)
            mean, sq = vals[0] / n, vals[1] / n
            stats = dict(zip(DIAGNOSTIC_NAMES, (mean, max(sq - mean * mean, 0.0) ** 0.5,
                                                vals[2] / n, vals[3] / n, vals[4] / n,
                                                vals[5] / n)))
            logs = {**logs, **{f"remit/{k}": round(v, 6) for k, v in stats.items()},
                    "remit/valid_tokens": int(vals[6])}
        return super().log(logs, *args, **kwargs)


class ReMiTTrainer(ReMiTTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` training its model with ReMiT (or ``remit_method``) through the
    fused-linear loss; see ``ReMiTTrainerMixin`` for the extra arguments.

    ``ReMiTTrainer(model, args, train_dataset=ds, scorer_model=rl_model)`` for a live scorer;
    ``train_dataset=ScorerCacheDataset(ds, cache_dir)``,
    ``data_collator=ReMiTDataCollator(pad_token_id)`` for cached log-probs (no scorer loaded).
    """
