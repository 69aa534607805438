"""A small decoder-only transformer in plain PyTorch (pre-LayerNorm, learned positions, untied
LM head) with a key/value cache for sampling, and left-padded batches of prompts of different
lengths (RMT's rollouts start at positions inside texts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    max_len: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


KVCache = list  # per layer: (keys, values), each [B, heads, cached positions, head dim]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x: Tensor, cache: Optional[KVCache], layer: int,
                mask: Optional[Tensor] = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (u.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for u in (q, k, v))
        if cache is not None:
            if len(cache) > layer:
                k = torch.cat([cache[layer][0], k], dim=2)
                v = torch.cat([cache[layer][1], v], dim=2)
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
        # With a cache the queries are the newest positions, which may see every cached key;
        # the causal mask is then only needed among the new positions themselves (t > 1).
        # A left-padded batch brings its own mask (causal, and no key inside the padding).
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif k.shape[2] == t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, idx: Tensor, cache: Optional[KVCache] = None, start: int = 0,
                pad: Optional[Tensor] = None) -> Tensor:
        """Final hidden states ``[B, T, d]`` for tokens in slots ``start .. start+T-1``.

        ``pad`` (``[B]``, optional) is the number of left-padding slots of each row: row b's
        token in slot j sits at position ``j - pad[b]`` and no query sees a padding key (a
        padding query sees only itself, so that nothing is NaN).
        """
        t = idx.shape[1]
        slots = torch.arange(start, start + t, device=idx.device)
        if pad is None:
            pos, mask = slots, None
        else:
            pos = (slots - pad[:, None]).clamp(min=0)
            keys = torch.arange(start + t, device=idx.device)
            causal = keys[None, :] <= slots[:, None]  # [T, S]
            real = keys[None, :] >= pad[:, None]  # [B, S]
            mask = (causal[None] & real[:, None]) | (keys[None, None, :] == slots[None, :, None])
            mask = mask[:, None]  # [B, 1, T, S], broadcast over heads
        # Slots bound positions (a left-padded batch's longest row has no padding); checking
        # them keeps this free of a host synchronisation.
        if start + t > self.cfg.max_len:
            raise ValueError(f"idx: slots up to {start + t} exceed max_len={self.cfg.max_len}")
        x = self.tok(idx) + self.pos(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask)
        return self.ln_f(x)

    def forward(self, idx: Tensor, cache: Optional[KVCache] = None, start: int = 0,
                hidden_only: bool = False, pad: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B, T, V]``, or with ``hidden_only`` the final hidden states, for a loss
        that applies ``self.head`` itself (``remit_ext.remit_linear_loss``). ``pad``: see
        ``hidden``."""
        h = self.hidden(idx, cache, start, pad)
        return h if hidden_only else self.head(h)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new: int, *, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue equal-length prompts ``[B, P]`` by ``max_new`` tokens (greedy when
        ``temperature == 0``) with a key/value cache; returns only the new tokens ``[B, max_new]``."""
        cache: KVCache = []
        logits = self(prompt, cache)[:, -1]
        out = []
        for i in range(max_new):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if i + 1 < max_new:
                logits = self(nxt, cache, start=prompt.shape[1] + i)[:, -1]
        return torch.cat(out, dim=1)
