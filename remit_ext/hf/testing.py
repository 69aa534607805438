"""Tiny random-initialised Hugging Face causal LMs built from configs (no downloads): what the
tests, the example in docs/hf.md and ``python -m remit_ext.hf.example`` train.

``tiny_model("llama")`` and friends: 2 layers, hidden 32, grouped-query attention, a vocabulary
of 97 (a multiple of no block size). ``scorer_size=True`` gives a smaller, different model of
the same vocabulary (a scorer may differ in size).
"""

from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_model"]

VOCAB = 97
# name -> (config class name, extra config fields)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {}),  # q/k norms
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),  # logits x 0.5
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),  # logits / 4
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 30.0}),  # soft-capped: refused
}


def tiny_config(arch: str = "llama", *, scorer_size: bool = False, vocab_size: int = VOCAB,
                **overrides):
    import transformers

    cls_name, extra = ARCHITECTURES[arch]
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               attention_dropout=0.0, tie_word_embeddings=False)
    if scorer_size:
        cfg.update(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                   num_attention_heads=3, num_key_value_heads=1)
    cfg.update(extra)
    cfg.update(overrides)
    return getattr(transformers, cls_name)(**cfg)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               scorer_size: bool = False, **overrides):
    """A random-initialised causal LM of ``arch`` (``ARCHITECTURES``), seeded, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, scorer_size=scorer_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype)
