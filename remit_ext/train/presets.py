"""Named configurations of the whole flywheel: model size, data sizes, steps and rates.

``tiny`` is for tests (seconds), ``default`` fits the 15-minute budget of one seed on one CPU
thread (two seeds run side by side on a 2-core machine),
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
    # torch intra-op threads per training process (0: torch's default). Fixed, so that a
    # committed number reproduces bit for bit on any machine with the same torch build and
    # CPU kind: at seed 0 the old default gave 67.5% base accuracy at one thread count and
    # 40.7% at another (issue 18). `flywheel --seeds K` runs seeds in parallel processes.
    threads: int = 1
    # model
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    # data: difficulty 1..max_k operations; rows in each split. The task (issue 18) was chosen
    # to leave headroom before any method was compared on it: at max_k = 6 and 600 pre-training
    # steps seed 1 reached 99.7-100% with every method; chains of up to 8 operations (errors
    # compound over two more steps) and a third less pre-training (400 steps) leave the base
    # and the mid-trained models below the ceiling.
    max_k: int = 8
    noise: float = 0.2  # probability that a pre-training worked step is wrong
    n_pretrain: int = 30_000
    n_midtrain: int = 6_000
    n_rl: int = 4_000
    n_eval: int = 1_200
    # pre-training: warmup, then a constant rate (the "stable" phase of a WSD schedule)
    pretrain_steps: int = 400
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    # RL: group-relative policy gradient on exact-answer reward. The flywheel's reference is
    # this RL run on the NTP mid-trained model; post_rl_steps: RL of every mid-trained model.
    rl_steps: int = 150
    rl_prompts: int = 16
    rl_group: int = 8
    # Ours (issue 24): the RL recipe. The papers' GRPO (a constant 2e-4 from a fresh AdamW,
    # whitened +/- advantages, each rollout's tokens weighted A_i / (G L_i)) lowered greedy
    # accuracy by 6-15 points and raised the NLL of step results and answers 1.8-3.6x on this
    # task (bench/results/flywheel_default/rl_recipe.md); the rl_* fields below give the old
    # recipe back with rl_lr=2e-4 rl_warmup=0 rl_decay=0 rl_advantage=whiten
    # rl_normalize=length.
    rl_lr: float = 1e-4
    rl_warmup: int = 10  # linear warm-up steps of the fresh optimizer
    rl_decay: int = 1  # 1: then linear decay to 0 over the stage (an RL anneal); 0: constant
    # "positive": whitened group advantages clipped at 0, so a failed chain (most of whose
    # step results are correct arithmetic) is never pushed down; "whiten": +/- (GRPO).
    rl_advantage: str = "positive"
    # "constant": every completion token weighs A_i / (B G max_new); "length": A_i / (B G L_i),
    # which with asymmetric advantages lets the shortest format (answer only) win.
    rl_normalize: str = "constant"
    rl_temperature: float = 1.0
    # Ours (issue 24): every mid-trained model gets the reference's own RL stage (150 steps of
    # the recipe above, on its own random stream). 40 steps of it lowered greedy accuracy of
    # every model (-0.3 to -1.2 points over 4 seeds) where 150 raised it (+1.4 to +1.8;
    # bench/results/flywheel_default/rl_recipe_post.md).
    post_rl_steps: int = 150
    # Evaluation beside greedy accuracy: this many samples per held-out problem at
    # rl_temperature (sampled accuracy, what RL optimises); 0: greedy only.
    eval_samples: int = 4
    # mid-training: the decay phase, from lr to 0
    midtrain_steps: int = 120
    eps: float = 0.2  # ReMiT clip band
    keep_ratio: float = 0.6  # Rho-1
    kd_temperature: float = 1.0
    # RMT (METHODS.md section 4). The budget is scaled to this corpus (the paper's B_0 = 800
    # is for LLM reasoning; here an RL position is a step result or the answer, and the
    # thought that predicts one needs at most the step in hand, 6 characters); |C| and B_0
    # were cut from 16 and 40 to fit one seed in ~15 min on one thread (a step of 128
    # rollouts of up to 80 tokens took ~5 s on the shared 2-core machine, 64 of up to 48
    # ~3.3 s). The rest are the section's defaults unless marked "ours".
    rmt_positions: int = 8  # |C|: RL positions sampled per step (the batch's other tokens: NTP)
    rmt_group: int = 8  # G rollouts per position
    rmt_budget0: int = 16  # B_0
    rmt_budget_min: int = 1  # B_min
    rmt_gamma: float = 0.2  # B_t = max(B_min, floor(B_0 * gamma^(t/T)))
    rmt_omega: float = 0.1  # weight of the length reward
    rmt_lambda: float = 0.1  # weight of the NTP term
    rmt_tiers: str = "0.5,1.0,1.5"  # entropy thresholds of easy / medium / hard
    rmt_mix_start: str = "0.6,0.3,0.1"  # tier mix before 30% of training
    rmt_mix_end: str = "0.1,0.3,0.6"  # tier mix after 70%
    rmt_topk: int = 0  # entropy over the top-k probabilities (0: the full entropy)
    # 1: average each rollout's log-probs over its tokens; 0: the section's sum. Ours: in a
    # trial run (default preset, an earlier corpus variant) the sum gave pre-clip gradient
    # norms of 30-47 and held-out NLL rose from 1.09 to 6.6 within 40 steps; with the token
    # mean the norm stays near 1-3.
    rmt_token_mean: int = 1
    rmt_temperature: float = 1.0  # rollout sampling temperature
    # Ours (issue 18): "position" divides both terms' sums by the batch's valid positions,
    # (sum_C l_RL + lambda sum_rest l_NTP) / N_valid; "term" (METHODS.md) takes each term's
    # mean, which let the RL gradient outweigh lambda * NTP 6-29x.
    rmt_normalize: str = "position"
    # Ours (issue 18): "whiten" (METHODS.md) lets the length term alone set the advantages of
    # a group whose predictions all match or all miss (56-81% of groups); "centre" subtracts
    # the group mean only; "gate" counts the length term only for correct predictions and
    # gives a group without a correctness signal advantage 0 (remit_ext.rmt.rmt_advantages).
    # Chosen by one seed-0 trial of each (mid-training from the same base, B_0 = 24, the
    # rest as here): centre 35.5% answer accuracy, NLL 0.5252, next-token accuracy after a
    # thought 31.7%; gate 33.8%, 0.5334, 23.7% (docs/training.md, RMT).
    rmt_advantage: str = "centre"
    # Ours (issue 18): RL positions only where a thought can help, the step results and the
    # answer ("critical"; "all": any valid position, whose medium/hard tiers were 68-88%
    # random question digits no thought can predict).
    rmt_where: str = "critical"
    # Ours (issue 18): 1 = a thought never samples '<' and the prediction is never '<' or '>'
    # (the only trained '>' closes a rollout's thought).
    rmt_text_only: int = 1
    # Ours (issue 18): the RL term's own AdamW rate (the RL stage's rl_lr; decayed with the
    # mid-training schedule, clipped on its own); 0 = one optimizer at lr over the summed loss.
    rmt_rl_lr: float = 2e-4
    rmt_eval_positions: int = 96  # held-out positions per tier for next-token accuracy
    # bookkeeping (eval_every: mid-training learning curves; other stages evaluate at the end)
    eval_every: int = 60
    ckpt_every: int = 100

    @property
    def seq_len(self) -> int:
        return max_difficulty_len(self.max_k)

    def model_config(self) -> ModelConfig:
        # Positions for RMT's rollouts too: a text prefix, '<', at most 2 B_0 thought tokens,
        # '>' and the prediction. Training texts reach seq_len; the positions beyond are only
        # met by rollouts from late positions (a thought after 'A:' in an answer-only text,
        # the case the corpus's thought style teaches, stays within seq_len).
        return ModelConfig(VOCAB_SIZE, self.d_model, self.n_layer, self.n_head,
                           max_len=self.seq_len + 2 * self.rmt_budget0 + 3 + 8)

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
                   rl_steps=3, rl_prompts=4, rl_group=4, rl_warmup=1, post_rl_steps=2,
                   midtrain_steps=6, eval_every=3, ckpt_every=2, eval_samples=2,
                   rmt_positions=4, rmt_group=4, rmt_budget0=8, rmt_eval_positions=6),
    "default": Preset("default"),
    "gpu": Preset("gpu", threads=0, d_model=384, n_layer=6, n_head=6, max_k=8, n_pretrain=400_000,
                  n_midtrain=40_000, n_rl=20_000, n_eval=2_000, pretrain_steps=8_000,
                  batch=256, rmt_positions=64,
                  rmt_budget0=56, rmt_eval_positions=256,
                  lr=1e-3, warmup=300, rl_steps=600, rl_prompts=32, rl_group=8, post_rl_steps=200,
                  midtrain_steps=2_000, eval_every=250, ckpt_every=500),
}


def get_preset(name: str, overrides: list[str] | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].override(overrides or [])
