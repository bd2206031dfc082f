"""Reward margins and their ensemble: pure functions on arrays (numpy or torch alike). The rewards themselves are
`trainers.losses.implicit_reward`, beside the losses that train on their margins."""

from __future__ import annotations


def reward_margin(reward_chosen, reward_rejected):
    """IRM = r(x, y_chosen) - r(x, y_rejected)."""
    return reward_chosen - reward_rejected


def ensemble_margin(irm_prev, irm_now, lam: float):
    """IRM_t = lambda * IRM_{t-1} + (1 - lambda) * IRM_now (paper Eq. 7)."""
    return lam * irm_prev + (1.0 - lam) * irm_now
