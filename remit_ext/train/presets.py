"""Named configurations of the whole flywheel: model size, data sizes, steps and rates.

``tiny`` is for tests (seconds), ``default`` fits the 15-minute budget of a 2-core CPU,
``gpu`` is a larger run for one GPU. Any field can be overridden from the command line
(``--set midtrain_steps=100``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .data import VOCAB_SIZE, max_difficulty_len
from .model import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    seed: int = 0
    # model
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    # data: difficulty 1..max_k operations; rows in each split
    max_k: int = 6
    noise: float = 0.2  # probability that a pre-training worked step is wrong
    n_pretrain: int = 60_000
    n_midtrain: int = 6_000
    n_rl: int = 4_000
    n_eval: int = 1_200
    # pre-training: warmup, then a constant rate (the "stable" phase of a WSD schedule)
    pretrain_steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    # RL: group-relative policy gradient on exact-answer reward
    rl_steps: int = 300
    rl_prompts: int = 16
    rl_group: int = 8
    rl_lr: float = 2e-4
    rl_temperature: float = 1.0
    post_rl_steps: int = 100  # flywheel: RL of each mid-trained model
    # mid-training: the decay phase, from lr to 0
    midtrain_steps: int = 120
    eps: float = 0.2  # ReMiT clip band
    keep_ratio: float = 0.6  # Rho-1
    kd_temperature: float = 1.0
    # bookkeeping (eval_every: mid-training learning curves; other stages evaluate at the end)
    eval_every: int = 40
    ckpt_every: int = 100

    @property
    def seq_len(self) -> int:
        return max_difficulty_len(self.max_k)

    def model_config(self) -> ModelConfig:
        return ModelConfig(VOCAB_SIZE, self.d_model, self.n_layer, self.n_head,
                           max_len=self.seq_len + 8)

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, assignments: list[str]) -> "Preset":
        """Apply ``field=value`` strings (values parsed with the field's type)."""
        types = {f.name: f.type for f in fields(self)}
        changes = {}
        for a in assignments:
            key, sep, value = a.partition("=")
            if not sep or key not in types or key == "name":
                raise ValueError(f"--set: expected FIELD=VALUE with FIELD one of "
                                 f"{sorted(k for k in types if k != 'name')}, got {a!r}")
            caster = {"int": int, "float": float, "str": str}[str(types[key])]
            try:
                changes[key] = caster(value)
            except ValueError:
                raise ValueError(f"--set {key}: expected a {types[key]}, got {value!r}") from None
        return replace(self, **changes)


PRESETS = {
    "tiny": Preset("tiny", d_model=32, n_layer=1, n_head=2, max_k=3, n_pretrain=512,
                   n_midtrain=128, n_rl=64, n_eval=30, pretrain_steps=12, batch=16, warmup=2,
                   rl_steps=3, rl_prompts=4, rl_group=4, post_rl_steps=2, midtrain_steps=6, eval_every=3,
                   ckpt_every=2),
    "default": Preset("default"),
    "gpu": Preset("gpu", d_model=384, n_layer=6, n_head=6, max_k=8, n_pretrain=400_000,
                  n_midtrain=40_000, n_rl=20_000, n_eval=2_000, pretrain_steps=8_000, batch=256,
                  lr=1e-3, warmup=300, rl_steps=600, rl_prompts=32, rl_group=8, post_rl_steps=200,
                  midtrain_steps=2_000, eval_every=250, ckpt_every=500),
}


def get_preset(name: str, overrides: list[str] | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].override(overrides or [])
