"""Direct-alignment losses as pure functions of the per-pair margin h, plus what each one needs.

Every loss here depends on the two responses only through

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

(the implicit reward margin of SeRA divided by beta), computed by `log_ratios` from per-sequence log-probs.
A `LossSpec` says whether the reference terms exist (SimPO has none: they are zero) and whether the
log-probs are summed over the response or averaged per token, so the trainer never branches on a loss name.
Each function returns per-pair losses; the trainer averages them over the batch.

Cross-checked against TRL 1.16 (`trl/trainer/dpo_trainer.py`, `_compute_loss`): its `sigmoid`, `hinge`
(with delta = 1), `ipo` and `robust` losses are `dpo_loss`, `slic_loss`, `ipo_loss` and `rdpo_loss` below,
with the same summed or averaged log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module imports no torch: its specs are read by commands that must stay light
    from torch import Tensor


def _logsigmoid(x: Tensor) -> Tensor:
    from torch.nn.functional import logsigmoid

    return logsigmoid(x)


def dpo_loss(h: Tensor, beta: float) -> Tensor:
    """DPO (SeRA Eq. 6; Rafailov et al. 2023): -log sigmoid(beta * h), h from summed log-probs."""
    return -_logsigmoid(beta * h)


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO (SeRA Eq. 8; Azar et al. 2023): (h - 1/(2 beta))^2, beta being IPO's tau.

    h comes from length-averaged log-ratios (each response's log-ratio divided by its token count). The
    square pulls h to a fixed target, so with summed log-probs the target would mean something different for
    a 5-token and a 500-token response; per-token averaging makes beta comparable across lengths. TRL does
    the same and reports that the IPO authors confirmed their results use this normalised form.
    """
    return (h - 1 / (2 * beta)) ** 2


def slic_loss(h: Tensor, beta: float, delta: float) -> Tensor:
    """SLiC-HF (SeRA Eq. 9; Zhao et al. 2023): hinge max(0, delta - beta * h), h from summed log-probs.

    Like TRL's `hinge` (delta = 1) the hinge acts on the log-ratio margin, so it optimises the IRM that SeRA
    selects by; the original SLiC-HF applies it to the policy's log-probs alone.
    """
    return (delta - beta * h).clamp(min=0)


def simpo_loss(h: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (SeRA Eq. 18; Meng et al. 2024): -log sigmoid(beta * h - gamma), reference-free, h from the
    length-averaged log-probs log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|; gamma is the target reward margin."""
    return -_logsigmoid(beta * h - gamma)


def cdpo_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """Conservative DPO (Mitchell 2023): DPO with labels smoothed by eps, the assumed flip rate:
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)


def rdpo_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): the unbiased estimate of the clean DPO loss under labels
    flipped with rate eps < 1/2: [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps), l(h) = -log sigmoid(beta h)."""
    return ((1 - eps) * -_logsigmoid(beta * h) - eps * -_logsigmoid(-beta * h)) / (1 - 2 * eps)


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs: its function, whether it uses a reference model, summed or averaged log-probs,
    the hyper-parameters it takes (named as in `TrainConfig`) and its default beta."""

    fn: Callable[..., Tensor]
    needs_ref: bool
    average_logps: bool
    params: tuple[str, ...]
    default_beta: float
    summary: str


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, True, False, ("beta",), 0.1, "-log sigmoid(beta h)"),
    "ipo": LossSpec(ipo_loss, True, True, ("beta",), 0.1, "(h - 1/(2 beta))^2"),
    "slic": LossSpec(slic_loss, True, False, ("beta", "delta"), 0.1, "max(0, delta - beta h)"),
    "simpo": LossSpec(simpo_loss, False, True, ("beta", "gamma"), 2.0, "-log sigmoid(beta h - gamma)"),
    "cdpo": LossSpec(cdpo_loss, True, False, ("beta", "eps"), 0.1, "DPO with label smoothing eps"),
    "rdpo": LossSpec(rdpo_loss, True, False, ("beta", "eps"), 0.1, "unbiased DPO under flip rate eps"),
}


def log_ratios(policy: Tensor, ref: Tensor, ntok: Tensor, average: bool) -> Tensor:
    """log pi(y|x) - log pi_ref(y|x) per sequence, divided by its token count when `average`.

    policy, ref: summed log-probs [N]; ref is zeros for a reference-free loss. ntok: response tokens [N].
    """
    if policy.shape != ref.shape or policy.shape != ntok.shape:
        raise ValueError(f"shapes differ: policy {tuple(policy.shape)}, ref {tuple(ref.shape)}, "
                         f"ntok {tuple(ntok.shape)}")
    ratio = policy - ref.to(policy)
    return ratio / ntok.clamp(min=1).to(ratio) if average else ratio


@dataclass(frozen=True)
class RewardSpec:
    """An implicit reward r(x, y) from summed log-probs: whether it uses the reference and whether the log-ratio
    is averaged per response token. Each loss trains on the margin of one of these (`reward_of`)."""

    needs_ref: bool
    average_logps: bool
    summary: str


REWARDS: dict[str, RewardSpec] = {
    "dpo": RewardSpec(True, False, "beta * (log pi - log pi_ref), summed (SeRA Eq. 5)"),
    "ipo": RewardSpec(True, True, "the same averaged per token (the margin IPO trains on)"),
    "simpo": RewardSpec(False, True, "beta/|y| * log pi, reference-free (SimPO)"),
}


def implicit_reward(name: str, policy, ref, ntok, beta: float):
    """r(x, y) of the reward `name` from summed log-probs (numpy or torch alike): beta * (policy - ref), divided by
    the token count `ntok` (at least 1) when the reward is averaged; `ref` is ignored by a reference-free reward."""
    spec = REWARDS[name]
    ratio = policy - ref if spec.needs_ref else policy
    if spec.average_logps:
        ratio = ratio / (ntok.clip(min=1) if hasattr(ntok, "clip") else max(ntok, 1))
    return beta * ratio


def reward_of(loss: str) -> str:
    """The implicit reward whose margin `loss` optimises: the one with the same reference use and averaging."""
    spec = LOSSES[loss]
    return next(name for name, r in REWARDS.items()
                if (r.needs_ref, r.average_logps) == (spec.needs_ref, spec.average_logps))
