"""Implicit rewards and their margins: pure functions on arrays (numpy or torch alike)."""

from __future__ import annotations


def dpo_reward(logp_policy, logp_ref, beta: float):
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over response tokens (paper Eq. 5)."""
    return beta * (logp_policy - logp_ref)


def averaged_reward(logp_policy, logp_ref, ntok, beta: float):
    """r(x, y) = beta / |y| * (log pi(y|x) - log pi_ref(y|x)): the length-averaged log-ratio IPO trains on."""
    return beta * (logp_policy - logp_ref) / ntok


def simpo_reward(logp_policy, ntok, beta: float):
    """r(x, y) = beta / |y| * log pi(y|x): reference-free, length-normalised (Meng et al. 2024)."""
    return beta * logp_policy / ntok


def reward_margin(reward_chosen, reward_rejected):
    """IRM = r(x, y_chosen) - r(x, y_rejected)."""
    return reward_chosen - reward_rejected


def ensemble_margin(irm_prev, irm_now, lam: float):
    """IRM_t = lambda * IRM_{t-1} + (1 - lambda) * IRM_now (paper Eq. 7)."""
    return lam * irm_prev + (1.0 - lam) * irm_now
