"""Rewards, margins and the ensemble against hand-computed values."""

import numpy as np
from numpy.testing import assert_allclose

from sera_cli.data.rewards import ensemble_margin, reward_margin
from trainers.losses import implicit_reward


def test_dpo_reward_and_margin():
    # beta = 0.1: r_c = 0.1*(-10 - -12) = 0.2 ; r_r = 0.1*(-20 - -15) = -0.5 ; IRM = 0.7
    rc = implicit_reward("dpo", np.array([-10.0]), np.array([-12.0]), np.array([3]), 0.1)
    rr = implicit_reward("dpo", np.array([-20.0]), np.array([-15.0]), np.array([5]), 0.1)
    assert_allclose(rc, [0.2])
    assert_allclose(rr, [-0.5])
    assert_allclose(reward_margin(rc, rr), [0.7])


def test_simpo_reward_is_length_normalised():
    # beta = 2: 2 * -12 / 4 = -6 ; 2 * -3 / 1 = -6 ; 2 * -9 / 3 = -6
    got = implicit_reward("simpo", np.array([-12.0, -3.0, -9.0]), np.array([5.0, 5.0, 5.0]), np.array([4, 1, 3]), 2.0)
    assert_allclose(got, [-6.0, -6.0, -6.0])  # the reference is ignored


def test_ipo_reward_is_the_length_averaged_dpo_reward():
    # beta = 0.1: 0.1 * (-10 - -12) / 4 = 0.05 ; an empty response counts one token: 0.1 * (-1 - 0) / 1 = -0.1
    got = implicit_reward("ipo", np.array([-10.0, -1.0]), np.array([-12.0, 0.0]), np.array([4, 0]), 0.1)
    assert_allclose(got, [0.05, -0.1])


def test_ensemble_margin():
    # lambda = 0.3: 0.3*1 + 0.7*2 = 1.7 ; 0.3*(-1) + 0.7*0 = -0.3
    assert_allclose(ensemble_margin(np.array([1.0, -1.0]), np.array([2.0, 0.0]), 0.3), [1.7, -0.3])
