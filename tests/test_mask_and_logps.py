"""The sampling loop, the completion mask, selective log-softmax, and per-token log-probs, against independent
computations and against transformers' generate()."""

import inspect

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import grpo
from grpo import (completion_mask_from_eos, get_per_token_logps, logits_processors, sample_from, sample_with_cache,
                  selective_log_softmax, tokenize_prompts)

EOS = 1


def test_mask_eos_in_the_middle_at_zero_and_absent():
    ids = torch.tensor([[5, 6, EOS, 9, 9], [EOS, 7, 7, 7, 7], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_eos(ids, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_mask_when_pad_equals_eos():
    # generate() pads finished rows with pad_token_id; when pad == eos the row is "5 EOS EOS EOS".
    # A mask built as ids != pad would drop the real EOS, which the model must learn to emit.
    ids = torch.tensor([[5, EOS, EOS, EOS], [5, 6, 7, EOS]])
    mask, truncated = completion_mask_from_eos(ids, [EOS])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False]


def test_mask_with_several_eos_tokens():
    ids = torch.tensor([[5, 3, 1, 0], [5, 6, 7, 1]])  # chat models often stop at either of two tokens
    mask, _ = completion_mask_from_eos(ids, [1, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_selective_log_softmax_equals_log_softmax_gather(dtype, tol):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).to(dtype)
    index = torch.randint(0, 50, (3, 5))
    expected = logits.float().log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


def test_per_token_logps_equal_a_full_forward(model):
    torch.manual_seed(1)
    prompt_ids = torch.randint(2, 40, (4, 6))
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]])
    completion_ids = torch.randint(2, 40, (4, 5))
    completion_mask = torch.ones(4, 5, dtype=torch.long)
    got, entropy = get_per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7,
                                       with_entropy=True)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = (logits[:, 5:10] / 0.7).log_softmax(-1)  # positions P-1 .. P+C-2 predict the C completion tokens
    torch.testing.assert_close(got, logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0)


def test_per_token_logps_equal_the_sampling_distribution(model, tokenizer):
    """The policy that sampled and the policy we train on agree: log-probs recomputed by one forward pass over
    left-padded prompts equal the log-probs sample_with_cache drew each token with (KV cache, one token at a
    time), so the ratio π_θ/π_θ_old is exactly 1 before any update, temperature included."""
    prompt_ids, prompt_mask = tokenize_prompts(["a=", "hgf=", "bc="], tokenizer, None)
    temperature = 0.8
    torch.manual_seed(0)
    with torch.no_grad():
        completion_ids, sampled = sample_with_cache(
            model, prompt_ids, prompt_mask, logits_processors(temperature, 0, 1.0, None, 1.0), 6,
            [tokenizer.eos_token_id], tokenizer.pad_token_id)
        mask, _ = completion_mask_from_eos(completion_ids, [tokenizer.eos_token_id])
        got, _ = get_per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, temperature)
    assert mask.sum() > 6
    torch.testing.assert_close(got * mask, sampled * mask, atol=1e-5, rtol=0)


def test_sample_from_draws_each_token_with_its_probability():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3]]).expand(40_000, 4)
    counts = torch.bincount(sample_from(probs), minlength=4) / 40_000
    assert counts[1] == 0  # probability 0 (filtered out): never drawn
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.0, 0.2, 0.3]), atol=0.01, rtol=0)  # 4 σ = 0.01
    assert sample_from(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).tolist() == [2, 0]


def test_sampling_loop_follows_generate_with_the_same_processors(model, tokenizer):
    """top_k=1 makes sampling deterministic, so our loop must pick exactly generate()'s tokens: the repetition
    penalty (which changes which token is on top), temperature and padding after EOS all act as in transformers."""
    prompt_ids, prompt_mask = tokenize_prompts(["a=", "hgf=", "bc=", "dd="], tokenizer, None)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=GenerationConfig(
            do_sample=True, top_k=1, temperature=0.7, repetition_penalty=1.5, max_new_tokens=8, eos_token_id=eos,
            pad_token_id=pad))[:, prompt_ids.size(1):]
        got, logps = sample_with_cache(model, prompt_ids, prompt_mask,
                                       logits_processors(0.7, 1, 1.0, None, 1.5), 8, [eos], pad)
    assert torch.equal(got, expected)
    assert torch.equal(logps, torch.zeros_like(logps))  # top-1 leaves one token, of probability 1


def test_the_repetition_penalty_skips_the_left_padding_on_every_transformers_release():
    """Pad id 0, left padding of 2 and 0 columns: unpadded() shows the filters each row's first real token in place
    of its padding, so token 0 keeps its logit in the padded row, while the row that really holds a 0 has it
    penalised; transformers 5.23's per-row prompt_ignore_length gives the same logits (older releases lack it)."""
    ids, mask = torch.tensor([[0, 0, 5, 6], [0, 7, 7, 2]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert grpo.unpadded(ids, mask).tolist() == [[5, 5, 5, 6], [0, 7, 7, 2]]
    logits = torch.full((2, 9), 2.0)
    penalised = logits_processors(1.0, 0, 1.0, None, 2.0)(grpo.unpadded(ids, mask), logits.clone())
    assert penalised.tolist() == [[2.0, 2, 2, 2, 2, 1, 1, 2, 2], [1.0, 2, 1, 2, 2, 2, 2, 1, 2]]
    if "Tensor" in str(inspect.signature(RepetitionPenaltyLogitsProcessor.__init__)):  # transformers >= 5.23
        ignore = RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=(mask != 0).int().argmax(dim=1))
        assert torch.equal(ignore(ids, logits.clone()), penalised)


def test_a_group_shares_one_prompt_pass(model, tokenizer):
    """G copies of a prompt: sample_grouped runs one prompt pass whose keys and values are copied G times, and draws
    what Part I's loop draws with G passes (same random stream; the log-probs differ only by float rounding)."""
    prompt_ids, prompt_mask = tokenize_prompts(["a="] * 3 + ["hgf="] * 3, tokenizer, None)
    processors = logits_processors(1.0, 0, 1.0, None, 1.0)
    rows, runs = [], []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
    for sample in (sample_with_cache, grpo.sample_grouped):
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(sample(model, prompt_ids, prompt_mask, processors, 6, [-1], tokenizer.pad_token_id))
        rows.append("|")
    hook.remove()
    assert rows[0] == 6 and rows[rows.index("|") + 1] == 2  # the prompt pass: 6 rows, then the 2 distinct prompts
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=0)


def test_rows_that_end_leave_the_batch_and_sample_what_they_would_have(model, tokenizer):
    """sample_grouped runs the model on the rows that have not ended. It still draws a random number for every row
    at every step, so with EOS it draws the tokens it draws without, up to each row's end; and the log-probs it
    drew with equal those recomputed by one forward pass, for the rows that kept going after others ended."""
    prompt_ids, prompt_mask = tokenize_prompts(["a=", "hgf=", "bc=", "dd="], tokenizer, None)
    processors = logits_processors(1.5, 0, 1.0, None, 1.0)

    def sample(eos, how=grpo.sample_grouped):
        torch.manual_seed(0)
        return how(model, prompt_ids, prompt_mask, processors, 8, eos, tokenizer.pad_token_id)

    with torch.no_grad():
        free, _ = sample([-1], sample_with_cache)  # Part I's loop without EOS: every row runs 8 tokens
        eos = [int(free[0, 2]), int(free[2, 0])]  # row 2 ends at its first token, row 0 by its third
        rows = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
        got, sampled = sample(eos)
        hook.remove()
        mask, _ = completion_mask_from_eos(got, eos)
        recomputed, _ = get_per_token_logps(model, prompt_ids, prompt_mask, got, mask, 1.5)
    assert rows[0] == 4 and min(rows) < 4  # the prompts ran as 4 rows, later steps on fewer
    assert mask.sum(1).tolist()[2] == 1 and mask.sum(1).max() > 3
    assert torch.equal(got * mask, free[:, :got.size(1)] * mask)
    torch.testing.assert_close(recomputed * mask, sampled * mask, atol=1e-5, rtol=0)


def test_the_grouped_sampler_is_checked_against_part_one_loop(model):
    """sampling_problem compares the distributions each sampler draws from, on the same forced tokens: it accepts the
    grouped sampler, and one that draws other tokens from the same distributions (its random stream moved on, as
    float rounding moves a draw at a boundary of the cumulative distribution), and refuses each planted fault."""
    assert grpo.sampling_problem(grpo.sample_grouped, model) is None

    def other_draws(*args, **kwargs):  # the same distributions, other random numbers
        torch.rand(1)
        return grpo.sample_grouped(*args, **kwargs)

    assert grpo.sampling_problem(other_draws, model) is None

    def one_token_off(*args, **kwargs):  # the first token of every row shifted by one
        ids, logps = grpo.sample_grouped(*args, **kwargs)
        return torch.cat([(ids[:, :1] + 1) % model.config.vocab_size, ids[:, 1:]], 1), logps

    def hotter(model, prompt_ids, prompt_mask, processors, *args):  # the temperature applied twice
        return grpo.sample_grouped(model, prompt_ids, prompt_mask, LogitsProcessorList([*processors[:1], *processors]),
                                   *args)

    def no_padding_mask(model, prompt_ids, prompt_mask, *args):  # the left padding attended to
        return grpo.sample_grouped(model, prompt_ids, torch.ones_like(prompt_mask), *args)

    def position_off_by_one(model, *args):  # every decoding step one position too far
        def later(module, positional, kwargs):
            if kwargs["input_ids"].size(1) == 1:
                kwargs["position_ids"] = kwargs["position_ids"] + 1
            return positional, kwargs

        hook = model.register_forward_pre_hook(later, with_kwargs=True)
        try:
            return grpo.sample_grouped(model, *args)
        finally:
            hook.remove()

    assert grpo.sampling_problem(one_token_off, model) == ("returned other tokens than those it was made to draw, on "
                                                           "a probe batch")
    for fault in (hotter, no_padding_mask, position_off_by_one):
        assert grpo.sampling_problem(fault, model).startswith("samples from other distributions than Part I's loop "
                                                              "(total variation"), fault.__name__


def test_absolute_positions_give_ratio_one_with_left_padding(tokenizer):
    """GPT-2 adds a learned embedding per position. Sampling counts a left-padded row's positions from its first
    real token (positions()); so does get_per_token_logps, and its log-probs equal the sampling ones. TRL 1.16 passes
    no position ids to its log-prob forward, so the padded row is counted from the padding: other numbers."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    prompt_ids, prompt_mask = tokenize_prompts(["a=", "hgf="], tokenizer, None)  # "a=" gets 2 pads on the left
    with torch.no_grad():
        completion_ids, sampled = sample_with_cache(model, prompt_ids, prompt_mask,
                                                    logits_processors(1.0, 0, 1.0, None, 1.0), 5, [-1],
                                                    tokenizer.pad_token_id)
        mask = torch.ones_like(completion_ids)
        ours, _ = get_per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        logits = model(input_ids=input_ids, attention_mask=torch.cat([prompt_mask, mask], 1)).logits  # TRL's call
        trl_like = logits[:, -6:-1].log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(ours, sampled, atol=1e-5, rtol=0)  # ratio = 1 at sampling time
    assert (trl_like[0] - sampled[0]).abs().max() > 1e-2  # the left-padded row, counted from its padding
    torch.testing.assert_close(trl_like[1], sampled[1], atol=1e-5, rtol=0)  # the unpadded row agrees
