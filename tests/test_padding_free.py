"""The log-prob passes run packed (padding_free): each group's prompt once, then its completions back to back,
with no padding. These tests pin which rows count as a group, the packed layout of a hand-made batch, and that
packing changes no number beyond float rounding: log-probs, entropies and gradients, plain and chunked, with
SDPA's and the eager attention, and under activation checkpointing."""

import pytest
import torch

from grpo import get_per_token_logps, pack_rows, shared_prompts


def test_runs_of_equal_adjacent_prompts():
    ids = torch.tensor([[0, 7], [0, 7], [5, 6], [5, 6], [5, 6], [0, 7]])
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    first, group = shared_prompts(ids, mask)
    assert first.tolist() == [0, 2, 5]  # the last row equals the first, but is not adjacent to it
    assert group.tolist() == [0, 0, 1, 1, 1, 2]
    mask[1, 0] = 1  # the same ids under another mask are another prompt
    assert shared_prompts(ids, mask)[1].tolist() == [0, 1, 2, 2, 2, 3]
    assert shared_prompts(ids[1:4:2], mask[1:4:2]) is None  # no two adjacent rows are equal


def hand_batch():
    """Rows 0 and 1 share the left-padded prompt [7, 8]; row 2 has [5, 6, 4]. P = C = 3."""
    prompt_ids = torch.tensor([[0, 7, 8], [0, 7, 8], [5, 6, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[11, 12, 13], [21, 22, 99], [31, 99, 99]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_packed_layout_by_hand():
    packed = pack_rows(*hand_batch(), max_length=100)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22, 5, 6, 4, 31]]
    # Row 1's completion starts again at position 2, right after its prompt, as in its own padded row.
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3]]
    # Token 11 is predicted by its prompt's last token (column 1), 12 by 11, 13 by 12; 21 by the prompt's last
    # again, 22 by 21 (column 5); 31 by the last token of its own prompt (column 9).
    assert packed.predictors.tolist() == [1, 2, 3, 1, 5, 9]
    allowed = packed.allowed[0].int().tolist()
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # 13 sees its prompt and its own completion
    assert allowed[6] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # 22 sees its prompt and 21, not row 0's tokens
    assert allowed[1] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # a prompt is causal
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # and sees only itself
    assert allowed[10] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_packed_rows_are_cut_at_max_length():
    # Row 2 and its prompt (4 tokens) would make 11 > 7: they start a second packed row, padded with 0.
    packed = pack_rows(*hand_batch(), max_length=7)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22], [5, 6, 4, 31, 0, 0, 0]]
    assert packed.predictors.tolist() == [1, 2, 3, 1, 5, 7 + 2]  # flattened (R·L): row 1, column 2
    assert packed.allowed[1, 5].int().tolist() == [0, 0, 0, 0, 1, 1, 0]  # padding sees only padding
    # A group cut in the middle repeats its prompt in the next packed row.
    prompt_ids, prompt_mask = torch.tensor([[0, 7, 8]] * 3), torch.tensor([[0, 1, 1]] * 3)
    completion_ids = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    packed = pack_rows(prompt_ids, prompt_mask, completion_ids, torch.ones(3, 3, dtype=torch.long), max_length=8)
    assert packed.input_ids.tolist() == [[7, 8, 11, 12, 13, 21, 22, 23], [7, 8, 31, 32, 33, 0, 0, 0]]


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


def logps_and_grads(model, padding_free, chunk_size=0):
    prompt_ids, prompt_mask, completion_ids, completion_mask = grouped_batch()
    model.zero_grad()
    logps, entropy = get_per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.9,
                                         with_entropy=True, chunk_size=chunk_size, padding_free=padding_free)
    (logps * completion_mask).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logps.detach() * completion_mask, entropy * completion_mask, grads


def count_forward_rows(model):
    """The shape of the input ids of every forward call of the model, in order."""
    rows = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    return rows


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "chunked"])
@pytest.mark.parametrize("width", [64, 8], ids=["one row", "cut rows"])
def test_packed_rows_give_the_same_logps_and_gradients(model, chunk_size, attention, width):
    model.set_attn_implementation(attention)
    padded = logps_and_grads(model, padding_free=False, chunk_size=chunk_size)
    calls = count_forward_rows(model)
    # Packed rows are cut at max(P + C, hidden_size) tokens: the model's 64, or 11 when it claims to be 8 wide.
    model.config.hidden_size = width
    packed = logps_and_grads(model, padding_free=True, chunk_size=chunk_size)
    # One pass over 3 + (6 + 2 + 4) + 5 + (6 + 1) = 27 tokens, where the padded batch has 5 rows of P + C = 11.
    # Cut at 11: 3 + 6 + 2 = 11 and 3 + 4 = 7 for the first prompt, 5 + 6 = 11 and 5 + 1 = 6 for the second.
    assert calls == ([(1, 27)] if width == 64 else [(4, 11)])
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert padded[2].abs().max() > 1e-3  # the gradients compared are not all zero


def test_packed_rows_under_activation_checkpointing(model):
    padded = logps_and_grads(model, padding_free=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = count_forward_rows(model)
    checkpointed = logps_and_grads(model, padding_free=True)
    assert calls == [(1, 27)]
    for a, b in zip(checkpointed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_sliding_window_falls_back_to_padded_rows(model):
    calls = count_forward_rows(model)
    model.config.sliding_window = 4096  # the packed mask would not apply the window
    get_per_token_logps(model, *grouped_batch(), 0.9)
    assert calls == [(5, 11)]
