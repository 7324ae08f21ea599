"""grpo_loss against hand-computed values: identities, clipping, KL and the four normalisations."""

import math

import pytest
import torch

from grpo import grpo_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # completions of 3 tokens and 1 token
ADV = torch.tensor([1.0, -2.0])


def loss_of(logps, old, ref=None, adv=ADV, mask=MASK, **kw):
    kw = {"max_completion_length": 8, "gradient_accumulation_steps": 2, "num_items_in_batch": 10.0, **kw}
    return grpo_loss(logps, old, ref, adv, mask, **kw)


def test_ratio_is_one_when_old_equals_new_but_the_gradient_is_not_zero():
    logps = torch.full((2, 4), -1.5, requires_grad=True)
    loss, metrics = loss_of(logps, logps.detach(), loss_type="bnpo", gradient_accumulation_steps=1)
    # ratio = 1 everywhere, so L_{i,t} = -A_i: tokens -1, -1, -1 (row 0) and +2 (row 1); bnpo: (-3 + 2) / 4
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()
    # d loss / d logp_{i,t} = -A_i · mask / 4: the policy gradient, although the loss value is tiny
    expected = -ADV[:, None] * MASK / 4
    torch.testing.assert_close(logps.grad, expected)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", ((-3 / 3) + (2 / 1)) / 2 / 2),  # mean over sequences of the mean over tokens, / GA
    ("bnpo", (-3 + 2) / 4 / 2),              # over the 4 tokens of the micro-batch, / GA
    ("dr_grpo", (-3 + 2) / (2 * 8) / 2),     # over N × max_completion_length, / GA
    ("dapo", (-3 + 2) / 10),                 # over the 10 tokens of the whole generation batch, no GA
])
def test_each_loss_type_equals_its_formula_with_unequal_lengths(loss_type, expected):
    logps = torch.full((2, 4), -0.7)
    loss, _ = loss_of(logps, logps, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected)


def test_dapo_divides_by_tokens_per_process():
    logps = torch.full((2, 4), -0.7)
    loss, _ = loss_of(logps, logps, loss_type="dapo", num_items_in_batch=20.0, world_size=2)
    assert loss.item() == pytest.approx(-1 / 10)


def test_clipping_takes_effect_exactly_where_it_must():
    # One token per row; ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, -1, +1, -1 and ε = 0.2.
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4, 1)
    logps = ratios.log().clone().requires_grad_(True)
    mask = torch.ones(4, 1, dtype=torch.long)
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2)
    # -min(r·A, clip(r)·A): 1.5·1 -> clipped to 1.2 (loss -1.2); 0.5·-1 -> clipped 0.8 (loss 0.8);
    # 0.5·1 -> 0.5 is smaller than 0.8 (loss -0.5); 1.5·-1 -> -1.5 is smaller than -1.2 (loss 1.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    loss.backward()
    # Clipped tokens get no gradient; the other two get -A·r/4 (d r / d logp = r).
    torch.testing.assert_close(logps.grad.squeeze(1), torch.tensor([0.0, 0.0, -0.5 / 4, 1.5 / 4]))
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.5)


def test_asymmetric_clipping_uses_epsilon_high_above():
    logps = torch.tensor([[math.log(1.25)]])
    loss, _ = grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.long),
                        loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25)  # inside 1 + 0.28: not clipped


def test_k3_kl_is_zero_when_ref_equals_policy_and_positive_otherwise():
    logps = torch.full((2, 4), -1.0)
    loss0, metrics = loss_of(logps, logps, ref=logps.clone(), beta=0.1, loss_type="bnpo")
    assert metrics["kl"].item() == 0.0
    loss_no_kl, _ = loss_of(logps, logps, loss_type="bnpo")
    assert loss0.item() == pytest.approx(loss_no_kl.item())
    ref = logps + math.log(2.0)  # ref - logp = log 2 on every token: k3 = 2 - log 2 - 1
    k3 = 1 - math.log(2.0)
    loss1, metrics = loss_of(logps, logps, ref=ref, beta=0.1, loss_type="bnpo")
    assert metrics["kl"].item() == pytest.approx(k3)
    assert loss1.item() == pytest.approx(loss_no_kl.item() + 0.1 * k3 / 2)  # bnpo: token mean / GA=2
    assert loss_of(logps, logps, ref=logps - 0.3, beta=0.1)[1]["kl"].item() > 0


def test_sequence_level_importance_ratio_is_the_mean_log_ratio_of_the_sequence():
    old = torch.zeros(2, 4)
    logps = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.4, 9.0, 9.0, 9.0]])  # masked positions must not count
    adv = torch.tensor([1.0, 1.0])
    loss, _ = grpo_loss(logps, old, None, adv, MASK, loss_type="bnpo", importance_sampling_level="sequence",
                        epsilon_low=10.0, epsilon_high=10.0)
    # row 0: exp(mean(0.1, 0.2, 0.3)) = exp(0.2) on 3 tokens; row 1: exp(0.4) on 1 token
    assert loss.item() == pytest.approx(-(3 * math.exp(0.2) + math.exp(0.4)) / 4)
