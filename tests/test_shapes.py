"""The jaxtyping annotations are checked while the tests run: a wrong shape is caught with a clear message."""

import pytest
import torch
from jaxtyping import TypeCheckError

import grpo


def test_loss_with_mismatched_completion_lengths_names_the_argument():
    with pytest.raises(TypeCheckError) as err:
        grpo.grpo_loss(torch.zeros(2, 4), torch.zeros(2, 5), None, torch.zeros(2),
                       torch.ones(2, 4, dtype=torch.long), num_items_in_batch=8)
    message = str(err.value)
    assert "grpo_loss" in message and "old_per_token_logps" in message
    assert "f32[2,5]" in message and "N C" in message


def test_advantages_of_the_wrong_rank_are_caught():
    with pytest.raises(TypeCheckError, match="group_advantages"):
        grpo.group_advantages(torch.zeros(4, 2), num_generations=2)


def test_selective_log_softmax_index_must_match_logits():
    with pytest.raises(TypeCheckError, match="index"):
        grpo.selective_log_softmax(torch.zeros(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))


def test_float_ids_are_caught_as_a_dtype_error():
    with pytest.raises(TypeCheckError, match="completion_ids"):
        grpo.completion_mask_from_eos(torch.zeros(2, 3), [1])


def test_rewards_per_function_must_have_one_row_per_completion():
    with pytest.raises(TypeCheckError, match="reward_weights"):
        grpo.weighted_rewards(torch.zeros(6, 2), torch.ones(3))


def test_checks_cost_nothing_when_switched_off(monkeypatch):
    monkeypatch.setattr(grpo, "CHECK_SHAPES", False)
    # The same bad call now reaches torch, which broadcasts (2, 1) against (2, 4) without complaint: the
    # silent kind of bug the checks exist to catch.
    loss, _ = grpo.grpo_loss(torch.zeros(2, 4), torch.zeros(2, 1), None, torch.zeros(2),
                             torch.ones(2, 4, dtype=torch.long), num_items_in_batch=8)
    assert loss.shape == ()
