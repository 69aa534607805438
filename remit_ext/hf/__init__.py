"""Hugging Face drop-in (``pip install 'remit_ext[hf]'``): ReMiT, Rho-1, KD or NTP mid-training
of a ``transformers`` causal LM through the fused-linear loss, with a live frozen scorer or an
offline scorer cache.

- ``apply_remit(model, scorer=..., method="remit")``: patch a model instance (``patch.py``).
- ``ReMiTTrainer`` / ``ReMiTTrainerMixin``: a ``transformers.Trainer`` (or TRL ``SFTTrainer``)
  that patches its model and logs the ReMiT diagnostics (``trainer.py``).
- ``score_dataset`` (``remit-ext score-hf``), ``ScorerCache``, ``ScorerCacheDataset``,
  ``ReMiTDataCollator``: the offline scorer cache and its join to batches (``cache.py``).

Names are imported on first use, so ``remit_ext`` and its command line load without
``transformers``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "apply_remit": "patch", "remove_remit": "patch", "ReMiTCausalLMOutput": "patch",
    "ReMiTSettings": "patch", "get_remit_settings": "patch", "packed_cu_seqlens": "patch",
    "logit_scale": "patch", "DIAGNOSTIC_NAMES": "patch",
    "ReMiTTrainer": "trainer", "ReMiTTrainerMixin": "trainer",
    "score_dataset": "cache", "ScorerCache": "cache", "ScorerCacheDataset": "cache",
    "ScorerCacheMismatchError": "cache", "ReMiTDataCollator": "cache",
    "sequence_hash": "cache", "read_token_sequences": "cache", "add_scorer_logprobs": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'remit_ext.hf' has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        if getattr(e, "name", None) in ("transformers", "safetensors", "accelerate"):
            raise ImportError(f"remit_ext.hf.{name} needs {e.name}: pip install "
                              "'remit_ext[hf]' (transformers, accelerate)") from e
        raise
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
