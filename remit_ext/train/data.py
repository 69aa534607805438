"""The embedded corpus: generated multi-step arithmetic with worked solutions and checkable answers.

Every problem is a chain of single-digit operations modulo 10, written character by character::

    Q:3+8*4-5        the question (k operations, k = the problem's difficulty)
    S:3+8=1,1*4=4,4-5=9   the worked solution, one step per operation
    A:9              the answer

Two other styles: answer-only (``Q:3+8*4-5`` then ``A:9``) and "thought" (``Q:3+8*4-5`` then
``A:<3+8=1,1*4=4,4-5=9>9``): the steps written inside ``<`` ``>`` before the answer, the think
span of a reasoning model, which RMT (``remit-ext midtrain --method rmt``) opens before any
token it predicts.

Splits (all deterministic in the seed; the split name is part of each generator's seed, so no
split shares a random stream with another):

- ``pretrain``: "web-quality" text. Half has worked solutions in which each step is wrong
  with probability ``noise`` (the answer then follows the wrong chain, like careless text), 10%
  is the same in the thought style, 15% gives only question and answer, a quarter is single
  facts.
- ``midtrain``: high-quality data, weighted towards longer chains: correct worked solutions,
  and a quarter answer-only texts (whose answer digit is hard to predict without reasoning).
- ``rl``: questions only (the RL stage samples solutions and is rewarded on the answer).
- ``eval``: held-out problems, an equal number per difficulty, with correct solutions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

PAD = "_"
CHARS = PAD + "\n0123456789+-*=,:QSA<>"
STOI = {c: i for i, c in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS)
PAD_ID = STOI[PAD]
NEWLINE_ID = STOI["\n"]
THINK_OPEN_ID, THINK_CLOSE_ID = STOI["<"], STOI[">"]
IGNORE_INDEX = -100
OPS = {"+": lambda x, y: (x + y) % 10, "-": lambda x, y: (x - y) % 10,
       "*": lambda x, y: (x * y) % 10}
SPLITS = ("pretrain", "midtrain", "rl", "eval")


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids) -> str:
    return "".join(CHARS[int(i)] for i in ids)


@dataclass(frozen=True)
class Problem:
    question: str  # "3+8*4-5"
    steps: tuple[str, ...]  # ("3+8=1", "1*4=4", "4-5=9")
    answer: int

    @property
    def difficulty(self) -> int:
        return len(self.steps)

    def prompt(self) -> str:
        return f"Q:{self.question}\n"

    def text(self, style: str = "worked") -> str:
        if style == "worked":
            return f"{self.prompt()}S:{','.join(self.steps)}\nA:{self.answer}\n"
        if style == "answer":
            return f"{self.prompt()}A:{self.answer}\n"
        if style == "thought":
            return f"{self.prompt()}A:<{','.join(self.steps)}>{self.answer}\n"
        raise ValueError(f"style: expected 'worked', 'answer' or 'thought', got {style!r}")


def make_problem(rng: random.Random, k: int, noise: float = 0.0) -> Problem:
    """A chain of k operations; each step's result is replaced by a wrong digit with
    probability ``noise`` (later steps then continue from the wrong value)."""
    x = rng.randrange(10)
    question, steps = str(x), []
    for _ in range(k):
        op, y = rng.choice("+-*"), rng.randrange(10)
        r = OPS[op](x, y)
        if noise and rng.random() < noise:
            r = (r + rng.randrange(1, 10)) % 10
        question += f"{op}{y}"
        steps.append(f"{x}{op}{y}={r}")
        x = r
    return Problem(question, tuple(steps), x)


def max_difficulty_len(k: int) -> int:
    """Characters in a worked problem of difficulty k (the longest style)."""
    return len(make_problem(random.Random(0), k).text())


def _rng(seed: int, split: str) -> random.Random:
    return random.Random(f"remit_ext/{split}/{seed}")


def generate_texts(split: str, n: int, seed: int, max_k: int, noise: float = 0.2) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    rng = _rng(seed, split)
    out = []
    for i in range(n):
        if split == "pretrain":
            u = rng.random()
            if u < 0.6:
                style = "worked" if u < 0.5 else "thought"
                out.append(make_problem(rng, rng.randint(1, max_k), noise).text(style))
            elif u < 0.75:
                out.append(make_problem(rng, rng.randint(1, max_k)).text("answer"))
            else:
                out.append(make_problem(rng, 1).text("answer"))
        elif split == "midtrain":
            # Harder on average than pre-training: k drawn with weight proportional to k.
            k = rng.choices(range(1, max_k + 1), weights=range(1, max_k + 1))[0]
            style = "answer" if rng.random() < 0.25 else "worked"
            out.append(make_problem(rng, k).text(style))
        else:
            raise ValueError(f"split {split!r} holds problems, not texts: use generate_problems")
    return out


def generate_problems(split: str, n: int, seed: int, max_k: int) -> list[Problem]:
    """Questions for the RL stage (uniform k) or held-out evaluation (n // max_k per k)."""
    if split not in ("rl", "eval"):
        raise ValueError(f"split: expected 'rl' or 'eval', got {split!r}")
    rng = _rng(seed, split)
    if split == "rl":
        return [make_problem(rng, rng.randint(1, max_k)) for _ in range(n)]
    per_k = max(1, n // max_k)
    return [make_problem(rng, k) for k in range(1, max_k + 1) for _ in range(per_k)]


def pack_rows(texts: list[str], seq_len: int) -> tuple[Tensor, Tensor]:
    """One text per row: inputs ``[M, seq_len]`` (the text shifted right after a leading
    newline, padded) and next-token targets (``IGNORE_INDEX`` past the end of the text)."""
    inputs = torch.full((len(texts), seq_len), PAD_ID, dtype=torch.long)
    targets = torch.full((len(texts), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [NEWLINE_ID] + encode(t)  # the leading newline is the start-of-text token
        if len(ids) - 1 > seq_len:
            raise ValueError(f"texts[{i}]: {len(ids) - 1} characters do not fit seq_len={seq_len}")
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, :n] = torch.tensor(ids[1:])
    return inputs, targets


def parse_answer(generated: str) -> int | None:
    """The answer digit after the first 'A:' of a completion (after its ``<...>`` thought, if
    one follows 'A:'), or None if there is none."""
    at = generated.find("A:")
    if at < 0:
        return None
    at += 2
    if generated[at:at + 1] == "<":
        close = generated.find(">", at)
        if close < 0:
            return None
        at = close + 1
    if at >= len(generated) or not generated[at].isdigit():
        return None
    return int(generated[at])


ROLES = ("other", "result", "answer")


def token_roles(inputs: Tensor) -> Tensor:
    """Role of each next-token target, read from the input that precedes it: 1 for a step's
    result digit (after '='), 2 for the answer digit (after 'A:'), 0 for everything else."""
    roles = torch.zeros_like(inputs)
    roles[inputs == STOI["="]] = 1
    after_a = torch.zeros_like(inputs, dtype=torch.bool)
    after_a[:, 1:] = (inputs[:, 1:] == STOI[":"]) & (inputs[:, :-1] == STOI["A"])
    roles[after_a] = 2
    return roles
