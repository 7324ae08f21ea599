"""Group-relative advantages, by hand."""

import math

import pytest
import torch

from grpo import group_advantages, weighted_rewards


def test_seed_worked_example_by_hand():
    # The seed's running example: 2 prompts × G=3 completions, rewards (6,) -> grouped (2, 3).
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    # group 1: mean 3, unbiased std sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7)
    # group 2: mean 4, unbiased std sqrt((16 + 0 + 16) / 2) = 4
    s1, s2 = math.sqrt(7) + 1e-4, 4 + 1e-4
    expected = torch.tensor([-2 / s1, -1 / s1, 3 / s1, -4 / s2, 0.0, 4 / s2])
    torch.testing.assert_close(group_advantages(rewards, 3, "group"), expected)


def test_std_zero_group_gives_zero_and_docstring_example():
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(advantages, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))


def test_nan_rows_give_zero_and_are_left_out_of_the_statistics():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    advantages = group_advantages(rewards, 2)
    # group 1 = [1, NaN]: one value, std undefined -> 0 everywhere; group 2 = [3, 2]: mean 2.5, std sqrt(0.5)
    s = math.sqrt(0.5) + 1e-4
    torch.testing.assert_close(advantages, torch.tensor([0.0, 0.0, 0.5 / s, -0.5 / s]))
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0, 0.0, 0.0])
    # G=3: group 1 = [1, NaN, 3]: mean 2, std sqrt(2); NaN row -> 0
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(group_advantages(rewards, 3), torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))


def test_three_scale_rewards_modes_on_a_hand_made_batch():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])  # G=2: groups [0, 2], [10, 14]; means 1 and 12
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    torch.testing.assert_close(group_advantages(rewards, 2, "none"), centred)
    group_std = torch.tensor([math.sqrt(2)] * 2 + [math.sqrt(8)] * 2)
    torch.testing.assert_close(group_advantages(rewards, 2, "group"), centred / (group_std + 1e-4))
    batch_std = rewards.std()  # unbiased std of all four: mean 6.5, sqrt((42.25+20.25+12.25+56.25)/3)
    assert batch_std.item() == pytest.approx(math.sqrt(131 / 3))
    torch.testing.assert_close(group_advantages(rewards, 2, "batch"), centred / (batch_std + 1e-4))


def test_weighted_rewards_skip_none_and_keep_all_none_rows_nan():
    nan = float("nan")
    rewards_per_func = torch.tensor([[1.0, 2.0], [nan, 2.0], [nan, nan]])
    rewards = weighted_rewards(rewards_per_func, torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(rewards[:2], torch.tensor([0.7 + 0.6, 0.6]))
    assert rewards[2].isnan()
