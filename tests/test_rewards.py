"""Rewards, margins and the ensemble against hand-computed values."""

import numpy as np
from numpy.testing import assert_allclose

from sera_cli.rewards import dpo_reward, ensemble_margin, reward_margin, simpo_reward


def test_dpo_reward_and_margin():
    # beta = 0.1: r_c = 0.1*(-10 - -12) = 0.2 ; r_r = 0.1*(-20 - -15) = -0.5 ; IRM = 0.7
    rc = dpo_reward(np.array([-10.0]), np.array([-12.0]), 0.1)
    rr = dpo_reward(np.array([-20.0]), np.array([-15.0]), 0.1)
    assert_allclose(rc, [0.2])
    assert_allclose(rr, [-0.5])
    assert_allclose(reward_margin(rc, rr), [0.7])


def test_simpo_reward_is_length_normalised():
    # beta = 2: 2 * -12 / 4 = -6 ; 2 * -3 / 1 = -6 ; 2 * -9 / 3 = -6
    assert_allclose(simpo_reward(np.array([-12.0, -3.0, -9.0]), np.array([4, 1, 3]), 2.0), [-6.0, -6.0, -6.0])


def test_ensemble_margin():
    # lambda = 0.3: 0.3*1 + 0.7*2 = 1.7 ; 0.3*(-1) + 0.7*0 = -0.3
    assert_allclose(ensemble_margin(np.array([1.0, -1.0]), np.array([2.0, 0.0]), 0.3), [1.7, -0.3])
