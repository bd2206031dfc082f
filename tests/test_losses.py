"""Each loss against values computed by hand. sp(z) = log(1 + e^z), so -log sigmoid(x) = sp(-x).

Shared inputs: h = [1, 0, -2]; with beta = 0.5, x = beta * h = [0.5, 0, -1], and
sp(-0.5) = 0.474077, sp(0) = 0.693147, sp(1) = 1.313262, sp(-1) = 0.313262, sp(5) = 5.006715.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from trainers.losses import (
    LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    log_ratios,
    rdpo_loss,
    simpo_loss,
    slic_loss,
)

H = torch.tensor([1.0, 0.0, -2.0])


def test_dpo():
    """-log sigmoid(0.5 h) = sp(-x) = [sp(-0.5), sp(0), sp(1)]."""
    assert_close(dpo_loss(H, beta=0.5), torch.tensor([0.474077, 0.693147, 1.313262]))


def test_ipo():
    """(h - 1/(2 * 0.5))^2 = (h - 1)^2 = [0, 1, 9]."""
    assert_close(ipo_loss(H, beta=0.5), torch.tensor([0.0, 1.0, 9.0]))


def test_slic():
    """max(0, 1 - 0.5 h) = max(0, [0.5, 1, 2]) = [0.5, 1, 2]; and a margin delta = 0.25 clips the first pair:
    max(0, 0.25 - [0.5, 0, -1]) = [0, 0.25, 1.25]."""
    assert_close(slic_loss(H, beta=0.5, delta=1.0), torch.tensor([0.5, 1.0, 2.0]))
    assert_close(slic_loss(H, beta=0.5, delta=0.25), torch.tensor([0.0, 0.25, 1.25]))


def test_simpo():
    """beta = 2, gamma = 1: -log sigmoid(2h - 1) = sp(-[1, -1, -5]) = [sp(-1), sp(1), sp(5)]."""
    assert_close(simpo_loss(H, beta=2.0, gamma=1.0), torch.tensor([0.313262, 1.313262, 5.006715]))


def test_cdpo():
    """eps = 0.25: 0.75 sp(-x) + 0.25 sp(x), and sp(x) = sp(-x) + x, so = sp(-x) + 0.25 x
    = [0.474077 + 0.125, 0.693147, 1.313262 - 0.25]."""
    assert_close(cdpo_loss(H, beta=0.5, eps=0.25), torch.tensor([0.599077, 0.693147, 1.063262]))


def test_rdpo():
    """eps = 0.25: (0.75 sp(-x) - 0.25 sp(x)) / 0.5 = (0.5 sp(-x) - 0.25 x) / 0.5 = sp(-x) - 0.5 x
    = [0.474077 - 0.25, 0.693147, 1.313262 + 0.5]."""
    assert_close(rdpo_loss(H, beta=0.5, eps=0.25), torch.tensor([0.224077, 0.693147, 1.813262]))


def test_label_noise_losses_reduce_to_dpo_without_noise():
    assert_close(cdpo_loss(H, beta=0.5, eps=0.0), dpo_loss(H, beta=0.5))
    assert_close(rdpo_loss(H, beta=0.5, eps=0.0), dpo_loss(H, beta=0.5))


def test_log_ratios_sum_or_average():
    """policy - ref = [-10 + 12, -6 + 3, -4 + 4] = [2, -3, 0]; averaged by ntok [4, 3, 1]: [0.5, -1, 0]."""
    policy, ref, ntok = torch.tensor([-10.0, -6.0, -4.0]), torch.tensor([-12.0, -3.0, -4.0]), torch.tensor([4, 3, 1])
    assert_close(log_ratios(policy, ref, ntok, average=False), torch.tensor([2.0, -3.0, 0.0]))
    assert_close(log_ratios(policy, ref, ntok, average=True), torch.tensor([0.5, -1.0, 0.0]))


def test_log_ratios_checks_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        log_ratios(torch.zeros(3), torch.zeros(2), torch.ones(3), average=False)


def test_specs_say_what_each_loss_needs():
    assert {name: (s.needs_ref, s.average_logps) for name, s in LOSSES.items()} == {
        "dpo": (True, False), "ipo": (True, True), "slic": (True, False), "simpo": (False, True),
        "cdpo": (True, False), "rdpo": (True, False)}
    for spec in LOSSES.values():  # every declared hyper-parameter is one the function takes
        assert spec.fn(H, **{p: 0.2 for p in spec.params}).shape == H.shape


def test_losses_have_gradients_of_the_right_sign():
    """Raising the margin h lowers every loss where it is not flat."""
    h = torch.tensor([0.3], requires_grad=True)
    for name, spec in LOSSES.items():
        (grad,) = torch.autograd.grad(spec.fn(h, **{p: 0.2 for p in spec.params}).sum(), h)
        assert grad.item() < 0, name
