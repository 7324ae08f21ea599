"""RepeatSampler: the exact sequences of REFERENCE.md and the seed, its length, seeding and epochs."""

import torch

from grpo import RepeatSampler


def test_unshuffled_sequence_mini2_batch3_repeat2():
    sampler = RepeatSampler(list(range(7)), mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=False)
    assert list(sampler) == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 3, 3, 4, 4, 5, 5]
    assert len(sampler) == 24


def test_unshuffled_sequence_mini3_batch2_repeat2():
    sampler = RepeatSampler(list(range(7)), mini_repeat_count=3, batch_size=2, repeat_count=2, shuffle=False)
    assert list(sampler) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 2, 2, 2, 3, 3, 3,
                             4, 4, 4, 5, 5, 5, 4, 4, 4, 5, 5, 5]
    assert len(sampler) == 36


def test_seed_example_structure_with_shuffle():
    """The seed's example: 7 items, G=3, 3 prompts per batch, repeat 2. Whatever the permutation, the output is
    two chunks of three distinct prompts, each prompt three times in a row, each chunk twice, one item dropped."""
    sampler = RepeatSampler(list(range(7)), mini_repeat_count=3, batch_size=3, repeat_count=2, seed=42)
    out = list(sampler)
    assert len(out) == len(sampler) == 36
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(42)).tolist()
    expected = []
    for chunk in (perm[0:3], perm[3:6]):
        expected += [i for _ in range(2) for i in chunk for _ in range(3)]
    assert out == expected
    assert perm[6] not in out


def test_same_seed_same_sequence_and_new_permutation_each_epoch():
    a = RepeatSampler(list(range(50)), mini_repeat_count=2, batch_size=5, seed=7)
    b = RepeatSampler(list(range(50)), mini_repeat_count=2, batch_size=5, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second_a = list(a)
    assert second_a != first_a  # the generator moves on: a new permutation for the second epoch
    assert sorted(second_a) == sorted(first_a)
    assert list(RepeatSampler(list(range(50)), 2, 5, seed=8)) != first_a


def test_length_drops_incomplete_chunk():
    sampler = RepeatSampler(list(range(10)), mini_repeat_count=4, batch_size=3, repeat_count=5, seed=0)
    assert len(sampler) == (10 // 3) * 3 * 4 * 5 == len(list(sampler))
