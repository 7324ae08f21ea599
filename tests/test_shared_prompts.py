"""A group's G completions share one prompt: the prompt goes through the model once per group, in sampling and
in the log-prob passes. These tests pin which rows count as a group, and that sharing changes no number beyond
float rounding: log-probs, entropies and gradients, plain and chunked, and under activation checkpointing."""

import pytest
import torch

from grpo import get_per_token_logps, shared_prompts


def test_runs_of_equal_adjacent_prompts():
    ids = torch.tensor([[0, 7], [0, 7], [5, 6], [5, 6], [5, 6], [0, 7]])
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    first, group = shared_prompts(ids, mask)
    assert first.tolist() == [0, 2, 5]  # the last row equals the first, but is not adjacent to it
    assert group.tolist() == [0, 0, 1, 1, 1, 2]
    mask[1, 0] = 1  # the same ids under another mask are another prompt
    assert shared_prompts(ids, mask)[1].tolist() == [0, 1, 2, 2, 2, 3]
    assert shared_prompts(ids[1:4:2], mask[1:4:2]) is None  # no two adjacent rows are equal


def grouped_batch():
    """Two prompts (the first left-padded), the first repeated 3 times and the second twice, with completions of
    different lengths."""
    torch.manual_seed(3)
    prompts = torch.randint(2, 50, (2, 5))
    prompt_ids = prompts[[0, 0, 0, 1, 1]]
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1]] * 3 + [[1] * 5] * 2)
    completion_ids = torch.randint(0, 50, (5, 6))
    completion_mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 4 + [0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def logps_and_grads(model, share_prompts, chunk_size=0):
    prompt_ids, prompt_mask, completion_ids, completion_mask = grouped_batch()
    model.zero_grad()
    logps, entropy = get_per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.9,
                                         with_entropy=True, chunk_size=chunk_size, share_prompts=share_prompts)
    (logps * completion_mask).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach() * completion_mask, entropy * completion_mask, grads


def count_forward_rows(model):
    """The rows of every forward call of the model, in order."""
    rows = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    return rows


@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "chunked"])
def test_one_prompt_pass_per_group_gives_the_same_logps_and_gradients(model, chunk_size):
    plain = logps_and_grads(model, share_prompts=False, chunk_size=chunk_size)
    calls = count_forward_rows(model)
    shared = logps_and_grads(model, share_prompts=True, chunk_size=chunk_size)
    # One pass over the first P-1 = 4 prompt tokens of the 2 prompts, then one over each row's last C+1 = 7 tokens.
    assert calls == [(2, 4), (5, 7)]
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert plain[2].abs().max() > 1e-3  # the gradients compared are not all zero


def test_under_activation_checkpointing_every_row_runs_in_full(model):
    """transformers drops the cache of a checkpointed forward pass with gradients, which would leave the
    completions without their prompt; there the rows run in full (one call of N rows), and the numbers agree."""
    plain = logps_and_grads(model, share_prompts=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = count_forward_rows(model)
    checkpointed = logps_and_grads(model, share_prompts=True)
    assert calls == [(5, 11)]
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():  # without gradients the cache is kept, so sharing is back
        get_per_token_logps(model, *grouped_batch(), 0.9)
    assert calls[1:] == [(2, 4), (5, 7)]
