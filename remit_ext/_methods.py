"""What a method of the fused-linear loss is: one ``Method`` entry in ``METHODS``, and the
frozen ``LossOptions`` every caller builds once (``loss_options``: the one place the options are
checked) and every consumer unpacks — the plain engine (``_linear_engine``), the vocab-parallel
heads, the FSDP2 heads, the modules and the Hugging Face patch.

A method says which frozen input it reads, how it turns per-token log-probs into weights and a
divisor, what each token's term is, and over what scope its weights depend on other tokens (which
decides whether the engine can form the gradient in the forward pass). The engine branches on
these fields only, never on a method's name, so a new method is one entry here (plus a kernel
if its term needs one); docs/development.md shows one added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from torch import Tensor

from . import _checks as chk
from .reference import rho1_keep_mask


class Weights(NamedTuple):
    """A method's weights over a batch (or a chunk of whole sequences): ``w [N]`` in the
    accumulation dtype (0 at ignored positions), the loss's divisor (a 0-d count before
    ``reduction`` / ``num_items_in_batch``) and, for ReMiT, the diagnostics ``[6]``."""

    w: Tensor
    count: Tensor
    diagnostics: Optional[Tensor] = None


# weights(backend, a, b, targets, valid, offsets, options) -> Weights. ``a``: the policy's
# per-token values in the accumulation dtype, detached: log-probs a_t for a "ce" term, the KD
# term itself for "kd" (whose weights read only its dtype);
# ``b``: the frozen model's (None unless the method reads "logprob"); ``offsets``: sequence
# offsets into these rows (None unless the scope is "sequence"); ``backend``: the dispatcher's
# backend, for a method whose weights have a kernel.
WeightsFn = Callable[..., Weights]


@dataclass(frozen=True)
class Method:
    """One loss of the fused-linear family (``remit_linear_loss(method=name)``).

    - ``scorer``: the frozen input it reads. ``"none"``; ``"logprob"``: b_t, the frozen model's
      log-prob of the target (``scorer_hidden`` + ``scorer_weight``, or precomputed
      ``scorer_logprobs``); ``"distribution"``: the frozen model's whole softmax
      (``scorer_hidden`` + ``scorer_weight`` only).
    - ``term``: each token's loss before its weight: ``"ce"`` (-a_t) or ``"kd"`` (the KD term of
      METHODS.md, which has its own kernel).
    - ``weights``: the weights and divisor (``WeightsFn``).
    - ``scope``: what a token's weight depends on besides its own row. ``"token"``: nothing
      (the divisor is the valid count) -> one pass over any chunks; ``"sequence"``: the other
      tokens of its sequence (sequence offsets are passed) -> one pass when whole sequences fit
      a chunk, else two; ``"batch"``: the whole batch -> a statistics pass, then a gradient pass.
    - ``options``: which of ``eps``, ``keep_ratio``, ``temperature`` it reads (all three are
      checked on every call; a ``temperature`` other than 1 is refused by a method that does not
      read it, since it would change nothing silently).
    - ``divisor``: what its ``reduction="mean"`` divides by, as its ``weights`` count it:
      ``"valid"`` tokens, or the ``"kept"`` ones (Rho-1: ``keep_ratio`` of the valid ones;
      the Hugging Face patch scales the Trainer's ``num_items_in_batch`` by it).
    - ``diagnostics``: whether its weights come with ReMiT's diagnostics.
    """

    name: str
    scorer: str
    term: str
    weights: WeightsFn
    scope: str
    options: tuple[str, ...] = ()
    divisor: str = "valid"
    diagnostics: bool = False

    @property
    def op(self) -> str:
        """The dispatcher's op name: what a backend must run for this method's chunk steps."""
        return "kd_loss" if self.term == "kd" else "remit_loss"


def valid_weights(backend, a, b, targets, valid, offsets, opts) -> Weights:
    """1 per valid token, divided by the valid count (NTP, KD)."""
    return Weights(valid.to(a.dtype), valid.sum())


def remit_weights(backend, a, b, targets, valid, offsets, opts) -> Weights:
    """ReMiT: clip(2 sigmoid(delta_hat), 1 - eps, 1 + eps) per sequence (the backend's kernel),
    divided by the valid count; with its diagnostics."""
    w, _, diag = backend.remit_weights(a, b, targets, offsets, opts.ignore_index, opts.eps)
    return Weights(w, valid.sum(), diag)


def keep_weights(backend, a, b, targets, valid, offsets, opts) -> Weights:
    """Rho-1: 1 on the ``keep_ratio`` of valid tokens with the largest excess loss b - a over the
    whole batch, divided by the number kept."""
    keep = rho1_keep_mask(b - a, valid, float(opts.keep_ratio)).to(a.dtype)
    return Weights(keep, keep.sum())


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("remit", scorer="logprob", term="ce", weights=remit_weights, scope="sequence",
           options=("eps",), diagnostics=True),
    Method("ntp", scorer="none", term="ce", weights=valid_weights, scope="token"),
    Method("rho1", scorer="logprob", term="ce", weights=keep_weights, scope="batch",
           options=("keep_ratio",), divisor="kept"),
    Method("kd", scorer="distribution", term="kd", weights=valid_weights, scope="token",
           options=("temperature",)),
)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


@dataclass(frozen=True)
class LossOptions:
    """The checked options of one fused-linear loss call (``loss_options``)."""

    method: Method
    ignore_index: int = -100
    eps: float = 0.2
    keep_ratio: float = 0.6
    temperature: float = 1.0

    def schema_args(self) -> tuple:
        """``(method, ignore_index, eps, keep_ratio, temperature)`` in the order of the
        registered op's schema (``_linear_ops``); ``from_schema`` reads them back."""
        return (self.method.name, self.ignore_index, self.eps, self.keep_ratio,
                self.temperature)

    @classmethod
    def from_schema(cls, method: str, ignore_index: int, eps: float, keep_ratio: float,
                    temperature: float) -> "LossOptions":
        return cls(METHODS[method], ignore_index, eps, keep_ratio, temperature)


def get_method(method) -> Method:
    """The ``Method`` named ``method`` (a ``Method`` passes through)."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {method_names()}, got {method!r}")
    return METHODS[method]


def loss_options(method="remit", *, ignore_index: int = -100, eps: float = 0.2,
                 keep_ratio: float = 0.6, temperature: float = 1.0) -> LossOptions:
    """Check the options of a fused-linear loss once and freeze them. Every error names its
    argument, what was expected and what was given."""
    m = get_method(method)
    ignore_index = chk.check_ignore_index(ignore_index)
    eps = chk.check_eps(eps)
    if (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float))
            or not 0 < keep_ratio <= 1):
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {keep_ratio!r}")
    temperature = chk.check_positive(temperature, "temperature")
    if "temperature" not in m.options and temperature != 1.0:
        takes = " or ".join(repr(n) for n, x in METHODS.items() if "temperature" in x.options)
        raise ValueError(f"temperature: only method={takes} takes a temperature, got "
                         f"{temperature} with method={m.name!r}")
    return LossOptions(m, ignore_index, eps, float(keep_ratio), temperature)
